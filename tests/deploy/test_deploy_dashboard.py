"""Every Grafana panel query, evaluated by a real Prometheus scraping the real service and trainer."""

import json
import re
import shutil
import subprocess
import sys
import time
import urllib.parse
from pathlib import Path

import httpx
import processes
import pytest
import yaml
from lbkit import start_haproxy
from servicekit import free_port, publish, start_service, wait_for

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "deploy" / "grafana" / "dashboards" / "gpt-service.json"
# Grafana's own variables, as Grafana would substitute them for a 1 s scrape interval.
GRAFANA_VARIABLES = {"$__rate_interval": "15s", "$__interval": "1s"}


def panel_queries() -> list[tuple[str, str, str]]:
    dashboard = json.loads(DASHBOARD.read_text())
    queries = []
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            expr = target["expr"]
            for name, value in GRAFANA_VARIABLES.items():
                expr = expr.replace(name, value)
            assert "$" not in expr, f"unsubstituted variable in {panel['title']!r}: {expr}"
            queries.append((panel["title"], target["refId"], expr))
    return queries


@pytest.fixture(scope="module")
def stack(tmp_path_factory, up_module):
    """Service, trainer and the load balancer in front of the service, with traffic, errors and a reload
    behind them, scraped every second."""
    tmp = tmp_path_factory.mktemp("stack")
    checkpoints = tmp / "checkpoints"
    publish(checkpoints, step=10, val_loss=3.0)
    service = start_service(tmp, checkpoints)
    trainer_port = free_port()
    trainer = processes.spawn(
        [sys.executable, "-m", "trainer", "fit", "--data", "builtin:pydoc", "--out", str(tmp / "run"),
         "--preset", "tiny", "--seq-len", "32", "--batch-size", "4", "--eval-iters", "2", "--eval-interval", "5",
         "--log-interval", "1", "--steps", "100000", "--device", "cpu", "--dtype", "fp32", "--no-compile",
         "--metrics-port", str(trainer_port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
    )  # fmt: skip
    settings = up_module.UpSettings(run_dir=tmp, port=int(service.url.rsplit(":", 1)[1]),
                                    trainer_metrics_port=trainer_port)
    balancer = start_haproxy(tmp, service)
    config = up_module.prometheus_config(settings)
    scrapes = yaml.safe_load(config.read_text())
    lb = urllib.parse.urlsplit(balancer.metrics_url).netloc
    scrapes["scrape_configs"].append({"job_name": "lb", "static_configs": [{"targets": [lb]}]})
    config.write_text(re.sub(r"(scrape|evaluation)_interval: \w+", r"\1_interval: 1s", yaml.safe_dump(scrapes)))
    prometheus_port = free_port()
    prometheus = processes.spawn(
        [shutil.which("prometheus") or pytest.fail("prometheus not found: apt-get install -y prometheus"),
         f"--config.file={config}", f"--storage.tsdb.path={tmp / 'tsdb'}",
         f"--web.listen-address=127.0.0.1:{prometheus_port}", "--log.level=error"],
        stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
    )
    started = time.time()
    try:
        with service.client() as client:
            for i in range(6):
                assert client.post("/predict", json={"prompt": f"Hello {i}", "max_new_tokens": 8}).status_code == 200
            with client.stream("POST", "/predict", json={"prompt": "Hi", "max_new_tokens": 8, "stream": True}) as r:
                assert r.status_code == 200 and r.read()
            assert client.post("/predict", json={"prompt": ""}).status_code == 422
        with httpx.Client(base_url=balancer.url, timeout=60) as client:
            for i in range(3):
                assert client.post("/predict", json={"prompt": f"Via {i}", "max_new_tokens": 8}).status_code == 200
        publish(checkpoints, step=20, val_loss=2.5, seed=1)
        service.wait_serving(20)
        yield f"http://127.0.0.1:{prometheus_port}", started, service
    finally:
        for process in (prometheus, trainer, balancer.process):
            process.terminate()
            process.wait(timeout=60)
        service.stop()


def query(prometheus: str, expr: str, since: float | None = None) -> list:
    """An instant query, or with `since` a range query up to now, as a Grafana panel over that range."""
    if since is None:
        response = httpx.get(f"{prometheus}/api/v1/query", params={"query": expr}, timeout=10)
    else:
        params = {"query": expr, "start": since, "end": time.time(), "step": 1}
        response = httpx.get(f"{prometheus}/api/v1/query_range", params=params, timeout=10)
    assert response.status_code == 200, response.text
    return response.json()["data"]["result"]


def test_every_panel_query_returns_data(stack):
    prometheus, since, _ = stack
    queries = panel_queries()
    assert len(queries) >= 28
    missing = {(title, ref): expr for title, ref, expr in queries}

    deadline = time.monotonic() + 90
    while missing and time.monotonic() < deadline:
        for key, expr in list(missing.items()):
            if query(prometheus, expr, since):
                del missing[key]
        time.sleep(1.0)  # the next scrape
    assert not missing, f"panels whose query returned no data: {missing}"


def test_the_dashboard_shows_the_served_checkpoint_and_every_scrape_target(stack):
    prometheus, _, _ = stack

    def served_step():
        result = query(prometheus, "max(gpt_model_step)")
        return result and result[0]["value"][1] == "20"

    wait_for(served_step, timeout=30, interval=1.0, message="the served step to reach Prometheus")
    jobs = {r["metric"]["job"]: r["value"][1] for r in query(prometheus, "up")}
    assert jobs == {"api": "1", "lb": "1", "trainer": "1"}


def test_the_acceptance_panel_shows_the_kept_lookup_drafts(stack):
    prometheus, since, service = stack
    [expr] = [expr for title, _, expr in panel_queries() if title == "Draft acceptance rate by source"]
    # A rate needs the counter scraped before the drafts and after: greedy text that prompt lookup drafts
    # (speculation is on by default), sent once Prometheus has the counter.
    wait_for(lambda: query(prometheus, "gpt_speculation_proposed_tokens_total"), 30, interval=1.0, message="a scrape")
    repeating = {"prompt": "one two three four five " * 3, "max_new_tokens": 64, "temperature": 0}
    assert service.predict(**repeating)["usage"]["drafted_tokens"] > 0

    def lookup_rates():
        series = [s for s in query(prometheus, expr, since) if s["metric"].get("source") == "lookup"]
        return [float(value) for s in series for _, value in s["values"] if value != "NaN"]

    rates = wait_for(lookup_rates, timeout=30, interval=1.0, message="the lookup acceptance rate in Prometheus")
    assert all(0 <= rate <= 1 for rate in rates) and max(rates) > 0
