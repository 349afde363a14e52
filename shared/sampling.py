"""Sampling parameters, with the original IPU pipeline's meaning of temperature / k / output length
(named `max_tokens`, as OpenAI and vLLM name it).

Every constraint is written once, here, as an annotated type: `SamplingParams` (the task payload's
sampling, what the engine reads) and the HTTP request bodies (producer/api/schemas.py, where each is
optional) are built from the same types and names, so a value one accepts the other accepts too, and an
error names the field as the client wrote it.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import AliasChoices, BaseModel, ConfigDict, Field, StringConstraints

from shared.errors import InvalidInput
from shared.grammar import Grammar

SAMPLING_EPS = 1e-5  # a temperature below this is greedy decoding (vLLM's _SAMPLING_EPS)
MAX_STOPS = 8  # stop strings per request (OpenAI allows 4, vLLM any number)
MAX_STOP_CHARS = 200
MAX_LOGIT_BIAS = 1024  # token ids in one logit_bias (OpenAI documents none; vLLM none either)

Temperature = Annotated[float, Field(ge=0.0, allow_inf_nan=False)]
TopK = Annotated[int, Field(ge=0)]
TopP = Annotated[float, Field(gt=0.0, le=1.0, allow_inf_nan=False)]
RepetitionPenalty = Annotated[float, Field(gt=0.0, allow_inf_nan=False)]
MaxTokens = Annotated[int, Field(ge=1)]
Seed = Annotated[int, Field(ge=0, lt=2**63)]
Penalty = Annotated[float, Field(ge=-2.0, le=2.0, allow_inf_nan=False)]  # OpenAI's range
Bias = Annotated[float, Field(ge=-100.0, le=100.0, allow_inf_nan=False)]  # OpenAI's range
TopLogprobs = Annotated[int, Field(ge=0, le=20)]  # OpenAI's top_logprobs range
LogitBias = Annotated[dict[Annotated[int, Field(ge=0)], Bias], Field(max_length=MAX_LOGIT_BIAS)]
StopString = Annotated[str, StringConstraints(min_length=1, max_length=MAX_STOP_CHARS)]
StopStrings = Annotated[list[StopString], Field(max_length=MAX_STOPS)]


class SamplingParams(BaseModel):
    """How one turn's tokens are drawn and when its reply ends: the `sampling` of a task payload (on the
    queue, shared/wire.py) and what the engine's sampler and stopping criteria read per sequence."""

    model_config = ConfigDict(frozen=True, extra="forbid", use_attribute_docstrings=True)

    temperature: Temperature = 1.0
    """Divides the logits before drawing, ≥ 0. 0 (or below SAMPLING_EPS) = always the most likely token."""
    top_k: TopK = 5
    """Draw among the k most likely tokens, ≥ 0; 0 = no top-k filter. The upper bound (the model's
    vocabulary) is checked where the model is known (`check_vocab`)."""
    top_p: TopP = 1.0
    """Nucleus filter (Holtzman et al. 2020), in (0, 1]: the smallest set of likeliest tokens whose
    probability reaches top_p, taken after top-k; 1 = off."""
    repetition_penalty: RepetitionPenalty = 1.0
    """CTRL's penalty (Keskar et al. 2019) on every token of the prompt and reply so far, > 0; 1 = off."""
    max_tokens: MaxTokens | None = Field(None, validation_alias=AliasChoices("max_tokens", "output_length"))
    """New tokens at most, ≥ 1; None = until the end key or the context is full. Payloads queued before
    the rename call it `output_length` and are read too (upgrade workers before producers)."""
    presence_penalty: Penalty = 0.0
    """OpenAI's presence penalty, in [-2, 2]: subtracted from the logit of every token the reply already holds
    (once, however often). Positive = new topics. 0 = off. Reply tokens only, as OpenAI and vLLM count them."""
    frequency_penalty: Penalty = 0.0
    """OpenAI's frequency penalty, in [-2, 2]: subtracted from a token's logit once per time the reply already
    holds it. Positive = less verbatim repetition. 0 = off."""
    logit_bias: LogitBias = Field(default_factory=dict)
    """Added to the logits of these token ids before anything else, each in [-100, 100] (OpenAI's range: ±100
    bans or forces a token, ±1 nudges it). Ids beyond the model's vocabulary are refused (`check_vocab`)."""
    logprobs: TopLogprobs | None = None
    """Report each reply token's log probability and this many likeliest alternatives, 0 to 20 (OpenAI's
    top_logprobs; vLLM's logprobs). None = no log probabilities."""
    grammar: Grammar | None = None
    """Constrained decoding: the reply must match this JSON schema or regex (shared/grammar.py); every token
    that would leave it is masked before sampling. None = free text."""
    seed: Seed | None = None
    """The turn's own random generator seed, in [0, 2^63): the same reply whatever shares its batch.
    None = nondeterministic."""
    stop: StopStrings = Field(default_factory=list)
    """Up to MAX_STOPS strings of 1 to MAX_STOP_CHARS characters that end the reply when it produces one
    (not included in the reply; finish_reason stop)."""
    ignore_eos: bool = False
    """Generate past the end key (until max_tokens or the context is full), as vLLM's ignore_eos: for
    benchmarks that need exactly max_tokens tokens."""

    @property
    def greedy(self) -> bool:
        """Always the most likely token: temperature 0 (or below SAMPLING_EPS, which would only overflow the
        division by it: vLLM draws the same line), or top_k 1."""
        return self.temperature < SAMPLING_EPS or self.top_k == 1

    def check_vocab(self, vocab_size: int) -> None:
        """top_k's upper bound and logit_bias's ids depend on the model, so they are checked where the model is
        known. Raises InvalidInput (a ValueError) with param top_k or logit_bias."""
        if self.top_k > vocab_size:
            raise InvalidInput(f"top_k: must be in [0, {vocab_size}] for this model, got {self.top_k}", "top_k")
        if self.logit_bias and (bad := max(self.logit_bias)) >= vocab_size:
            raise InvalidInput(f"logit_bias: token id {bad} is not in this model's vocabulary [0, {vocab_size})",
                               "logit_bias")
