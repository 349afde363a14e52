"""worker/engine/sampling.py: per-row filters and the repetition penalty."""

import torch

from shared.sampling import SamplingParams
from worker.engine.sampling import filter_top_k_top_p, sample


def test_repetition_penalty_steers_greedy_away_from_seen_tokens():
    logits = torch.tensor([[1.0, 3.0, 2.9], [1.0, 3.0, 2.9]])
    params = [SamplingParams(temperature=0, repetition_penalty=2.0), SamplingParams(temperature=0)]
    assert sample(logits, params, [None, None], [[1], [1]]) == [2, 1]  # only the penalised row moves


def test_top_k_and_top_p_keep_each_rows_own_set():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05], [0.5, 0.3, 0.15, 0.05]]))
    out = filter_top_k_top_p(logits, torch.tensor([2, 0]), torch.tensor([1.0, 0.7]))
    assert torch.isfinite(out).tolist() == [[True, True, False, False], [True, True, False, False]]
    out = filter_top_k_top_p(logits, torch.tensor([0, 0]), torch.tensor([1.0, 0.4]))
    assert torch.isfinite(out).sum(dim=1).tolist() == [4, 1]
