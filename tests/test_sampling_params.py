"""shared/sampling.py: the original pipeline's parameter meanings, and every invalid value named."""

import math

import pytest
from pydantic import ValidationError

from shared.sampling import SamplingParams


def test_defaults_follow_the_original_pipeline():
    p = SamplingParams()
    assert (p.temperature, p.top_k, p.output_length) == (1.0, 5, None)
    assert SamplingParams(temperature=0).greedy and SamplingParams(top_k=1).greedy
    assert not SamplingParams(temperature=0.7, top_k=0).greedy


@pytest.mark.parametrize(
    "field,value",
    [("temperature", -0.1), ("temperature", math.nan), ("temperature", math.inf), ("top_k", -1),
     ("top_p", 0.0), ("top_p", 1.5), ("top_p", math.nan), ("output_length", 0), ("output_length", -5),
     ("repetition_penalty", 0.0), ("repetition_penalty", -1.0), ("seed", -1), ("stop", [""]),
     ("stop", ["x"] * 9)],
)
def test_invalid_values_are_rejected_naming_the_field(field, value):
    with pytest.raises(ValidationError) as e:
        SamplingParams(**{field: value})
    assert e.value.errors()[0]["loc"][0] == field


def test_top_k_bound_is_the_vocabulary():
    SamplingParams(top_k=100).check_vocab(100)
    with pytest.raises(ValueError, match="top_k"):
        SamplingParams(top_k=101).check_vocab(100)


def test_unknown_fields_are_rejected():
    with pytest.raises(ValidationError, match="max_tokens"):
        SamplingParams(max_tokens=3)
