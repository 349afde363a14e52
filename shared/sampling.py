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

SAMPLING_EPS = 1e-5  # a temperature below this is greedy decoding (vLLM's _SAMPLING_EPS)
MAX_STOPS = 8  # stop strings per request (OpenAI allows 4, vLLM any number)
MAX_STOP_CHARS = 200

Temperature = Annotated[float, Field(ge=0.0, allow_inf_nan=False)]
TopK = Annotated[int, Field(ge=0)]
TopP = Annotated[float, Field(gt=0.0, le=1.0, allow_inf_nan=False)]
RepetitionPenalty = Annotated[float, Field(gt=0.0, allow_inf_nan=False)]
MaxTokens = Annotated[int, Field(ge=1)]
Seed = Annotated[int, Field(ge=0, lt=2**63)]
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
        """top_k's upper bound depends on the model, so it is checked where the model is known. Raises
        InvalidInput (a ValueError) with param top_k."""
        if self.top_k > vocab_size:
            raise InvalidInput(f"top_k: must be in [0, {vocab_size}] for this model, got {self.top_k}", "top_k")
