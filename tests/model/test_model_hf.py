import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from model import GPT, GPTConfig
from modelkit import sharpen
from tolerance import logits_bound


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """A small random GPT-2 written by transformers itself, built offline."""
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=50257, n_positions=128, n_embd=64, n_layer=3, n_head=4)
    # Real margins between logits, so greedy decoding is not decided by rounding.
    hf = sharpen(GPT2LMHeadModel(config)).eval()
    directory = tmp_path_factory.mktemp("hf-gpt2")
    hf.save_pretrained(directory)
    return directory


def test_imported_weights_give_transformers_logits(hf_dir):
    hf = GPT2LMHeadModel.from_pretrained(hf_dir).eval()
    ours = GPT.from_pretrained(str(hf_dir)).eval()
    assert ours.config == GPTConfig(block_size=128, vocab_size=50257, n_layer=3, n_head=4, n_embd=64)
    idx = torch.randint(0, 50257, (2, 40))
    with torch.no_grad():
        expected = hf(idx).logits
        logits, _ = ours(idx)
    assert (logits - expected).abs().max().item() <= logits_bound(ours, idx)


def test_greedy_generation_matches_transformers(hf_dir):
    hf = GPT2LMHeadModel.from_pretrained(hf_dir).eval()
    ours = GPT.from_pretrained(str(hf_dir)).eval()
    prompt = torch.randint(0, 50257, (1, 8))
    with torch.no_grad():
        expected = hf.generate(prompt, max_new_tokens=30, do_sample=False, pad_token_id=50256,
                               attention_mask=torch.ones_like(prompt))
    assert ours.generate(prompt, max_new_tokens=30, temperature=0.0).tolist() == expected.tolist()


def test_export_then_import_is_lossless(hf_dir, tmp_path):
    ours = GPT.from_pretrained(str(hf_dir))
    ours.save_pretrained(tmp_path / "export")
    hf = GPT2LMHeadModel.from_pretrained(tmp_path / "export")
    original = GPT2LMHeadModel.from_pretrained(hf_dir)
    for key, value in original.state_dict().items():
        assert torch.equal(hf.state_dict()[key], value), key
    again = GPT.from_pretrained(str(tmp_path / "export"))
    for key, value in ours.state_dict().items():
        assert torch.equal(again.state_dict()[key], value), key


def test_export_drops_padded_vocabulary_rows(tmp_path):
    model = GPT(GPTConfig.from_preset("tiny", vocab_multiple=64))
    model.save_pretrained(tmp_path)
    hf = GPT2LMHeadModel.from_pretrained(tmp_path)
    assert hf.config.vocab_size == 50257
    assert hf.transformer.wte.weight.shape == (50257, 32)
    assert torch.equal(hf.transformer.wte.weight, model.transformer.wte.weight[:50257])


def test_unknown_names_are_refused_before_any_download(tmp_path):
    with pytest.raises(ValueError, match="neither a directory written by save_pretrained nor one of gpt2"):
        GPT.from_pretrained(str(tmp_path / "nope"))
