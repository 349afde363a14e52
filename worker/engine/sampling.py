"""Per-row sampling for a batch whose rows each carry their own parameters.

Rows with temperature 0 (or below SAMPLING_EPS, or top_k 1) take the argmax; the others are tempered,
cut to their own top-k and top-p, and drawn (from their own seeded generator when they have a seed, so
a seeded turn gives the same reply whatever else shares its batch).

Top-k is a partial selection (`torch.topk`, the batch's largest k), not a sort of the vocabulary: on
2 CPU cores sorting 49,152 logits took ~8 ms a row, top-50 ~0.1 ms (`python -m tests.bench.sampling`).
Only a row with no top-k and a top-p below 1 needs every token ranked, and only then is the vocabulary
sorted. Tokens are drawn among the kept candidates, not over the whole vocabulary.

One row's parameters can never fail its batch: logits a tiny temperature or repetition penalty pushed
to infinity are clamped, and a row whose probabilities still came out invalid takes its most likely
token, so the batch's one multinomial draw always has valid rows.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from shared.sampling import SamplingParams
from worker.engine.grammar import Allowed

History = tuple[Sequence[int], Sequence[int]]  # a row's prompt ids and reply ids so far


def apply_repetition_penalty(
    logits: torch.Tensor, history: Sequence[Sequence[int]], penalties: Sequence[float]
) -> None:
    """CTRL's penalty (Keskar et al. 2019, eq. 1), in place on `logits` (rows, vocab) float32: each row's
    seen tokens' positive logits are divided by its penalty, negative ones multiplied."""
    for i, (seen, p) in enumerate(zip(history, penalties)):
        if p == 1.0 or not seen:
            continue
        idx = torch.tensor(sorted(set(seen)), device=logits.device)
        vals = logits[i, idx]
        logits[i, idx] = torch.where(vals > 0, vals / p, vals * p)


def apply_penalties(logits: torch.Tensor, params: Sequence[SamplingParams], history: Sequence[History]) -> None:
    """Every row's repetition penalty (over its prompt and reply), then OpenAI's frequency and presence
    penalties (over its reply only: logit -= frequency_penalty * count + presence_penalty * (count > 0), from
    OpenAI's "Parameter details" and vLLM's apply_penalties), in place on `logits` (rows, vocab) float32."""
    for i, (p, (prompt, generated)) in enumerate(zip(params, history)):
        if p.repetition_penalty != 1.0:
            apply_repetition_penalty(logits[i : i + 1], [[*prompt, *generated]], [p.repetition_penalty])
        if (p.frequency_penalty or p.presence_penalty) and generated:
            ids, counts = torch.unique(torch.tensor(generated, device=logits.device), return_counts=True)
            logits[i, ids] -= p.frequency_penalty * counts.float() + p.presence_penalty


def needs_history(p: SamplingParams) -> bool:
    """The row's penalties read its tokens so far (the engine hands them over only then)."""
    return p.repetition_penalty != 1.0 or p.frequency_penalty != 0.0 or p.presence_penalty != 0.0


def _ranked(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's `k` largest logits, descending, and their token ids: (rows, k) float, (rows, k) int64."""
    if k >= logits.shape[-1]:
        return torch.sort(logits, dim=-1, descending=True)
    return torch.topk(logits, k, dim=-1)


def _cut(ranked: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """`ranked` (rows, k) descending logits with each row's tokens past its own top-k (`top_k` (rows,)
    int, already within 1..k) and outside its nucleus (`top_p` (rows,) in (0, 1]) set to -inf. The
    nucleus is the smallest prefix whose probability reaches top_p (Holtzman et al. 2020), taken over
    what top-k kept; the most likely token always survives."""
    ranks = torch.arange(ranked.shape[-1], device=ranked.device).unsqueeze(0)
    drop = ranks >= top_k.unsqueeze(1)
    probs = torch.softmax(ranked.masked_fill(drop, float("-inf")), dim=-1)
    before = torch.cumsum(probs, dim=-1) - probs  # mass of the better tokens
    drop |= before >= top_p.unsqueeze(1)
    drop[:, 0] = False
    return ranked.masked_fill(drop, float("-inf"))


def _own_k(p: SamplingParams, vocab: int) -> int:
    """How many candidates the row keeps before top-p: its top_k, or the whole vocabulary (0 = no top-k)."""
    return vocab if p.top_k <= 0 else min(p.top_k, vocab)


def filter_top_k_top_p(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """logits (rows, vocab) with everything outside each row's top-k (`top_k` (rows,) int, 0 = none) and
    nucleus (`top_p` (rows,) float) set to -inf."""
    vocab = logits.shape[-1]
    k = torch.where(top_k <= 0, vocab, top_k.clamp(max=vocab))
    vals, idx = _ranked(logits, int(k.max()))
    return torch.full_like(logits, float("-inf")).scatter(1, idx, _cut(vals, k, top_p))


@dataclass
class RowLogprob:
    """One row's sampled token's log probability (natural log) and its top alternatives as (token id, logprob),
    most likely first."""

    logprob: float
    top: list[tuple[int, float]]


@dataclass
class Draw:
    """A step's sampling: one token id per row, and per row its RowLogprob when it asked (None = no row asked)."""

    tokens: list[int]
    logprobs: list[RowLogprob | None] | None


@dataclass
class _Rows:
    """The drawing rows of one batch composition, as tensors built once (kept while it lasts)."""

    params: tuple[SamplingParams, ...]  # held, so that `is` comparisons stay meaningful
    drawn: list[int]  # rows that draw (not greedy), in batch order
    drawn_idx: torch.Tensor  # (len(drawn),) int64
    temperature: torch.Tensor  # (len(drawn), 1) float32
    top_k: torch.Tensor  # (len(drawn),) int64, each within 1..k
    top_p: torch.Tensor  # (len(drawn),) float32
    k: int  # candidates ranked per row: the largest top-k among them (the vocabulary if one has none)
    cut: bool  # some row filters (a top-k below the vocabulary or a top-p below 1)
    # logit_bias of every row, flattened: logits[bias_rows[j], bias_ids[j]] += bias_vals[j]; None = no row has one
    bias: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None


class Sampler:
    """`sample` for a decode loop: the per-row parameter tensors are built when the batch's rows change
    (a sequence joins or leaves), not every step."""

    def __init__(self) -> None:
        self._rows: _Rows | None = None

    def _for(self, params: Sequence[SamplingParams], vocab: int, device: torch.device) -> _Rows:
        rows = self._rows
        if (rows is not None and len(rows.params) == len(params)
                and all(a is b for a, b in zip(rows.params, params))):
            return rows
        drawn = [i for i, p in enumerate(params) if not p.greedy]
        ks = [_own_k(params[i], vocab) for i in drawn]
        k = max(ks, default=1)
        top_p = [params[i].top_p for i in drawn]
        bias = None
        if any(p.logit_bias for p in params):
            flat = [(i, t, b) for i, p in enumerate(params) for t, b in p.logit_bias.items() if t < vocab]
            bias = (torch.tensor([f[0] for f in flat], device=device, dtype=torch.long),
                    torch.tensor([f[1] for f in flat], device=device, dtype=torch.long),
                    torch.tensor([f[2] for f in flat], device=device, dtype=torch.float32))
        self._rows = rows = _Rows(
            tuple(params),
            drawn,
            torch.tensor(drawn, device=device, dtype=torch.long),
            torch.tensor([params[i].temperature for i in drawn], device=device).unsqueeze(1),
            torch.tensor(ks, device=device, dtype=torch.long),
            torch.tensor(top_p, device=device),
            k,
            any(x < vocab for x in ks) or any(p < 1.0 for p in top_p),
            bias,
        )
        return rows

    def draw(
        self,
        logits: torch.Tensor,
        params: Sequence[SamplingParams],
        generators: Sequence[torch.Generator | None],
        history: Sequence[History] | None = None,
        allowed: Allowed | None = None,
    ) -> Draw:
        """The rows' tokens, and the log probabilities of the rows that ask for them (`params.logprobs`).
        `logits` (rows, vocab), any float dtype, already cut to the tokenizer's real ids (modified in place when
        float32); `params` and `generators` (None = unseeded) per row; `history` each row's prompt and reply ids
        (needed when a row has a penalty: `needs_history`); `allowed` the tokens each constrained row's grammar
        allows (grammar.allowed_tokens; None = no such row). Order, as vLLM applies them: logit_bias, grammar mask,
        penalties, then greedy argmax or temperature, top-k, top-p and the draw."""
        logits = logits.float()  # processed in place from here on; log probabilities are read from it too
        out = self._pick_tokens(logits, params, generators, history, allowed)
        return Draw(out.tolist(), self._logprobs(logits, params, out))

    def _logprobs(self, logits: torch.Tensor, params: Sequence[SamplingParams], tokens: torch.Tensor
                  ) -> list[RowLogprob | None] | None:
        """For each row asking: its token's log probability and its top alternatives, from `logits` as processed
        (bias, mask, penalties: float32, modified in place by _pick_tokens), tempered unless greedy."""
        want = [i for i, p in enumerate(params) if p.logprobs is not None]
        if not want:
            return None
        idx = torch.tensor(want, device=logits.device)
        temps = torch.tensor([1.0 if params[i].greedy else params[i].temperature for i in want],
                             device=logits.device).unsqueeze(1)
        lp = torch.log_softmax(torch.nan_to_num(logits.index_select(0, idx) / temps, nan=float("-inf"),
                                                posinf=1e30, neginf=float("-inf")), dim=-1)
        chosen = lp.gather(1, tokens.index_select(0, idx).unsqueeze(1)).view(-1).tolist()
        k = max(params[i].logprobs or 0 for i in want)
        top_v, top_i = lp.topk(k, dim=-1) if k else (lp[:, :0], lp[:, :0].long())
        rows: list[RowLogprob | None] = [None] * len(params)
        for j, i in enumerate(want):
            n = params[i].logprobs or 0
            # Tokens a grammar ruled out (-inf) are no alternatives: at most the ones that could be drawn are listed.
            top = [(t, v) for t, v in zip(top_i[j, :n].tolist(), top_v[j, :n].tolist()) if v != float("-inf")]
            rows[i] = RowLogprob(chosen[j], top)
        return rows

    def _pick_tokens(self, logits: torch.Tensor, params: Sequence[SamplingParams],
                     generators: Sequence[torch.Generator | None], history: Sequence[History] | None,
                     allowed: Allowed | None) -> torch.Tensor:
        """draw's tokens, (rows,) int64, from float32 `logits` it processes in place (see draw)."""
        rows = self._for(params, logits.shape[-1], logits.device)
        if rows.bias is not None:
            logits.index_put_(rows.bias[:2], rows.bias[2], accumulate=True)
        if allowed is not None:
            rows_in = logits.index_select(0, allowed.rows.to(logits.device))
            # A row allowing nothing is left unmasked: its matcher refuses whatever it draws and fails it.
            drop = ~allowed.mask & allowed.mask.any(dim=-1, keepdim=True)
            logits.index_copy_(0, allowed.rows.to(logits.device), rows_in.masked_fill(drop.to(logits.device),
                                                                                       float("-inf")))
        if history is not None and any(needs_history(p) for p in params):
            apply_penalties(logits, params, history)
        out = logits.argmax(dim=-1)
        if not rows.drawn:
            return out
        sub = logits.index_select(0, rows.drawn_idx) / rows.temperature
        sub = torch.nan_to_num(sub, nan=float("-inf"), posinf=1e30)  # overflowed: huge, not inf (inf - inf = nan)
        free = [j for j, i in enumerate(rows.drawn) if generators[i] is None]
        if len(free) == len(rows.drawn):  # the usual batch: every drawing row in one kernel
            out[rows.drawn_idx] = _pick(sub, rows.k, rows.cut, rows.top_k, rows.top_p)
            return out
        if free:  # unseeded rows draw together: one kernel, not one per row
            f = torch.tensor(free, device=logits.device)
            out[rows.drawn_idx[f]] = _pick(sub[f], rows.k, rows.cut, rows.top_k[f], rows.top_p[f])
        vocab = logits.shape[-1]
        for j, i in enumerate(rows.drawn):
            if generators[i] is None:
                continue
            # A seeded row ranks and draws on its own, so its reply does not depend on its batch mates.
            k = _own_k(params[i], vocab)
            out[i] = _pick(sub[j : j + 1], k, k < vocab or params[i].top_p < 1.0, rows.top_k[j : j + 1],
                           rows.top_p[j : j + 1], generators[i])[0]
        return out


def _pick(logits: torch.Tensor, k: int, cut: bool, top_k: torch.Tensor, top_p: torch.Tensor,
          generator: torch.Generator | None = None) -> torch.Tensor:
    """One token id per row of tempered `logits` (rows, vocab): drawn among each row's top-k / nucleus
    candidates (`k` ranked per row), or over the whole vocabulary when no row cuts. (rows,) int64."""
    if not cut:
        return _draw(logits, generator)
    vals, idx = _ranked(logits, k)
    picked = _draw(_cut(vals, top_k, top_p), generator)
    return idx.gather(1, picked.unsqueeze(1)).view(-1)


def _draw(logits: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """One draw per row of `logits` (rows, n): position ids (rows,) int64. Without a host sync, a row whose
    probabilities are not a distribution takes its largest logit."""
    probs = torch.softmax(logits, dim=-1)
    ok = torch.isfinite(probs).all(dim=-1, keepdim=True) & (probs.sum(dim=-1, keepdim=True) > 0)
    onehot = torch.zeros_like(probs).scatter_(1, logits.argmax(dim=-1, keepdim=True), 1.0)
    probs = torch.where(ok, probs, onehot)
    return torch.multinomial(probs, 1, generator=generator).view(-1)


def sample(
    logits: torch.Tensor,
    params: Sequence[SamplingParams],
    generators: Sequence[torch.Generator | None],
    history: Sequence[History] | None = None,
    allowed: Allowed | None = None,
) -> list[int]:
    """The tokens of `Sampler().draw(...)` for a one-off batch (tests, benches): see Sampler.draw."""
    return Sampler().draw(logits, params, generators, history, allowed).tokens
