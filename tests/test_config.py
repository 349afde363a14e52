"""config/: presets load and validate; a bad value stops start-up with one message naming the key."""

import pytest

from config import ConfigError, load_presets, load_settings


def test_presets_have_the_documented_models_and_devices():
    p = load_presets()
    oasst = p.model("oasst-pythia-12b")
    assert oasst.source == "OpenAssistant/oasst-sft-4-pythia-12b-epoch-3.5"
    assert (oasst.prompt_format.value, oasst.end_keys, oasst.sequence_length, oasst.max_sequence_length) == (
        "oasst",
        ["<|endoftext|>"],
        512,
        2048,
    )
    assert p.model("smollm2-135m").prompt_format.value == "chat_template"
    assert p.model("tiny-neox").source == "builtin:tiny-neox"
    assert (p.device("ipu-pod4").ipus, p.device("ipu-pod4").slots) == (4, 1)
    assert (p.device("ipu-pod16").ipus, p.device("ipu-pod16").slots) == (16, 4)
    assert (p.device("ipu").backend, p.device("ipu").ipus) == ("ipu", 0)  # 0 = pick the pod by IPU count
    assert (p.device("cuda").cuda_graphs, p.device("cuda").compile_decode) == (True, True)
    assert p.device("cpu-compiled").compile_decode and not p.device("cpu-compiled").cuda_graphs  # CPU: 1-row step


def test_compile_without_graphs_is_refused_naming_both_keys(tmp_path):
    bad = tmp_path / "presets.yaml"
    bad.write_text("models: {}\ndevices:\n  gpu: {device: cuda, compile_decode: true}\n")
    with pytest.raises(ValueError, match=r"presets.yaml: devices.gpu: .*compile_decode .* set cuda_graphs too"):
        load_presets(bad)


def test_any_hub_id_or_path_is_a_model():
    assert load_presets().model("EleutherAI/pythia-70m").source == "EleutherAI/pythia-70m"


@pytest.mark.parametrize(
    "env,key",
    [
        ({"CHAT_SLOTS": "zero"}, "CHAT_SLOTS"),
        ({"CHAT_SLOTS": "0"}, "CHAT_SLOTS"),
        ({"CHAT_DEVICE": "tpu"}, "CHAT_DEVICE"),
        ({"CHAT_MODEL": "no-such-model"}, "CHAT_MODEL"),
        ({"CHAT_SEQUENCE_LENGTH": "99999"}, "CHAT_SEQUENCE_LENGTH"),
        ({"CHAT_SEQUENCE_LENGTH": "8"}, "CHAT_SEQUENCE_LENGTH"),
        ({"CHAT_VISIBILITY_TIMEOUT_S": "-1"}, "CHAT_VISIBILITY_TIMEOUT_S"),
        ({"CHAT_KEY_PREFIX": "a:b"}, "CHAT_KEY_PREFIX"),
        ({"CHAT_STREAM_FLUSH_MS": "soon"}, "CHAT_STREAM_FLUSH_MS"),
        ({"CHAT_THREADS": "100000"}, "CHAT_THREADS"),  # segfaulted creating OpenMP threads
        ({"CHAT_THREADS": "99999999999999999999999"}, "CHAT_THREADS"),  # overflowed in torch, unnamed
    ],
)
def test_bad_values_name_their_key(monkeypatch, env, key):
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(ConfigError) as e:
        load_settings()
    assert str(e.value).startswith(key + ":")


def test_environment_overrides_presets(monkeypatch):
    monkeypatch.setenv("CHAT_MODEL", "tiny-neox")
    monkeypatch.setenv("CHAT_SLOTS", "3")
    monkeypatch.setenv("CHAT_SEQUENCE_LENGTH", "128")
    s = load_settings()
    assert s.device_preset().slots == 3 and s.model_preset().sequence_length == 128


def test_worker_command_reports_config_errors(monkeypatch, capsys):
    from worker.__main__ import main

    monkeypatch.setenv("CHAT_SLOTS", "-2")
    assert main([]) == 2
    assert "CHAT_SLOTS" in capsys.readouterr().err
