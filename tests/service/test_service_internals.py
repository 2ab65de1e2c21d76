"""The private parts of LitServe, uvicorn and prometheus_client that the service relies on are still there.

An upgrade that drops one fails here, naming it and why the service needs it, instead of failing
somewhere in a running service.
"""

from __future__ import annotations

from prometheus_client import mmap_dict, values

from service import bridge


def test_litserve_and_uvicorn_still_have_everything_the_bridge_relies_on():
    missing = bridge.missing_internals()
    assert not missing, "the installed LitServe/uvicorn lack what service/bridge.py relies on:\n" + "\n".join(
        f"  {name}: {bridge.RELIED_ON[name]}" for name in missing
    )


def test_a_missing_internal_is_named(monkeypatch):
    monkeypatch.setitem(bridge.RELIED_ON, "litserve.server.LitServer._gone_in_a_later_release", "an example")
    monkeypatch.setitem(bridge.RELIED_ON, "litserve.no_such_module.Thing", "another")
    assert bridge.missing_internals() == [
        "litserve.server.LitServer._gone_in_a_later_release",
        "litserve.no_such_module.Thing",
    ]


def test_prometheus_client_still_opens_its_files_as_metricstore_relies_on():
    # service/metricstore.py replaces values.MmapedDict and overrides _init_value around these attributes.
    assert hasattr(values, "MmapedDict") and hasattr(mmap_dict, "_INITIAL_MMAP_SIZE")
    assert hasattr(mmap_dict, "_pack_integer")
    assert "_init_value" in vars(mmap_dict.MmapedDict)
    source = mmap_dict.MmapedDict._init_value.__code__.co_names
    assert {"_capacity", "_used", "_m", "_f", "truncate"} <= set(source)
