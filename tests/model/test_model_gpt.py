import math

import pytest
import torch

from model import GPT, PRESETS, GPTConfig
from tolerance import cross_entropy_bounds, logits_bound


def test_forward_returns_logits_for_every_position_or_the_mean_loss():
    config = GPTConfig.from_preset("tiny")
    model = GPT(config)
    idx = torch.randint(0, config.vocab_size, (3, 17))
    hidden = []
    model.transformer.ln_f.register_forward_hook(lambda module, args, out: hidden.append(out.detach()))
    logits, loss = model(idx)
    assert logits.shape == (3, 17, config.vocab_size)
    assert loss is None
    no_logits, loss = model(idx, targets=idx)
    assert no_logits is None  # the loss comes without materialising them (model/loss.py)
    expected = torch.nn.functional.cross_entropy(logits.view(-1, config.vocab_size), idx.view(-1))
    # The same hidden states, the head's product and the softmax evaluated in another order.
    bound = cross_entropy_bounds(hidden[0].flatten(0, 1), model.lm_head.weight.detach(), idx.view(-1))[0]
    assert abs(loss.item() - expected.item()) <= bound
    # A fresh model is close to uniform over the vocabulary.
    assert abs(loss.item() - math.log(config.vocab_size)) < 0.5


def test_causality_future_tokens_do_not_change_past_logits():
    model = GPT(GPTConfig.from_preset("tiny")).eval()
    idx = torch.randint(0, 50257, (1, 20))
    changed = idx.clone()
    changed[0, 10:] = torch.randint(0, 50257, (10,))
    a, _ = model(idx)
    b, _ = model(changed)
    assert (a[0, :10] - b[0, :10]).abs().max().item() <= logits_bound(model, idx)
    assert not torch.allclose(a[0, 10:], b[0, 10:])


def test_attention_never_materialises_a_mask():
    model = GPT(GPTConfig.from_preset("tiny"))
    assert list(model.buffers()) == []


def test_lm_head_is_tied_to_the_token_embedding():
    model = GPT(GPTConfig.from_preset("tiny"))
    assert model.lm_head.weight is model.transformer.wte.weight


def test_initialisation_scales_both_residual_projections():
    # Statistics, not rounding: the sample standard deviation of n normal draws has a relative standard
    # error of 1/√(2n), under 0.8% for the smallest matrix here (wpe, 8,192 values); 5% is over six of them.
    torch.manual_seed(0)
    config = GPTConfig(n_layer=8, n_head=4, n_embd=256, block_size=32, vocab_size=1000)
    model = GPT(config)
    scaled = 0.02 / math.sqrt(2 * config.n_layer)
    for block in model.transformer.h:
        assert block.attn.c_proj.weight.std().item() == pytest.approx(scaled, rel=0.05)
        assert block.mlp.c_proj.weight.std().item() == pytest.approx(scaled, rel=0.05)
        assert block.attn.c_attn.weight.std().item() == pytest.approx(0.02, rel=0.05)
        assert block.mlp.c_fc.weight.std().item() == pytest.approx(0.02, rel=0.05)
        for linear in (block.attn.c_attn, block.attn.c_proj, block.mlp.c_fc, block.mlp.c_proj):
            assert torch.count_nonzero(linear.bias) == 0
    assert model.transformer.wte.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert model.transformer.wpe.weight.std().item() == pytest.approx(0.02, rel=0.05)


@pytest.mark.parametrize(
    "name, parameters",
    [
        ("gpt2", 124_439_808),
        ("gpt2-medium", 354_823_168),
        ("gpt2-large", 774_030_080),
        ("gpt2-xl", 1_557_611_200),
    ],
)
def test_gpt2_presets_have_the_published_sizes(name, parameters):
    with torch.device("meta"):
        model = GPT(GPTConfig.from_preset(name))
    assert sum(p.numel() for p in model.parameters()) == parameters


def test_presets_and_overrides():
    assert set(PRESETS) >= {"gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl", "tiny", "mini"}
    config = GPTConfig.from_preset("mini", n_layer=2)
    assert config.n_layer == 2 and config.n_embd == PRESETS["mini"]["n_embd"]
    with pytest.raises(ValueError, match="unknown preset 'gpt3'"):
        GPTConfig.from_preset("gpt3")
    with pytest.raises(ValueError, match="divisible by n_head"):
        GPTConfig(n_embd=100, n_head=3)
    with pytest.raises(ValueError, match="unknown GPTConfig fields: colour"):
        GPTConfig.from_dict({"colour": "blue"})


def test_sequences_longer_than_the_context_are_refused():
    model = GPT(GPTConfig.from_preset("tiny"))
    with pytest.raises(ValueError, match="exceeds the context of 64"):
        model(torch.zeros(1, 65, dtype=torch.long))


def test_padded_vocabulary_rows_never_reach_the_logits():
    torch.manual_seed(0)
    config = GPTConfig.from_preset("tiny", vocab_multiple=64)
    model = GPT(config).eval()
    assert config.padded_vocab_size == 50304
    assert model.transformer.wte.weight.shape[0] == 50304
    with torch.no_grad():
        # Were the padding rows visible, they would win every argmax.
        model.transformer.wte.weight[config.vocab_size :] = 100.0
    logits, _ = model(torch.randint(0, config.vocab_size, (2, 9)))
    assert logits.shape[-1] == config.vocab_size
    out = model.generate(torch.randint(0, config.vocab_size, (2, 3)), max_new_tokens=20, top_k=None)
    assert int(out.max()) < config.vocab_size
