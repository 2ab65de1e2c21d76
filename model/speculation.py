"""Speculative decoding that changes no token: where drafts come from, and how many to check.

A decode pass can check several proposed tokens of a request at once: entries for its last token and
each draft token, on its cache row at consecutive positions. Each entry's logits are the ones a plain
one-token decode step would compute there (the engine's batch invariance holds at any entry count),
and each position's random key is fixed by the request's seed and the position alone
(`Sequence.key`), so the token sampled at each checked position is exactly plain decoding's. A
draft token is kept if and only if it equals that token. Drafts only ever decide how soon tokens
come, never which.

Two sources propose drafts:
- `PromptLookup`: the tokens that followed the most recent earlier occurrence of the text's last few
  tokens (in the prompt or the text so far). Free, and right on rewriting, code and repeated structure.
- `DraftModel`: a small model with the same tokenizer continues the text, sampling each position with
  the request's own settings and random key. Where its distribution is close to the target's, the
  same key picks the same token (the Gumbel coupling of model.sampling).

`Planner` decides each request's draft length every step: it weighs each request's measured
acceptance against what an extra checked entry (and a draft model pass) costs, from the engine's own
timings, and drafts only while a token more is worth its time. At large, compute-bound batches and for
requests whose drafts keep missing, it stops drafting.
"""

from __future__ import annotations

import heapq
import time
from array import array
from collections import Counter
from dataclasses import dataclass, field

import torch

from model.gpt import GPT, KVCache
from model.sampling import sample

LOOKUP = "lookup"
DRAFT = "draft"
SOURCES = (LOOKUP, DRAFT)

MAX_DRAFT = 8  # tokens checked beyond the one every step yields
LOOKUP_NGRAMS = (4, 3, 2)  # suffix lengths matched, longest first: one token alone matches too much noise
# Acceptance is a decayed count of kept and missed draft positions, so that it follows a request
# through text that turns repetitive and back. A fresh request starts from the rate of the engine's
# recent checks of that source for requests that sample as it does (greedy or not: a draft kept every
# time in greedy text can be kept one time in eight in sampled text), even odds before any, weighed as
# PRIOR_WEIGHT positions. Starting each request at even odds, where a source's drafts keep missing, made
# every new request pay its first checks to learn it again (at 16 requests of 48 tokens, a draft model
# pass and 16 entries a batch).
ACCEPTANCE_DECAY = 0.9
PRIOR_WEIGHT = 2.0
# A request whose drafts are not worth checking tries one draft token again after this many steps,
# so that acceptance can recover when its text turns predictable (the cost: one entry in PROBE_EVERY).
# Each probe of a source that missed, in a row, across requests, doubles the wait, up to
# 2 ** MOST_PROBE_BACKOFF times: a probe costs a draft model's catch-up over the request's text and a
# sampled entry, and one per 48-token request cost 6-8% of the tokens/s where drafts never match.
PROBE_EVERY = 32
MOST_PROBE_BACKOFF = 3
# Until two entry counts have been timed, an extra entry is assumed to cost this share of a one-entry
# pass (a batch-1 pass mostly reads weights); the first speculative passes measure the real cost.
PRIOR_ENTRY_SHARE = 0.1
# Timings follow the fastest passes: a pass timed above the estimate moves it up by this share of the
# difference only, one below replaces it. Other processes on the machine slow passes down at random, and
# an estimate that followed them would price an extra entry at whatever the load added between a
# one-entry pass and a longer one: on a loaded machine the planner then stopped drafting altogether, and
# with no longer passes timed it never learnt otherwise. A machine that truly got slower still shows in
# the estimates within some tens of passes.
TIMING_RISE = 0.05


@dataclass
class Acceptance:
    """How often a request's drafts from one source were kept, position by position."""

    kept: float = 1.0
    missed: float = 1.0

    @property
    def rate(self) -> float:
        return self.kept / (self.kept + self.missed)

    def update(self, proposed: int, accepted: int) -> None:
        self.kept = self.kept * ACCEPTANCE_DECAY + accepted
        self.missed = self.missed * ACCEPTANCE_DECAY + (accepted < proposed)

    def prior(self) -> Acceptance:
        """A fresh request's acceptance: this rate, weighed as PRIOR_WEIGHT positions."""
        return Acceptance(PRIOR_WEIGHT * self.rate, PRIOR_WEIGHT * (1 - self.rate))


@dataclass
class DraftState:
    """One request's speculation: acceptance by source, steps since it last drafted, draft cache fill."""

    acceptance: dict[str, Acceptance] = field(default_factory=dict)  # by source, from its first plan on
    idle_steps: int = 0
    probing: bool = False  # its next check is a probe
    draft_model: object = None  # the DraftModel whose cache row holds `cached` tokens of this request
    cached: int = 0


@dataclass
class Stats:
    """Cumulative counts, read by the service's metrics."""

    proposed: Counter = field(default_factory=Counter)  # draft tokens checked, by source
    accepted: Counter = field(default_factory=Counter)  # draft tokens kept, by source


class PromptLookup:
    """Drafts from the text itself: what followed the latest earlier occurrence of its last n tokens."""

    def propose(self, context: list[int], most: int) -> list[int]:
        if most < 1 or len(context) < 2:
            return []
        haystack = array("I", context).tobytes()
        for n in LOOKUP_NGRAMS:
            if n >= len(context):
                continue
            needle = haystack[-4 * n :]
            end = len(haystack) - 4  # an occurrence ending before the last token: never the suffix itself
            while (found := haystack.rfind(needle, 0, end)) >= 0:
                if found % 4 == 0:  # token-aligned
                    return repeat(context, found // 4 + n, most)
                end = found + len(needle) - 1
        return []


def repeat(context: list[int], start: int, most: int) -> list[int]:
    """Up to `most` tokens copied from `context[start:]` onwards, the copy running on into the tokens it
    proposes: where the match is a few tokens back (a line or a word repeated over and over), it
    continues the repetition rather than stopping at the end of the text."""
    copied = context[start : start + most]
    period = len(context) - start  # the copy's distance back: all of it was copied if it falls short of most
    while len(copied) < most:
        copied.append(copied[-period])
    return copied


class DraftModel:
    """A small model proposing continuations, with a KV cache whose rows mirror the engine's batch rows."""

    def __init__(self, model: GPT, max_batch: int, max_len: int):
        self.model = model.eval()
        param = next(model.parameters())
        self.device = param.device
        self.max_len = min(max_len, model.config.block_size)
        self.cache = KVCache(model.config, max_batch, self.max_len, param.dtype, param.device)

    def fits(self, context_len: int, drafts: int) -> bool:
        """Whether the cache can hold `context_len` tokens plus the drafts fed back to make `drafts`."""
        return context_len + drafts - 1 <= self.max_len

    def propose(self, rows: list[int], seqs, depth: list[int], params) -> list[list[int]]:
        """`depth[i]` draft tokens for each sequence `seqs[i]` on cache row `rows[i]`, each sampled with its
        request's settings (`params`: per-sequence temperature, top-k, top-p) and random key."""
        for seq in seqs:
            if seq.draft.draft_model is not self:
                seq.draft.draft_model, seq.draft.cached = self, 0
        drafts: list[list[int]] = [[] for _ in seqs]
        # The first draft of each row: the logits after its whole context, from what its cache row lacks.
        logits = []
        entries, owners, positions, cache_rows = [], [], [], []
        for i, (row, seq) in enumerate(zip(rows, seqs)):
            context = seq.prompt + seq.tokens
            if seq.draft.cached == 0:
                logits.append((i, self.model.prefill(torch.tensor([context], device=self.device), self.cache, row)[0]))
            else:
                missing = range(seq.draft.cached, len(context))
                entries += context[missing.start :]
                positions += list(missing)
                cache_rows += [row] * len(missing)
                owners.append((i, len(entries) - 1))
            seq.draft.cached = len(context)
        if entries:
            out = self._decode(entries, cache_rows, positions)
            logits += [(i, out[last]) for i, last in owners]
        logits.sort(key=lambda pair: pair[0])
        active = list(range(len(seqs)))
        for level in range(max(depth)):
            if level:
                active = [i for i in active if depth[i] > level]
                tokens = [drafts[i][-1] for i in active]
                out = self._decode(tokens, [rows[i] for i in active], [seqs[i].draft.cached for i in active])
                for i in active:
                    seqs[i].draft.cached += 1
                logits = list(zip(active, out))
            chosen = [i for i, _ in logits]
            stacked = torch.stack([row for _, row in logits])
            keys = torch.tensor([seqs[i].key(len(seqs[i].tokens) + level) for i in chosen], device=self.device)
            picked = sample(stacked, *(p[chosen] for p in params), keys).tolist()
            for i, token in zip(chosen, picked):
                drafts[i].append(token)
        return drafts

    def _decode(self, tokens: list[int], rows: list[int], positions: list[int]) -> torch.Tensor:
        return self.model.decode(torch.tensor(tokens, device=self.device), rows, positions, self.cache)

    @staticmethod
    def kept(seq, context_len: int, accepted: int) -> None:
        """After a check: the draft cache row is valid up to the context plus the drafts that were kept."""
        seq.draft.cached = min(seq.draft.cached, context_len + accepted)


def sampled(seqs) -> bool:
    """Whether a pass over `seqs` samples any row (a top-k or top-p draw), not only argmaxes."""
    return any(seq.params.temperature > 0 for seq in seqs)


class PassCost:
    """What a target pass and its sampling cost by its number of entries (seconds = fixed + per_entry *
    entries), fitted to the passes timed so far, and what a draft model pass costs. Passes that sample
    are timed apart from greedy ones: a top-k draw over the vocabulary costs each entry more than the
    pass itself at batch 1 (mini on the CPU: 1 ms against 0.3), so greedy timings underprice a sampled
    entry, and sampled drafts that were kept one time in eight cost a tenth of the tokens/s.

    Passes are timed in the CPU time of the thread that runs them (`time.thread_time`), not on the wall
    clock: on a shared machine the wall clock also counts the time other processes held the core, at
    random, and a few such passes priced an extra entry at most of a pass, so that the planner stopped
    drafting where drafts paid (its own passes cost the same with or without the load)."""

    def __init__(self):
        self.timed: dict[bool, dict[int, float]] = {False: {}, True: {}}  # by whether the pass sampled
        self.draft_pass = 0.0

    def observe(self, entries: int, seconds: float, sampling: bool = False) -> None:
        timed = self.timed[sampling]
        timed[entries] = fastest(timed.get(entries), seconds)

    def observe_draft(self, passes: int, seconds: float) -> None:
        if passes:
            self.draft_pass = fastest(self.draft_pass or None, seconds / passes)

    def fit(self, sampling: bool = False) -> tuple[float, float]:
        seconds = self.timed[sampling] or self.timed[not sampling]  # the other kind until this one is timed
        if not seconds:
            return 1.0, PRIOR_ENTRY_SHARE
        if len(seconds) == 1:
            [(n, t)] = seconds.items()
            per_entry = PRIOR_ENTRY_SHARE * t / n
            return t - per_entry * n, per_entry
        points = list(seconds.items())
        mean_n = sum(n for n, _ in points) / len(points)
        mean_t = sum(t for _, t in points) / len(points)
        spread = sum((n - mean_n) ** 2 for n, _ in points)
        per_entry = max(sum((n - mean_n) * (t - mean_t) for n, t in points) / spread, 0.0)
        return max(mean_t - per_entry * mean_n, 0.0), per_entry


def fastest(estimate: float | None, seconds: float) -> float:
    """The estimate after a pass of `seconds`: the lower envelope of the timings (see TIMING_RISE)."""
    if estimate is None or seconds < estimate:
        return seconds
    return estimate + TIMING_RISE * (seconds - estimate)


class Planner:
    """Each running request's draft source and length for the next pass."""

    def __init__(self, lookup: bool, draft: DraftModel | None, fixed_length: int | None = None):
        if fixed_length is not None and not 1 <= fixed_length <= MAX_DRAFT:
            raise ValueError(f"a fixed draft length must be between 1 and {MAX_DRAFT}, got {fixed_length}")
        self.lookup = PromptLookup() if lookup else None
        self.draft = draft
        self.fixed_length = fixed_length  # every request drafts this many wherever it can, whatever it pays
        self.cost = PassCost()
        self.stats = Stats()
        # By (source, whether the request samples): every request's checks, and probes in a row that kept nothing.
        self.recent = {(source, sampling): Acceptance() for source in SOURCES for sampling in (False, True)}
        self.missed_probes = Counter()

    def acceptance(self, seq, source: str) -> Acceptance:
        """The request's acceptance of `source`'s drafts; a request new to it starts from `recent`'s rate."""
        if source not in seq.draft.acceptance:
            seq.draft.acceptance[source] = self.recent[source, sampled([seq])].prior()
        return seq.draft.acceptance[source]

    def plan(self, seqs) -> tuple[list[str | None], list[list[int]], list[int]]:
        """(source, lookup drafts, draft length) per sequence. Draft lengths for the draft model are only
        numbers here: its tokens come from `DraftModel.propose` once every length is known."""
        fixed, per_entry = self.cost.fit(sampled(seqs))
        sources: list[str | None] = [None] * len(seqs)
        found: list[list[int]] = [[] for _ in seqs]
        room = [0] * len(seqs)
        for i, seq in enumerate(seqs):
            if not seq.params.speculate:
                continue
            most = min(MAX_DRAFT, seq.params.max_new_tokens - len(seq.tokens) - 1)
            if most < 1:
                continue
            if self.lookup is not None:
                found[i] = self.lookup.propose(seq.prompt + seq.tokens, most)
            if found[i]:
                sources[i], room[i] = LOOKUP, len(found[i])
            elif self.draft is not None and self.draft.fits(len(seq.prompt) + len(seq.tokens), 1):
                sources[i] = DRAFT
                context = len(seq.prompt) + len(seq.tokens)
                room[i] = max(k for k in range(1, most + 1) if self.draft.fits(context, k))
        if self.fixed_length is None:
            depth = self._lengths(seqs, sources, room, fixed, per_entry)
        else:
            depth = [min(r, self.fixed_length) for r in room]
        for i, seq in enumerate(seqs):
            seq.draft.idle_steps = 0 if depth[i] else seq.draft.idle_steps + 1
        return sources, found, depth

    def _lengths(self, seqs, sources, room, fixed, per_entry) -> list[int]:
        """Greedy: add the draft token with the best expected gain while it beats the pass's tokens per
        second. Draft token j of a request is used only if the j before it were kept: its expected
        gain is acceptance ** j."""
        depth = [0] * len(seqs)
        tokens = float(len(seqs))
        seconds = fixed + per_entry * len(seqs)
        draft_levels = 0
        heap = []
        for i, source in enumerate(sources):
            if source is None:
                continue
            rate = self.acceptance(seqs[i], source).rate
            backoff = min(self.missed_probes[source, sampled(seqs[i : i + 1])], MOST_PROBE_BACKOFF)
            if seqs[i].draft.idle_steps + 1 >= PROBE_EVERY << backoff:
                rate = max(rate, 1.0)  # a probe: one draft token, whatever acceptance says
                seqs[i].draft.probing = True
            heapq.heappush(heap, (-rate, i, rate))
        while heap:
            _, i, gain = heapq.heappop(heap)
            cost = per_entry + (self.cost.draft_pass if sources[i] == DRAFT and depth[i] + 1 > draft_levels else 0.0)
            probe = gain >= 1.0 and depth[i] == 0
            if not probe and gain * seconds <= tokens * cost:
                break
            depth[i] += 1
            tokens += gain
            seconds += cost
            if sources[i] == DRAFT:
                draft_levels = max(draft_levels, depth[i])
            if depth[i] < room[i] and not probe:
                rate = self.acceptance(seqs[i], sources[i]).rate
                heapq.heappush(heap, (-(rate ** (depth[i] + 1)), i, rate ** (depth[i] + 1)))
        return depth

    def drafts(self, rows: list[int], seqs, sources, found, depth, params) -> list[list[int]]:
        """Every sequence's draft tokens: its lookup drafts cut to length, or the draft model's."""
        drafts = [found[i][: depth[i]] if sources[i] == LOOKUP else [] for i in range(len(seqs))]
        wanted = [i for i in range(len(seqs)) if sources[i] == DRAFT and depth[i]]
        if wanted:
            started = time.thread_time()
            index = torch.tensor(wanted)
            proposed = self.draft.propose(
                [rows[i] for i in wanted], [seqs[i] for i in wanted], [depth[i] for i in wanted],
                [p[index.to(p.device)] for p in params],
            )  # fmt: skip
            self.cost.observe_draft(max(depth[i] for i in wanted), time.thread_time() - started)
            for i, tokens in zip(wanted, proposed):
                drafts[i] = tokens
        return drafts

    def checked(self, seq, source: str, context_len: int, proposed: int, accepted: int) -> None:
        """Record how a sequence's drafts fared."""
        self.acceptance(seq, source).update(proposed, accepted)
        key = source, sampled([seq])
        self.recent[key].update(proposed, accepted)
        if accepted:
            self.missed_probes[key] = 0
        elif seq.draft.probing:
            self.missed_probes[key] += 1
        seq.draft.probing = False
        self.stats.proposed[source] += proposed
        self.stats.accepted[source] += accepted
        if source == DRAFT:
            DraftModel.kept(seq, context_len, accepted)
