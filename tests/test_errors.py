"""shared/errors.py: the first pydantic error, as every boundary reports it."""

from __future__ import annotations

import pytest
from pydantic import BaseModel, ValidationError, field_validator

from shared.errors import first_error


class Inner(BaseModel):
    top_k: int

    @field_validator("top_k")
    @classmethod
    def _small(cls, v: int) -> int:
        if v > 10:
            raise ValueError("must be at most 10")
        return v


class Outer(BaseModel):
    sampling: Inner
    stops: list[str] = []


def test_first_error_names_the_path_and_drops_pydantics_prefix():
    with pytest.raises(ValidationError) as e:
        Outer.model_validate({"sampling": {"top_k": 11}, "stops": ["a", 5]})
    err = first_error(e.value)
    assert (err.loc, err.dotted, err.input) == (("sampling", "top_k"), "sampling.top_k", 11)
    assert err.msg == "must be at most 10"
    with pytest.raises(ValidationError) as e:
        Outer.model_validate({"sampling": {"top_k": 1}, "stops": ["a", 5]})
    assert first_error(e.value).dotted == "stops.1"
