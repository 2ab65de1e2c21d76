"""The GPT-2 network: one readable file, a dataclass config, no framework magic.

Besides the training forward pass (`GPT.forward`, the seed's contract) the network exposes the two
inference passes the generation engine is built from: `prefill` (one prompt written into a KV-cache
row) and `decode` (one new token for each of a batch of cache rows, each attending over exactly its
own prefix, so that no row's numbers depend on the others).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import NamedTuple

import torch
import torch.nn as nn
from torch.nn import functional as F

from model.loss import linear_cross_entropy

PRESETS: dict[str, dict[str, int]] = {
    "gpt2": dict(n_layer=12, n_head=12, n_embd=768, block_size=1024),
    "gpt2-medium": dict(n_layer=24, n_head=16, n_embd=1024, block_size=1024),
    "gpt2-large": dict(n_layer=36, n_head=20, n_embd=1280, block_size=1024),
    "gpt2-xl": dict(n_layer=48, n_head=25, n_embd=1600, block_size=1024),
    # For tests: builds and runs a forward pass in milliseconds.
    "tiny": dict(n_layer=2, n_head=2, n_embd=32, block_size=64),
    # The CPU default (make up, trainer fit): small enough that two cores train it at thousands of
    # tokens/s, large enough to write recognisable text within minutes.
    "mini": dict(n_layer=4, n_head=4, n_embd=256, block_size=256),
}


@dataclass(frozen=True)
class GPTConfig:
    block_size: int = 1024
    vocab_size: int = 50257
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0
    # Rows of the embedding table are padded to a multiple of this (64 suits GPU matmuls). The extra
    # rows are never trained towards, never sampled and never exported.
    vocab_multiple: int = 1

    def __post_init__(self):
        for name in ("block_size", "vocab_size", "n_layer", "n_head", "n_embd", "vocab_multiple"):
            if getattr(self, name) < 1:
                raise ValueError(f"GPTConfig.{name} must be at least 1, got {getattr(self, name)}")
        if self.n_embd % self.n_head:
            raise ValueError(f"GPTConfig.n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"GPTConfig.dropout must be in [0, 1), got {self.dropout}")

    @property
    def padded_vocab_size(self) -> int:
        return math.ceil(self.vocab_size / self.vocab_multiple) * self.vocab_multiple

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @classmethod
    def from_preset(cls, name: str, **overrides) -> GPTConfig:
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})

    @classmethod
    def from_dict(cls, values: dict) -> GPTConfig:
        known = {f.name for f in fields(cls)}
        unknown = set(values) - known
        if unknown:
            raise ValueError(f"unknown GPTConfig fields: {', '.join(sorted(unknown))}")
        return cls(**values)

    def to_dict(self) -> dict:
        return asdict(self)


class KVCache(nn.Module):
    """Keys and values of every layer for `max_batch` rows of up to `max_len` positions.

    Allocated once; rows are addressed by index, so requests can join and leave a running batch
    without reallocating anything.
    """

    def __init__(self, config: GPTConfig, max_batch: int, max_len: int, dtype: torch.dtype, device):
        super().__init__()
        if max_len > config.block_size:
            raise ValueError(f"KV cache of {max_len} positions exceeds the context of {config.block_size}")
        shape = (config.n_layer, max_batch, config.n_head, max_len, config.head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    @property
    def max_batch(self) -> int:
        return self.k.shape[1]

    @property
    def max_len(self) -> int:
        return self.k.shape[3]


def decode_runs(rows: list[int], positions: list[int]) -> list[tuple[int, int, int, int]]:
    """Group a decode batch for attention: (first, end, first cache row, positions attended) per run.

    A run is neighbouring batch entries on consecutive cache rows at one position, so its keys are
    one slice of the cache. Within a run each row is reduced exactly as it would be alone: CPU
    attention works row by row and head by head, checked in tests/model/test_model_invariance.py.
    """
    runs = []
    for i, (row, position) in enumerate(zip(rows, positions)):
        if runs and runs[-1][3] == position + 1 and runs[-1][2] + (i - runs[-1][0]) == row:
            runs[-1] = (runs[-1][0], i + 1, runs[-1][2], position + 1)
        else:
            runs.append((i, i + 1, row, position + 1))
    return runs


class MaskedSpan(NamedTuple):
    """Decode attention without batch invariance: neighbouring cache rows from `first_row`, each attending
    to the positions its row of `mask` (B, 1, 1, span) allows."""

    first_row: int
    mask: torch.Tensor


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.n_head = config.n_head
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd)
        self.c_proj.residual_projection = True
        self.dropout = config.dropout
        self.resid_dropout = nn.Dropout(config.dropout)

    def _heads(self, x: torch.Tensor):
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        return tuple(t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))

    def _merge(self, y: torch.Tensor) -> torch.Tensor:
        B, _, T, _ = y.shape
        return self.resid_dropout(self.c_proj(y.transpose(1, 2).reshape(B, T, -1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self._heads(x)
        dropout = self.dropout if self.training else 0.0
        return self._merge(F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=True))

    def prefill(self, x: torch.Tensor, cache: KVCache, layer: int, row: int) -> torch.Tensor:
        q, k, v = self._heads(x)
        B, T = x.shape[:2]
        cache.k[layer, row : row + B, :, :T] = k
        cache.v[layer, row : row + B, :, :T] = v
        return self._merge(F.scaled_dot_product_attention(q, k, v, is_causal=True))

    def decode(self, x: torch.Tensor, cache: KVCache, layer: int, rows: torch.Tensor, pos: torch.Tensor, attend):
        q, k, v = self._heads(x)
        B = len(rows)
        cache.k[layer, rows, :, pos] = k[:B, :, 0]
        cache.v[layer, rows, :, pos] = v[:B, :, 0]
        keys, values = cache.k[layer], cache.v[layer]
        if isinstance(attend, MaskedSpan):  # not batch-invariant: one call, each row masked to its prefix
            first, span = attend.first_row, attend.mask.shape[-1]
            keys, values = keys[first : first + B, :, :span], values[first : first + B, :, :span]
            parts = [F.scaled_dot_product_attention(q[:B], keys, values, attn_mask=attend.mask)]
        else:
            # One attention per run of neighbouring cache rows at the same position, over exactly that
            # prefix: a masked span as long as the longest row would change the kernel's reduction
            # order, and with it the last bits of every shorter row (see decode_runs).
            parts = [
                F.scaled_dot_product_attention(q[i:j], keys[r : r + j - i, :, :n], values[r : r + j - i, :, :n])
                for i, j, r, n in attend
            ]
        if x.shape[0] > B:  # padding rows, there for the matrix kernels' row count only
            parts.append(q.new_zeros(x.shape[0] - B, *q.shape[1:]))
        return self._merge(parts[0] if len(parts) == 1 else torch.cat(parts))


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd)
        self.gelu = nn.GELU(approximate="tanh")
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd)
        self.c_proj.residual_projection = True
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


class Block(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))

    def prefill(self, x, cache, layer, row):
        x = x + self.attn.prefill(self.ln_1(x), cache, layer, row)
        return x + self.mlp(self.ln_2(x))

    def decode(self, x, cache, layer, rows, pos, attend):
        x = x + self.attn.decode(self.ln_1(x), cache, layer, rows, pos, attend)
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(config.padded_vocab_size, config.n_embd),
                wpe=nn.Embedding(config.block_size, config.n_embd),
                drop=nn.Dropout(config.dropout),
                h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
                ln_f=nn.LayerNorm(config.n_embd),
            )
        )
        self.lm_head = nn.Linear(config.n_embd, config.padded_vocab_size, bias=False)
        self.lm_head.weight = self.transformer.wte.weight
        self.apply(self._init_weights)

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            std = 0.02
            if getattr(module, "residual_projection", False):
                # Each block adds two residual branches; scaling keeps the residual stream's variance flat.
                std /= math.sqrt(2 * self.config.n_layer)
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def num_parameters(self, non_embedding: bool = True) -> int:
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= self.transformer.wpe.weight.numel()
        return n

    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.transformer.ln_f(x))[..., : self.config.vocab_size]

    def _embed(self, idx: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        return self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None):
        """(logits for every position of `idx` (B, T), None), or given targets (None, mean cross-entropy).

        With targets the logits are never materialised: the loss comes a block of rows at a time
        (model/loss.py), which is most of a training step's time and memory.
        """
        T = idx.shape[1]
        if T > self.config.block_size:
            raise ValueError(f"sequence of {T} tokens exceeds the context of {self.config.block_size}")
        x = self._embed(idx, torch.arange(T, device=idx.device))
        for block in self.transformer.h:
            x = block(x)
        if targets is None:
            return self._logits(x), None
        if not isinstance(self.lm_head, nn.Linear):  # a packed or quantized head holds no plain weight matrix
            return None, F.cross_entropy(self._logits(x).flatten(0, 1).float(), targets.flatten(), ignore_index=-1)
        weight = self.lm_head.weight
        if weight.shape[0] > self.config.vocab_size:  # padding rows, never trained towards
            weight = weight[: self.config.vocab_size]
        return None, linear_cross_entropy(self.transformer.ln_f(x).flatten(0, 1), weight, targets.flatten())

    def prefill(self, prompts: torch.Tensor, cache: KVCache, row: int, lengths: list[int] | None = None):
        """Run prompts (B, T) into cache rows `row`.. `row + B - 1`; return the logits (B, V) after each
        prompt's last token (`lengths[i]` tokens of row i are the prompt, the rest padding; default T).

        The engine prefills one prompt at a time unless told otherwise: prompts padded to a common
        length meet kernels chosen for the longest one, and their numbers would depend on which
        prompts arrived together. Padding goes after a prompt, where causal attention keeps it out of
        the prompt's numbers, and decode overwrites its cache entries.
        """
        B, T = prompts.shape
        x = self._embed(prompts, torch.arange(T, device=prompts.device))
        for layer, block in enumerate(self.transformer.h):
            x = block.prefill(x, cache, layer, row)
        last = [T - 1] * B if lengths is None else [n - 1 for n in lengths]
        return self._logits(x[list(range(B)), last])

    def decode(
        self, idx: torch.Tensor, rows: list[int], positions: list[int], cache: KVCache, batch_invariant: bool = True
    ) -> torch.Tensor:
        """One token per cache row: `idx[i]` goes to `positions[i]` of row `rows[i]`; return logits.

        Entries of `idx` beyond `rows` are padding: they pass through the matrix products (whose
        kernels some row counts suit) but neither attend nor touch the cache. Without
        `batch_invariant`, attention is one call for the batch, each row masked to its own prefix.
        """
        pos = torch.tensor(positions, device=idx.device)
        row_index = torch.tensor(rows, device=idx.device)
        if batch_invariant:
            attend = decode_runs(rows, positions)
        else:
            if rows != list(range(rows[0], rows[0] + len(rows))):
                raise ValueError("decoding without batch invariance needs neighbouring cache rows")
            mask = torch.arange(max(positions) + 1, device=idx.device) <= pos[:, None]
            attend = MaskedSpan(rows[0], mask[:, None, None, :])
        padded = torch.cat([pos, pos.new_zeros(len(idx) - len(rows))])
        x = self._embed(idx[:, None], padded[:, None])
        for layer, block in enumerate(self.transformer.h):
            x = block.decode(x, cache, layer, row_index, pos, attend)
        return self._logits(x[:, 0])

    @torch.no_grad()
    def generate(self, idx: torch.Tensor, max_new_tokens: int, temperature: float = 1.0, top_k: int | None = None):
        """nanoGPT's convenience: continue each row of `idx` (B, T) by `max_new_tokens` tokens."""
        from model.generation import Engine, SamplingParams

        params = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, stop_at_eot=False)
        rows = [row.tolist() for row in idx]
        engine = Engine(self, max_batch_size=len(rows), max_seq_len=idx.shape[1] + max_new_tokens)
        outputs = engine.generate_tokens(rows, params)
        return torch.cat([idx, torch.tensor(outputs, dtype=idx.dtype, device=idx.device)], dim=1)

    @classmethod
    def from_pretrained(cls, name_or_path: str, **config_overrides) -> GPT:
        """GPT-2 weights from the Hugging Face hub (`gpt2` … `gpt2-xl`) or a `save_pretrained` directory."""
        from model.hf import load_hf

        return load_hf(name_or_path, **config_overrides)

    def save_pretrained(self, directory) -> None:
        """Write a directory that `transformers.GPT2LMHeadModel.from_pretrained` loads."""
        from model.hf import save_hf

        save_hf(self, directory)

    def replace_linears(self, make, kinds: tuple[type, ...] = (nn.Linear,)) -> GPT:
        """Swap every linear layer (every module of `kinds`), the LM head included, for `make(linear)`,
        in place; return the model.

        The LM head gets its own replacement of the tied embedding, which the input lookup keeps using.
        """
        for module in list(self.modules()):
            for name, child in list(module.named_children()):
                if isinstance(child, kinds):
                    setattr(module, name, make(child))
        return self
