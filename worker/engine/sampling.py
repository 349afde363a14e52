"""Per-row sampling for a batch whose rows each carry their own parameters.

Rows with temperature 0 (or below SAMPLING_EPS, or top_k 1) take the argmax; the others are tempered,
cut to their own top-k and top-p, and drawn (from their own seeded generator when they have a seed, so
a seeded turn gives the same reply whatever else shares its batch).

One row's parameters can never fail its batch: logits a tiny temperature or repetition penalty pushed
to infinity are clamped, and a row whose probabilities still came out invalid takes its most likely
token, so the batch's one multinomial draw always has valid rows.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from shared.sampling import SamplingParams


def apply_repetition_penalty(
    logits: torch.Tensor, history: Sequence[Sequence[int]], penalties: Sequence[float]
) -> None:
    """CTRL's penalty, in place: seen tokens' positive logits are divided, negative multiplied."""
    for i, (seen, p) in enumerate(zip(history, penalties)):
        if p == 1.0 or not seen:
            continue
        idx = torch.tensor(sorted(set(seen)), device=logits.device)
        vals = logits[i, idx]
        logits[i, idx] = torch.where(vals > 0, vals / p, vals * p)


def filter_top_k_top_p(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """logits (rows, vocab) with everything outside each row's top-k and nucleus set to -inf."""
    vocab = logits.shape[-1]
    k = torch.where(top_k <= 0, vocab, top_k.clamp(max=vocab))
    sorted_logits, sorted_idx = torch.sort(logits, dim=-1, descending=True)
    ranks = torch.arange(vocab, device=logits.device).unsqueeze(0)
    drop = ranks >= k.unsqueeze(1)
    probs = torch.softmax(sorted_logits.masked_fill(drop, float("-inf")), dim=-1)
    before = torch.cumsum(probs, dim=-1) - probs  # mass of the better tokens
    drop |= before >= top_p.unsqueeze(1)  # keep the smallest prefix whose mass reaches top_p
    drop[:, 0] = False  # the most likely token always survives
    return logits.scatter(1, sorted_idx, sorted_logits.masked_fill(drop, float("-inf")))


def sample(
    logits: torch.Tensor,
    params: Sequence[SamplingParams],
    generators: Sequence[torch.Generator | None],
    history: Sequence[Sequence[int]] | None = None,
) -> list[int]:
    """One token per row. `logits` (rows, vocab) are already cut to the tokenizer's real ids."""
    logits = logits.float()
    if history is not None and any(p.repetition_penalty != 1.0 for p in params):
        apply_repetition_penalty(logits, history, [p.repetition_penalty for p in params])
    out = logits.argmax(dim=-1)
    rows = [i for i, p in enumerate(params) if not p.greedy]
    if rows:
        idx = torch.tensor(rows, device=logits.device)
        sub = logits[idx] / torch.tensor([params[i].temperature for i in rows], device=logits.device).unsqueeze(1)
        sub = torch.nan_to_num(sub, nan=float("-inf"), posinf=1e30)  # overflowed: huge, not inf (inf - inf = nan)
        sub = filter_top_k_top_p(
            sub,
            torch.tensor([params[i].top_k for i in rows], device=logits.device),
            torch.tensor([params[i].top_p for i in rows], device=logits.device),
        )
        probs = torch.softmax(sub, dim=-1)
        # Without a host sync: a row whose probabilities are not a distribution gets its argmax as one.
        ok = torch.isfinite(probs).all(dim=-1, keepdim=True) & (probs.sum(dim=-1, keepdim=True) > 0)
        onehot = torch.zeros_like(probs).scatter_(1, sub.argmax(dim=-1, keepdim=True), 1.0)
        probs = torch.where(ok, probs, onehot)
        # Unseeded rows draw together (one kernel, not one per row); a seeded row draws from its own
        # generator, so its reply doesn't depend on its batch mates.
        free = [j for j, i in enumerate(rows) if generators[i] is None]
        if free:
            draws = torch.multinomial(probs[torch.tensor(free, device=logits.device)], 1).view(-1)
            out[torch.tensor([rows[j] for j in free], device=logits.device)] = draws
        for j, i in enumerate(rows):
            if generators[i] is not None:
                out[i] = torch.multinomial(probs[j], 1, generator=generators[i])[0]
    return out.tolist()
