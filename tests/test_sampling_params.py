"""shared/sampling.py: the original pipeline's parameter meanings, and every invalid value named."""

import math

import pytest
from pydantic import ValidationError

from shared.sampling import SamplingParams


def test_defaults_follow_the_original_pipeline():
    p = SamplingParams()
    assert (p.temperature, p.top_k, p.max_tokens) == (1.0, 5, None)
    assert SamplingParams(temperature=0).greedy and SamplingParams(top_k=1).greedy
    assert not SamplingParams(temperature=0.7, top_k=0).greedy


@pytest.mark.parametrize(
    "field,value",
    [("temperature", -0.1), ("temperature", math.nan), ("temperature", math.inf), ("top_k", -1),
     ("top_p", 0.0), ("top_p", 1.5), ("top_p", math.nan), ("max_tokens", 0), ("max_tokens", -5),
     ("repetition_penalty", 0.0), ("repetition_penalty", -1.0), ("seed", -1), ("stop", [""]),
     ("stop", ["x"] * 9), ("presence_penalty", 2.01), ("frequency_penalty", -2.5), ("frequency_penalty", math.nan),
     ("logit_bias", {-1: 1.0}), ("logit_bias", {1: 100.5}), ("logit_bias", {i: 1.0 for i in range(1025)}),
     ("grammar", {"type": "regex", "value": "("}), ("grammar", {"type": "json", "value": {"type": 3}})],
)
def test_invalid_values_are_rejected_naming_the_field(field, value):
    with pytest.raises(ValidationError) as e:
        SamplingParams(**{field: value})
    assert e.value.errors()[0]["loc"][0] == field


def test_top_k_and_logit_bias_ids_are_bound_by_the_vocabulary():
    SamplingParams(top_k=100, logit_bias={99: 1.0}).check_vocab(100)
    with pytest.raises(ValueError, match="top_k"):
        SamplingParams(top_k=101).check_vocab(100)
    with pytest.raises(ValueError, match="logit_bias: token id 100"):
        SamplingParams(logit_bias={3: 1.0, 100: -1.0}).check_vocab(100)


def test_a_payload_carries_only_the_sampling_fields_set_so_older_workers_read_it():
    """GenerateTask dumps its sampling without defaults: a worker that predates a field (SamplingParams forbids
    unknown ones) still reads every payload that does not use it."""
    from shared.wire import GenerateTask

    task = GenerateTask(turn_id="t" * 8, conversation_id="c" * 8, model="m", messages=[{"role": "prompter",
                        "text": "hi"}], sampling=SamplingParams(temperature=0, presence_penalty=0.5))
    dumped = task.model_dump(mode="json")
    assert dumped["sampling"] == {"temperature": 0.0, "presence_penalty": 0.5}
    assert GenerateTask.model_validate(dumped) == task
    assert GenerateTask.model_validate_json(task.model_dump_json()) == task
    assert "raw" not in dumped  # a chat turn: the field older workers do not know is left out ...
    raw = task.model_copy(update={"raw": True})
    assert raw.model_dump(mode="json")["raw"] is True and GenerateTask.model_validate_json(raw.model_dump_json()) == raw


def test_unknown_fields_are_rejected():
    with pytest.raises(ValidationError, match="max_new_tokens"):
        SamplingParams.model_validate({"max_new_tokens": 3})  # TGI's name: not ours


def test_a_payload_queued_before_the_rename_still_reads():
    """`output_length` was max_tokens' name on the queue: messages queued by older producers drain."""
    old = SamplingParams.model_validate({"temperature": 0.0, "output_length": 7})
    assert old.max_tokens == 7 and old == SamplingParams(temperature=0.0, max_tokens=7)
    assert "output_length" not in old.model_dump() and old.model_dump()["max_tokens"] == 7
    with pytest.raises(ValidationError) as e:
        SamplingParams.model_validate({"output_length": 0})
    assert e.value.errors()[0]["loc"][0] == "output_length"  # named as the payload named it


# (SamplingParams field, the API's name for it, values around its limits)
EDGES = [
    ("temperature", "temperature", [-0.1, 0.0, 2.5, math.inf, math.nan]),
    ("top_k", "top_k", [-1, 0, 1, 10**9]),
    ("top_p", "top_p", [0.0, 1e-9, 1.0, 1.0001, math.nan]),
    ("repetition_penalty", "repetition_penalty", [0.0, 1e-300, 1.0, -1.0, math.inf]),
    ("max_tokens", "max_tokens", [0, 1, 10**9, -5]),
    ("seed", "seed", [-1, 0, 2**63 - 1, 2**63]),
    ("stop", "stop", [[], [""], ["x" * 200], ["x" * 201], ["a"] * 8, ["a"] * 9]),
    ("presence_penalty", "presence_penalty", [-2.0, -2.01, 0.0, 2.0, 2.01, math.nan]),
    ("frequency_penalty", "frequency_penalty", [-2.0, -2.01, 0.0, 2.0, 2.01, math.inf]),
    ("grammar", "grammar", [{"type": "regex", "value": "a+"}, {"type": "regex", "value": "a("},
                            {"type": "json", "value": {"type": "object"}}, {"type": "json", "value": {"type": 1}},
                            {"type": "json", "value": "{}"}, {"type": "xml", "value": "a"}]),
]


@pytest.mark.parametrize("field,api_name,values", EDGES)
def test_the_api_and_the_task_payload_accept_exactly_the_same_values(field, api_name, values):
    """The constraints are written once (shared/sampling.py): a value the HTTP body accepts is one the
    worker's payload accepts, and the reverse."""
    from producer.api.schemas import SamplingFields

    for v in values:
        def ok(build) -> bool:
            try:
                build()
                return True
            except ValidationError:
                return False

        api = ok(lambda: SamplingFields.model_validate({api_name: v}))  # noqa: B023 - called at once
        payload = ok(lambda: SamplingParams.model_validate({field: v}))  # noqa: B023
        assert api == payload, (field, v, api, payload)
