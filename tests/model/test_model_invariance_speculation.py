"""Speculation changes no token: the invariance matrix again, drafting from prompt lookup and from a draft
model. Every compared request, batched with requests joining and leaving and alone, with drafts checked
(some kept, some dropped), draws its tokens from plain decoding's logits alone, bit for bit, on every
weight layout and kernel path the engine serves.
"""

from __future__ import annotations

import pytest
from invariancekit import ENGINE_CASES, LAYOUTS, check_joining_requests, layout, speculation

from model.generation import ANY_ROW_COUNT, row_range

SOURCES = ["lookup", "draft"]


@pytest.mark.parametrize("source", SOURCES)
@pytest.mark.parametrize("dtype,weights", LAYOUTS, ids=[f"{d}-{w}" for d, w in LAYOUTS])
def test_drafted_requests_joining_a_running_batch_draw_plain_decodings_numbers(mini, draft, dtype, weights, source):
    check_joining_requests(layout(mini, dtype, weights), speculation(source, draft))


@pytest.mark.parametrize("source", SOURCES)
@pytest.mark.parametrize("dtype,weights,kernel_path", ENGINE_CASES, ids=["-".join(c) for c in ENGINE_CASES],
                         indirect=["kernel_path"])  # fmt: skip
def test_on_our_kernels_drafted_requests_draw_plain_decodings_numbers(mini, draft, dtype, weights, kernel_path, source):
    model = layout(mini, dtype, weights)
    assert row_range(model) == ANY_ROW_COUNT
    check_joining_requests(model, speculation(source, draft))
