"""The seed-style training loop the trainer is measured against.

Written the way the seed (and the course it came from) trains: fp32 throughout, attention as an
explicit masked softmax over a materialised T×T matrix, no compilation, AdamW with default betas
and weight decay on every parameter, batches stacked in a Python list. It trains on the same
tokens and is evaluated on the same validation batches as the trainer, so only the loop differs.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
from torch.nn import functional as F

from model import GPTConfig
from trainer.data import Dataset


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.n_head = config.n_head
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd)
        T = config.block_size
        self.register_buffer("bias", torch.tril(torch.ones(T, T)).view(1, 1, T, T))

    def forward(self, x):
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1)))
        att = att.masked_fill(self.bias[:, :, :T, :T] == 0, float("-inf"))
        att = F.softmax(att, dim=-1)
        y = (att @ v).transpose(1, 2).contiguous().view(B, T, C)
        return self.c_proj(y)


class Block(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd)
        C = config.n_embd
        self.mlp = nn.Sequential(nn.Linear(C, 4 * C), nn.GELU(approximate="tanh"), nn.Linear(4 * C, C))

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class ReferenceGPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.wpe = nn.Embedding(config.block_size, config.n_embd)
        self.h = nn.ModuleList([Block(config) for _ in range(config.n_layer)])
        self.ln_f = nn.LayerNorm(config.n_embd)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.wte.weight = self.lm_head.weight
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)

    def forward(self, idx, targets=None):
        T = idx.size(1)
        x = self.wte(idx) + self.wpe(torch.arange(T, device=idx.device))
        for block in self.h:
            x = block(x)
        logits = self.lm_head(self.ln_f(x))
        loss = None if targets is None else F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1))
        return logits, loss


class ReferenceTrainer:
    """The seed's loop, one `train_step` at a time so a benchmark can time it beside the trainer."""

    def __init__(self, config: GPTConfig, dataset: Dataset, batch_size: int, seq_len: int, steps: int,
                 lr: float = 6e-4, min_lr: float = 6e-5, warmup_steps: int = 100, seed: int = 1337):
        torch.manual_seed(seed)
        self.model = ReferenceGPT(config)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=lr, weight_decay=0.1)
        self.train_data = dataset.train.to(torch.long)
        self.dataset, self.batch_size, self.seq_len, self.seed = dataset, batch_size, seq_len, seed
        self.lr, self.min_lr, self.warmup_steps, self.steps = lr, min_lr, warmup_steps, steps
        self.step = 0

    def get_lr(self, it: int) -> float:
        if it < self.warmup_steps:
            return self.lr * (it + 1) / self.warmup_steps
        if it > self.steps:
            return self.min_lr
        ratio = (it - self.warmup_steps) / (self.steps - self.warmup_steps)
        return self.min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (self.lr - self.min_lr)

    def get_batch(self):
        data, T = self.train_data, self.seq_len
        ix = torch.randint(len(data) - T, (self.batch_size,))
        x = torch.stack([data[i : i + T] for i in ix])
        y = torch.stack([data[i + 1 : i + 1 + T] for i in ix])
        return x, y

    def train_step(self) -> float:
        for group in self.optimizer.param_groups:
            group["lr"] = self.get_lr(self.step)
        x, y = self.get_batch()
        _, loss = self.model(x, y)
        self.optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.optimizer.step()
        self.step += 1
        return loss.item()

    @torch.no_grad()
    def evaluate(self, eval_iters: int) -> float:
        """Loss on the validation batches the trainer's `evaluate` uses (same generator seed)."""
        generator = torch.Generator().manual_seed(self.seed + 1)
        offsets = self.dataset.offsets("val", eval_iters * self.batch_size, self.seq_len, generator)
        self.model.eval()
        losses = [
            self.model(*self.dataset.batch("val", chunk, self.seq_len, torch.device("cpu")))[1].item()
            for chunk in offsets.view(eval_iters, self.batch_size)
        ]
        self.model.train()
        return sum(losses) / eval_iters
