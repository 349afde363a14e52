"""Sampling parameters, with the original IPU pipeline's meaning of temperature / k / output_length."""

from __future__ import annotations

import math

from pydantic import BaseModel, ConfigDict, Field, field_validator

SAMPLING_EPS = 1e-5  # a temperature below this is greedy decoding (vLLM's _SAMPLING_EPS)


class SamplingParams(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    temperature: float = Field(1.0, ge=0.0)  # 0 = always the most likely token (greedy)
    top_k: int = Field(5, ge=0)  # 0 = no top-k filter; the upper bound (vocab) is checked by the worker
    top_p: float = Field(1.0, gt=0.0, le=1.0)  # nucleus filter; 1 = off
    repetition_penalty: float = Field(1.0, gt=0.0)  # CTRL-style; 1 = off
    output_length: int | None = Field(None, ge=1)  # max new tokens; None = until the end key or context full
    seed: int | None = Field(None, ge=0, lt=2**63)  # per-turn RNG seed; None = nondeterministic
    stop: list[str] = Field(default_factory=list, max_length=8)  # stop strings (not included in the reply)
    # Generate past the end key (until output_length or the context is full), as vLLM's ignore_eos: for
    # benchmarks that need exactly output_length tokens.
    ignore_eos: bool = False

    @field_validator("temperature", "top_p", "repetition_penalty")
    @classmethod
    def _finite(cls, v: float) -> float:
        if not math.isfinite(v):
            raise ValueError("must be a finite number")
        return v

    @field_validator("stop")
    @classmethod
    def _stops(cls, v: list[str]) -> list[str]:
        if any(not s for s in v):
            raise ValueError("stop strings must not be empty")
        if any(len(s) > 200 for s in v):
            raise ValueError("stop strings must be at most 200 characters")
        return v

    @property
    def greedy(self) -> bool:
        """Always the most likely token: temperature 0 (or below SAMPLING_EPS, which would only overflow the
        division by it: vLLM draws the same line), or top_k 1."""
        return self.temperature < SAMPLING_EPS or self.top_k == 1

    def check_vocab(self, vocab_size: int) -> None:
        """top_k's upper bound depends on the model, so it is checked where the model is known."""
        if self.top_k > vocab_size:
            raise ValueError(f"top_k: must be in [0, {vocab_size}] for this model, got {self.top_k}")
