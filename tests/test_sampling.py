"""worker/engine/sampling.py: per-row filters, penalties, logit_bias and grammar masks."""

import math

import pytest
import torch

from shared.sampling import SamplingParams
from worker.engine.grammar import Allowed
from worker.engine.sampling import Sampler, filter_top_k_top_p, sample


def test_repetition_penalty_steers_greedy_away_from_seen_tokens():
    logits = torch.tensor([[1.0, 3.0, 2.9], [1.0, 3.0, 2.9]])
    params = [SamplingParams(temperature=0, repetition_penalty=2.0), SamplingParams(temperature=0)]
    assert sample(logits, params, [None, None], [([1], []), ([1], [])]) == [2, 1]  # only the penalised row moves


def test_top_k_and_top_p_keep_each_rows_own_set():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05], [0.5, 0.3, 0.15, 0.05]]))
    out = filter_top_k_top_p(logits, torch.tensor([2, 0]), torch.tensor([1.0, 0.7]))
    assert torch.isfinite(out).tolist() == [[True, True, False, False], [True, True, False, False]]
    out = filter_top_k_top_p(logits, torch.tensor([0, 0]), torch.tensor([1.0, 0.4]))
    assert torch.isfinite(out).sum(dim=1).tolist() == [4, 1]


def test_each_row_draws_from_its_own_distribution_and_seed():
    """Unseeded rows draw together, seeded ones from their own generator, greedy ones take the argmax:
    every row lands in its own allowed set, and a seeded row's draws ignore its batch mates."""
    vocab = 50
    logits = torch.zeros(5, vocab)
    for r in range(4):
        logits[r, 10 * r : 10 * r + 3] = 20.0  # row r's likely tokens: 10r .. 10r+2
    logits[1] = 0.0  # row 1 (seeded): flat over the whole vocabulary
    logits[4, 7] = 30.0  # the greedy row's argmax
    params = [SamplingParams(temperature=1.0, top_k=0 if r == 1 else 3) for r in range(4)]
    params.append(SamplingParams(temperature=0))

    def draws(batch: torch.Tensor, n: int = 12) -> list[list[int]]:
        gens: list[torch.Generator | None] = [None, torch.Generator().manual_seed(7), None, None, None]
        return [sample(batch.clone(), params, gens) for _ in range(n)]

    got = draws(logits)
    for out in got:
        assert all(10 * r <= out[r] < 10 * r + 3 for r in (0, 2, 3)) and out[4] == 7
    noisy = logits.clone()
    noisy[[0, 2, 3]] = torch.randn(3, vocab)  # other batch mates, same row 1
    assert [out[1] for out in draws(noisy)] == [out[1] for out in got]
    assert len({out[1] for out in got}) > 3  # row 1 really draws (flat over 50 tokens)


def test_one_rows_overflowing_parameters_never_fail_its_batch():
    """A temperature or repetition penalty so small the division overflows (1e-40, 1e-300) used to make
    the batch's one multinomial draw raise, failing every turn decoding beside it."""
    logits = torch.tensor([[1.0, 3.0, 2.0, 0.5]] * 4)
    params = [SamplingParams(temperature=1e-40, top_k=0),  # below SAMPLING_EPS: greedy
              SamplingParams(temperature=1.0, top_k=0, repetition_penalty=1e-300),
              SamplingParams(temperature=5e-6 + 1e-5, top_k=0, repetition_penalty=5e-324),
              SamplingParams(temperature=1.0, top_k=0)]
    assert params[0].greedy and not params[1].greedy
    for _ in range(20):
        out = sample(logits.clone(), params, [None] * 4, [([1], []), ([1], [2]), ([], [1]), ([], [])])
        assert out[0] == 1 and 0 <= out[3] < 4  # the healthy row still draws from its distribution
        assert out[1] in (1, 2) and out[2] == 1  # overflowed rows take their most likely token


def test_sampler_rebuilds_its_row_tensors_when_the_batch_changes():
    """A Sampler keeps the per-row tensors while the same parameter objects come back in the same order;
    a sequence joining, leaving or swapping places must never be sampled with another's parameters."""
    vocab = 200
    logits = torch.zeros(2, vocab)
    logits[:, :10] = torch.arange(10, 0, -1).float()  # tokens 0..9 most likely, in that order
    wide = SamplingParams(temperature=1.0, top_k=10)
    narrow = SamplingParams(temperature=1.0, top_k=2)  # tokens 0 and 1 only
    sampler = Sampler()
    seen: list[set[int]] = [set(), set()]
    for _ in range(60):
        a, b = sampler.draw(logits, [wide, narrow], [None, None]).tokens
        seen[0].add(a)
        seen[1].add(b)
    assert seen[1] <= {0, 1} and len(seen[0] - {0, 1}) > 0
    swapped = [set(), set()]
    for _ in range(60):  # the same objects, the other way round
        a, b = sampler.draw(logits, [narrow, wide], [None, None]).tokens
        swapped[0].add(a)
        swapped[1].add(b)
    assert swapped[0] <= {0, 1} and len(swapped[1] - {0, 1}) > 0
    assert all(t in (0, 1) for t in sampler.draw(logits[:1], [narrow], [None]).tokens for _ in range(20))


def test_a_row_without_top_k_but_with_top_p_keeps_its_nucleus_beside_top_k_rows():
    """The nucleus of a row with no top-k needs the whole vocabulary ranked; its batch mates' top-k must
    not cut it short (the batch ranks its largest k)."""
    vocab = 300
    logits = torch.full((2, vocab), -5.0)
    logits[:, :40] = 0.0  # 40 equally likely tokens hold nearly all the mass
    params = [SamplingParams(temperature=1.0, top_k=0, top_p=0.9), SamplingParams(temperature=1.0, top_k=3)]
    nucleus, topk = set(), set()
    for _ in range(80):
        a, b = sample(logits, params, [None, None])
        nucleus.add(a)
        topk.add(b)
    assert nucleus <= set(range(40)) and len(nucleus) > 10  # well past the mate's 3
    assert len(topk) <= 3 and topk <= set(range(40))


def test_a_seeded_row_draws_the_same_whatever_its_batch_mates_top_k():
    vocab = 500
    torch.manual_seed(0)
    logits = torch.randn(3, vocab)
    seeded = SamplingParams(temperature=1.0, top_k=40, seed=3)

    def draws(mate_k: int) -> list[int]:
        gen = torch.Generator().manual_seed(3)
        mates = [SamplingParams(temperature=1.0, top_k=mate_k), SamplingParams(temperature=0.7, top_p=0.5, top_k=0)]
        sampler = Sampler()
        return [sampler.draw(logits, [mates[0], seeded, mates[1]], [None, gen, None]).tokens[1] for _ in range(15)]

    assert draws(2) == draws(400) == draws(0)


def test_frequency_and_presence_penalties_follow_openais_formula_on_reply_tokens_only():
    """logit -= frequency_penalty * count + presence_penalty * (count > 0), over the reply (not the prompt)."""
    logits = torch.zeros(3, 6)
    history = [([5, 5, 5], [1, 1, 2])] * 3
    params = [SamplingParams(temperature=0, frequency_penalty=0.5),
              SamplingParams(temperature=0, presence_penalty=0.75),
              SamplingParams(temperature=0, frequency_penalty=-1.0, presence_penalty=0.5)]
    sample(logits, params, [None] * 3, history)
    assert logits[0].tolist() == [0.0, -1.0, -0.5, 0.0, 0.0, 0.0]  # counted per occurrence; prompt's 5 untouched
    assert logits[1].tolist() == [0.0, -0.75, -0.75, 0.0, 0.0, 0.0]  # once per token, however often
    assert logits[2].tolist() == [0.0, 1.5, 0.5, 0.0, 0.0, 0.0]  # negative: repetition encouraged


def test_penalties_move_greedy_decoding_in_the_documented_direction():
    logits = torch.tensor([[3.0, 2.9, 0.0]] * 3)
    history = [([], [0])] * 3
    params = [SamplingParams(temperature=0), SamplingParams(temperature=0, presence_penalty=0.5),
              SamplingParams(temperature=0, frequency_penalty=0.2)]
    assert sample(logits, params, [None] * 3, history) == [0, 1, 1]


def test_logit_bias_bans_and_forces_tokens_per_row_before_sampling():
    logits = torch.tensor([[5.0, 1.0, 0.0, 0.0]] * 3)
    params = [SamplingParams(temperature=0, logit_bias={0: -100}), SamplingParams(temperature=0, logit_bias={3: 100}),
              SamplingParams(temperature=0)]
    assert sample(logits.clone(), params, [None] * 3) == [1, 3, 0]
    drawn = [SamplingParams(temperature=1.0, top_k=0, logit_bias={2: 100.0})] * 2
    for _ in range(10):
        assert sample(logits[:2].clone(), drawn, [None, torch.Generator().manual_seed(1)]) == [2, 2]


def test_a_grammar_mask_keeps_each_constrained_row_inside_its_allowed_set():
    """Masked rows draw only allowed tokens, a row with every token allowed is untouched, and a row allowing
    nothing is left unmasked (its matcher fails it: the batch's draw must not)."""
    vocab = 8
    logits = torch.zeros(3, vocab)
    logits[:, 0] = 10.0  # everyone's favourite
    mask = torch.zeros(2, vocab, dtype=torch.bool)  # rows 0 and 2 are constrained, row 1 is free
    mask[0, [3, 5]] = True  # row 2 allows nothing
    allowed = Allowed(torch.tensor([0, 2]), mask)
    params = [SamplingParams(temperature=1.0, top_k=0)] * 3
    for _ in range(20):
        out = sample(logits.clone(), params, [None] * 3, None, allowed)
        assert out[0] in (3, 5)
        assert 0 <= out[1] < vocab and 0 <= out[2] < vocab
    greedy = [SamplingParams(temperature=0)] * 3
    assert sample(logits.clone(), greedy, [None] * 3, None, allowed) == [3, 0, 0]


def test_logprobs_are_those_of_the_distribution_drawn_from_and_their_alternatives_sum_below_one():
    """Greedy rows: log_softmax of the processed logits (bias included); drawn rows: tempered. The sampled token's
    entry, the top alternatives most likely first, and rows that did not ask get none."""
    logits = torch.tensor([[2.0, 1.0, 0.5, -1.0]] * 3)
    params = [SamplingParams(temperature=0, logprobs=2, logit_bias={3: 4.0}),
              SamplingParams(temperature=0.5, top_k=0, logprobs=4, seed=1), SamplingParams(temperature=0)]
    drawn = Sampler().draw(logits.clone(), params, [None, torch.Generator().manual_seed(1), None])
    greedy, hot, none = drawn.logprobs
    assert none is None and drawn.tokens[0] == 3  # +4 made token 3 the likeliest
    want = torch.log_softmax(torch.tensor([2.0, 1.0, 0.5, 3.0]), -1)
    assert greedy.logprob == pytest.approx(want[3].item()) and [t for t, _ in greedy.top] == [3, 0]
    assert [v for _, v in greedy.top] == pytest.approx([want[3].item(), want[0].item()])
    tempered = torch.log_softmax(logits[0] / 0.5, -1)
    assert hot.logprob == pytest.approx(tempered[drawn.tokens[1]].item())
    assert sum(math.exp(v) for _, v in hot.top) == pytest.approx(1.0)  # the whole vocabulary: all four
    assert Sampler().draw(logits.clone(), [SamplingParams()] * 3, [None] * 3).logprobs is None


def test_logprobs_of_bf16_logits_see_the_bias_and_the_mask():
    """The `cpu` preset's logits are bf16: the float32 copy that bias, mask and penalties act on is the one the log
    probabilities are read from (they were read from the untouched bf16 logits)."""
    logits = torch.tensor([[2.0, 1.0, 0.5, -1.0]], dtype=torch.bfloat16)
    mask = torch.tensor([[False, True, True, True]])
    drawn = Sampler().draw(logits, [SamplingParams(temperature=0, logprobs=4, logit_bias={3: 10.0})], [None], None,
                           Allowed(torch.tensor([0]), mask))
    (lp,) = drawn.logprobs
    want = torch.log_softmax(torch.tensor([1.0, 0.5, 9.0]), -1)
    assert drawn.tokens == [3] and lp.logprob == pytest.approx(want[2].item(), abs=1e-3)
    assert [t for t, _ in lp.top] == [3, 1, 2]  # token 0, masked, is no alternative
