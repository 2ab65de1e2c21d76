import copy

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from model import Engine, GPT, GPTConfig
from model.packing import ROW_BUCKETS, PackedLinear, pack
from test_model_generation import GREEDY, PROMPTS, SAMPLED, recompute_greedy
from tolerance import linear_bound, logits_bound


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_a_packed_model_computes_the_same_logits(dtype):
    torch.manual_seed(0)
    model = GPT(GPTConfig.from_preset("tiny")).eval().to(dtype)
    packed = pack(copy.deepcopy(model))
    assert not any(isinstance(m, torch.nn.Linear) for m in packed.modules())
    assert sum(isinstance(m, PackedLinear) for m in packed.modules()) == 4 * 2 + 1, "every block's four and the head"
    idx = torch.randint(0, 50257, (3, 17))
    with torch.no_grad():
        expected, _ = model(idx)
        logits, _ = packed(idx)
    assert logits.dtype == dtype and logits.shape == expected.shape
    assert (logits.float() - expected.float()).abs().max().item() <= logits_bound(model, idx, dtype)


def test_packed_decoding_equals_full_recomputation_and_batching_changes_nothing(sharp_model):
    packed = pack(copy.deepcopy(sharp_model))
    generated = Engine(packed, max_batch_size=4).generate_tokens(PROMPTS, GREEDY)
    assert generated == [recompute_greedy(sharp_model, p, GREEDY.max_new_tokens) for p in PROMPTS]
    alone = [Engine(packed, max_batch_size=1).generate_tokens([p], SAMPLED)[0] for p in PROMPTS]
    assert Engine(packed, max_batch_size=4).generate_tokens(PROMPTS, SAMPLED) == alone


def test_the_tied_embedding_stays_an_ordinary_lookup_table(sharp_model):
    embedding = sharp_model.transformer.wte.weight.detach().clone()
    packed = pack(sharp_model)
    assert torch.equal(packed.transformer.wte.weight, embedding)
    assert packed.transformer.wte.weight.layout == torch.strided


def test_only_cpu_models_are_packed():
    model = GPT(GPTConfig.from_preset("tiny")).to("meta")
    with pytest.raises(ValueError, match="packed weights are for CPU kernels; the model is on meta"):
        pack(model)


class RowCounts(TorchDispatchMode):
    """Records the row counts that reach oneDNN's linear kernel."""

    def __init__(self):
        super().__init__()
        self.seen: set[int] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.mkldnn._linear_pointwise.default:
            self.seen.add(args[0].shape[0])
        return func(*args, **(kwargs or {}))


def test_any_number_of_rows_is_computed_in_a_bounded_set_of_kernel_shapes():
    torch.manual_seed(0)
    linear = torch.nn.Linear(24, 40)
    packed = PackedLinear(linear)
    counts = RowCounts()
    with torch.no_grad(), counts:
        for n in range(1, 700):
            x = torch.randn(n, 24)
            assert (packed(x) - linear(x)).abs().max() <= linear_bound(linear, x), n
        x = torch.randn(3, 77, 24)
        assert (packed(x) - linear(x)).abs().max() <= linear_bound(linear, x)
    assert counts.seen == set(ROW_BUCKETS)
