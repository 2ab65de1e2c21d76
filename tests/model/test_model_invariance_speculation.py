"""Speculation changes no token: the invariance matrix again, drafting from prompt lookup and from a draft
model. Every compared request, batched with requests joining and leaving and alone, with drafts checked
(some kept, some dropped), draws its tokens from plain decoding's logits alone, bit for bit, on every
weight layout the engine serves (our kernels on the path this CPU dispatches to; every path keeps each
row at any row count, test_model_invariance.py).
"""

from __future__ import annotations

import pytest
from invariancekit import LAYOUTS, NATIVE_LAYOUTS, check_joining_requests, layout, speculation

from model import native
from model.generation import ANY_ROW_COUNT, row_range

SOURCES = ["lookup", "draft"]


@pytest.mark.parametrize("source", SOURCES)
@pytest.mark.parametrize("dtype,weights", LAYOUTS, ids=[f"{d}-{w}" for d, w in LAYOUTS])
def test_drafted_requests_joining_a_running_batch_draw_plain_decodings_numbers(mini, draft, dtype, weights, source):
    check_joining_requests(layout(mini, dtype, weights), speculation(source, draft))


# Our kernels keep each row's bits at any row count on every path they dispatch to
# (test_model_invariance.py forces each); here each layout runs on the path this CPU dispatches to.
@pytest.mark.parametrize("source", SOURCES)
@pytest.mark.parametrize("dtype,weights", NATIVE_LAYOUTS, ids=[f"{d}-{w}" for d, w in NATIVE_LAYOUTS])
def test_on_our_kernels_drafted_requests_draw_plain_decodings_numbers(mini, draft, dtype, weights, source):
    if not native.available():
        pytest.skip(f"the decode kernels are not built here: {native.status()}")
    model = layout(mini, dtype, weights)
    assert row_range(model) == ANY_ROW_COUNT
    check_joining_requests(model, speculation(source, draft))
