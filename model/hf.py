"""Import and export of Hugging Face `GPT2LMHeadModel` weights.

Hugging Face's GPT-2 stores its projections as `Conv1D` modules whose weights are the transpose of
`nn.Linear`'s; everything else maps name for name.
"""

from __future__ import annotations

from pathlib import Path

import torch

from model.gpt import GPT, PRESETS, GPTConfig

HUB_NAMES = tuple(name for name in PRESETS if name.startswith("gpt2"))
_TRANSPOSED = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


def load_hf(name_or_path: str, **config_overrides) -> GPT:
    """A `GPT` with the weights of a hub model (`gpt2` … `gpt2-xl`) or a `save_pretrained` directory."""
    from transformers import GPT2LMHeadModel

    if not Path(name_or_path).is_dir() and name_or_path not in HUB_NAMES:
        raise ValueError(
            f"{name_or_path!r} is neither a directory written by save_pretrained nor one of {', '.join(HUB_NAMES)}"
        )
    hf = GPT2LMHeadModel.from_pretrained(name_or_path)
    config = _config_from_hf(hf.config, name_or_path, **config_overrides)
    model = GPT(config)
    state = model.state_dict()
    hf_state = hf.state_dict()
    with torch.no_grad():
        for key, target in state.items():
            if key == "lm_head.weight":
                continue  # tied to transformer.wte.weight
            source = hf_state[key]
            if key.endswith(_TRANSPOSED):
                source = source.t()
            if key == "transformer.wte.weight":
                target[: source.shape[0]].copy_(source)
                target[source.shape[0] :].zero_()
            else:
                target.copy_(source)
    return model


def _config_from_hf(hf_config, source: str, **overrides) -> GPTConfig:
    expected = {
        "activation_function": "gelu_new",
        "layer_norm_epsilon": 1e-5,
        "scale_attn_weights": True,
        "scale_attn_by_inverse_layer_idx": False,
        "reorder_and_upcast_attn": False,
    }
    for attr, value in expected.items():
        if getattr(hf_config, attr, value) != value:
            raise ValueError(f"{source}: unsupported GPT-2 variant ({attr}={getattr(hf_config, attr)!r})")
    return GPTConfig(
        block_size=hf_config.n_positions,
        vocab_size=hf_config.vocab_size,
        n_layer=hf_config.n_layer,
        n_head=hf_config.n_head,
        n_embd=hf_config.n_embd,
        **overrides,
    )


def save_hf(model: GPT, directory) -> None:
    """Write `model` as a `GPT2LMHeadModel` directory, without the padded vocabulary rows."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from model.checkpoint import unwrap

    model = unwrap(model)
    config = model.config
    hf_config = GPT2Config(
        vocab_size=config.vocab_size,
        n_positions=config.block_size,
        n_embd=config.n_embd,
        n_layer=config.n_layer,
        n_head=config.n_head,
        resid_pdrop=config.dropout,
        embd_pdrop=config.dropout,
        attn_pdrop=config.dropout,
        bos_token_id=50256,
        eos_token_id=50256,
    )
    hf = GPT2LMHeadModel(hf_config)
    hf_state = {}
    for key, value in model.state_dict().items():
        value = value.detach().float().cpu()
        if key.endswith(_TRANSPOSED):
            value = value.t()
        if key in ("transformer.wte.weight", "lm_head.weight"):
            value = value[: config.vocab_size]
        hf_state[key] = value.contiguous()
    missing, unexpected = hf.load_state_dict(hf_state, strict=False)
    unexplained = [k for k in missing if not k.endswith((".attn.bias", ".attn.masked_bias"))]
    if unexplained or unexpected:
        raise RuntimeError(f"export mismatch: missing {unexplained}, unexpected {unexpected}")
    hf.save_pretrained(directory)
