"""The IPU backend against a strict poptorch double (tests/fake_poptorch.py), on the CPU.

What these prove: the backend uses poptorch the way its documentation says (options, annotations,
one compiled shape, attach/detach) and the engine behaves the same over it as over the torch
backend. What they cannot prove: that anything compiles, fits or runs on a real IPU.
"""

from __future__ import annotations

import sys
from typing import Any

import pytest
import torch
from transformers import GPTNeoXForCausalLM

try:
    from tests import fake_poptorch
except ImportError:  # tests/ is not a package: pytest puts this directory on sys.path
    import fake_poptorch  # type: ignore[no-redef]

from config.presets import DevicePreset, load_presets
from config.presets import choose_ipu_preset as choose_preset
from config.settings import load_settings
from shared.context import fit
from shared.messages import ChatMessage, Role
from shared.sampling import SamplingParams
from worker.app import worker_options
from worker.engine.engine import Engine, Finished, Token
from worker.pipeline import tiny_neox
from worker.pipeline.backend import Prefill
from worker.pipeline.factory import build_backend
from worker.pipeline.ipu import backend as ipu_backend
from worker.pipeline.ipu import sizing
from worker.pipeline.ipu.backend import IPUBackend
from worker.pipeline.ipu.sizing import detect_ipus, engine_slots, resolve_device
from worker.pipeline.loader import LoadedModel, load_model
from worker.pipeline.torch_backend import TorchBackend

MAX_LEN = 96
GREEDY = SamplingParams(temperature=0.0)


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch):
    fake_poptorch.reset(ipus=16)
    monkeypatch.setitem(sys.modules, "poptorch", fake_poptorch)
    yield fake_poptorch
    fake_poptorch.reset()


def tiny() -> LoadedModel:
    return load_model(load_presets().model("tiny-neox"))


def deep_model(layers: int) -> GPTNeoXForCausalLM:
    """tiny-neox's shape with more decoder layers, to see them spread over 4 and 16 IPUs."""
    cfg = tiny_neox.build_model(272).config
    cfg.num_hidden_layers = layers
    torch.manual_seed(0)
    return GPTNeoXForCausalLM(cfg).eval()


def preset(name: str, tmp_path: Any, **update: Any) -> DevicePreset:
    base = {"dtype": "float32", "executable_cache": str(tmp_path / "poptorch-cache")}
    return load_presets().device(name).model_copy(update={**base, **update})


def backend(tmp_path: Any, loaded: LoadedModel | None = None, name: str = "ipu-pod4", **kw: Any) -> IPUBackend:
    model = (loaded or tiny()).model
    dev = preset(name, tmp_path)
    return IPUBackend(model, dev, slots=dev.slots, max_len=kw.pop("max_len", MAX_LEN), **kw)


def reply(engine: Engine, handle: Any) -> tuple[list[int], Finished]:
    ids = []
    for ev in handle:
        if isinstance(ev, Token) and ev.token_id >= 0:
            ids.append(ev.token_id)
        elif isinstance(ev, Finished):
            return ids, ev
        elif not isinstance(ev, Token):
            raise AssertionError(f"request failed: {ev}")
    raise AssertionError("no final event")


def run_together(be: IPUBackend, loaded: LoadedModel, jobs: list[tuple[list[int], SamplingParams, int]]):
    """Submit every job before the engine starts, so they are admitted together and share every step."""
    engine = Engine(be, loaded.codec)
    handles = [engine.submit(p, params, n) for p, params, n in jobs]
    engine.start()
    try:
        return [reply(engine, h) for h in handles]
    finally:
        engine.stop()


# -- the double keeps poptorch's rules ----------------------------------------------------------------
class Counter(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("n", torch.zeros(1))
        self.a = torch.nn.Linear(2, 2)
        self.b = torch.nn.Linear(2, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.n += 1  # in place: a buffer persists on the device between runs
        return self.b(self.a(x)) * 0 + self.n


def test_double_runs_only_the_compiled_shape_while_attached(fake):
    exe = fake.inferenceModel(Counter())
    x = torch.zeros(2, 2)
    with pytest.raises(fake.PoptorchError, match="compile"):
        exe(x)
    exe.compile(x)
    assert exe.isCompiled() and exe.isAttachedToDevice()
    assert exe(x)[0, 0] == 1 and exe(x)[0, 0] == 2  # the buffer lives on
    for other in (torch.zeros(3, 2), torch.zeros(2, 2, dtype=torch.float16)):
        with pytest.raises(fake.PoptorchError, match="recompile"):
            exe(other)
    exe.detachFromDevice()
    with pytest.raises(fake.PoptorchError, match="not attached"):
        exe(x)
    with pytest.raises(fake.PoptorchError, match="not attached"):
        exe.detachFromDevice()  # poptorch itself refuses a second detach; the backend must not call it twice
    exe.attachToDevice()
    assert exe(x)[0, 0] == 1  # attaching uploads the host's buffers again
    with pytest.raises(fake.PoptorchError, match="already attached"):
        exe.attachToDevice()
    assert exe.model.n.item() == 0  # an inference model never copies buffers back to the host
    exe.destroy()
    assert not exe.isAttachedToDevice()


def test_double_splits_micro_batches_and_keeps_buffers_per_replica(fake):
    opts = fake.Options().replicationFactor(2).deviceIterations(2)
    with pytest.raises(fake.PoptorchError, match="broadcastBuffers"):
        fake.inferenceModel(Counter(), opts).compile(torch.zeros(4, 2))
    opts.broadcastBuffers(False)
    exe = fake.inferenceModel(Counter(), opts)
    with pytest.raises(fake.PoptorchError, match="multiple"):
        exe.compile(torch.zeros(3, 2))
    exe.compile(torch.zeros(4, 2))
    out = exe(torch.zeros(4, 2))[:, 0]
    assert out.tolist() == [1, 1, 2, 2]  # iteration-major: each replica ran 2 micro-batches of 1 row


def test_double_enforces_pipeline_rules(fake):
    m = Counter()
    fake.BeginBlock(m.a, ipu_id=0)
    fake.BeginBlock(m.b, ipu_id=1)
    with pytest.raises(fake.PoptorchError, match="already"):
        fake.BeginBlock(m.b, ipu_id=2)
    assert [ipu for _, _, ipu in fake.blocks] == [0, 1]
    with pytest.raises(fake.PoptorchError, match="deviceIterations >= 2"):
        fake.inferenceModel(m).compile(torch.zeros(2, 2))
    exe = fake.inferenceModel(m, fake.Options().deviceIterations(2))
    exe.compile(torch.zeros(2, 2))
    assert exe.stage_ipus == [0, 1] and fake.ipus_in_use() == 2
    exe.detachFromDevice()

    fake.removeBlocks(m)
    fake.BeginBlock(m.a, ipu_id=1)
    fake.BeginBlock(m.b, ipu_id=0)
    with pytest.raises(fake.PoptorchError, match="go back"):
        fake.inferenceModel(m, fake.Options().deviceIterations(2)).compile(torch.zeros(2, 2))

    fake.removeBlocks(m)
    fake.BeginBlock(m.a, ipu_id=0)
    fake.BeginBlock(m.b, ipu_id=2)  # 3 IPUs: not a power of two
    with pytest.raises(fake.PoptorchError, match="power of 2"):
        fake.inferenceModel(m, fake.Options().deviceIterations(3)).compile(torch.zeros(3, 2))
    exe = fake.inferenceModel(m, fake.Options().deviceIterations(3).autoRoundNumIPUs(True))
    exe.compile(torch.zeros(3, 2))
    assert exe._ipus == 4


def test_double_counts_ipus_and_records_options(fake):
    fake.reset(ipus=4)
    assert fake.ipuHardwareIsAvailable(4) and not fake.ipuHardwareIsAvailable(8)
    assert fake.ipuHardwareVersion() == 2
    opts = fake.Options().replicationFactor(4).broadcastBuffers(False)
    first = fake.inferenceModel(Counter(), opts)
    first.compile(torch.zeros(4, 2))
    second = fake.inferenceModel(Counter(), opts)
    with pytest.raises(fake.PoptorchError, match="0 of 4 are free"):
        second.compile(torch.zeros(4, 2))  # compiling attaches, and the IPUs are taken
    first.detachFromDevice()
    second.attachToDevice()

    opts = fake.Options()
    opts.Precision.setPartialsType(torch.half)
    opts.TensorLocations.setWeightLocation(fake.TensorLocationSettings().useOnChipStorage(False))
    assert [name for name, _ in opts.calls] == ["Precision.setPartialsType", "TensorLocations.setWeightLocation"]
    with pytest.raises(AttributeError):
        opts.noSuchOption(1)
    fake.reset(ipus=0)
    with pytest.raises(AssertionError):
        fake.ipuHardwareVersion()


# -- sizing -------------------------------------------------------------------------------------------
def test_without_poptorch_the_error_says_how_to_get_it(monkeypatch: pytest.MonkeyPatch, tmp_path):
    monkeypatch.setitem(sys.modules, "poptorch", None)  # import poptorch -> ImportError
    with pytest.raises(RuntimeError, match=r"needs poptorch.*Poplar SDK"):
        backend(tmp_path)


def test_choose_preset_like_the_original(fake):
    assert choose_preset(4) == "ipu-pod4"
    assert choose_preset(16) == choose_preset(8) == choose_preset(64) == "ipu-pod16"
    assert detect_ipus(fake) == 16
    fake.reset(ipus=0)
    assert detect_ipus(fake) == 0


@pytest.mark.parametrize(("ipus", "chosen", "micro", "slots"), [(4, "ipu-pod4", 1, 4), (16, "ipu-pod16", 4, 64)])
def test_auto_preset_ipu_picks_the_pod_by_the_ipus_the_host_reports(fake, tmp_path, caplog, ipus, chosen, micro, slots):
    fake.reset(ipus=ipus)
    auto = preset("ipu", tmp_path)  # dtype and executable_cache set on it: they override the chosen preset's
    assert auto.ipus == 0
    with caplog.at_level("INFO", logger=sizing.__name__):
        be = build_backend(auto, tiny(), MAX_LEN)
    assert f"device 'ipu': this host reports {ipus} IPU(s): using preset {chosen!r}" in caplog.text
    assert be.device.name == chosen and (be.device.ipus, be.plan.micro_batch) == (ipus, micro)
    assert be.device.executable_cache == str(tmp_path / "poptorch-cache") and be.dtype == torch.float32
    assert be.slots == slots and fake.ipus_in_use() == ipus  # tiny-neox: 2 stages x ipus/2 replicas
    assert resolve_device(auto.model_copy(update={"slots": 2})).slots == 2  # CHAT_SLOTS still wins
    assert resolve_device(load_presets().device("ipu-pod16")).name == "ipu-pod16"  # a named pod stays as it is


def test_auto_preset_without_poptorch_gives_the_same_start_up_error(monkeypatch: pytest.MonkeyPatch, tmp_path):
    monkeypatch.setitem(sys.modules, "poptorch", None)
    with pytest.raises(RuntimeError, match=r"device 'ipu' needs poptorch.*Poplar SDK"):
        build_backend(preset("ipu", tmp_path), tiny(), MAX_LEN)


@pytest.mark.parametrize("layers", [2, 3, 5, 16])
@pytest.mark.parametrize("name", ["ipu-pod4", "ipu-pod16"])
def test_engine_slots_without_compiling_equal_the_backends(fake, tmp_path, name, layers):
    dev = preset(name, tmp_path)
    expected = engine_slots(dev, layers)
    assert expected <= engine_slots(dev, None) == dev.slots * dev.ipus  # unknown layer count: the upper bound
    if layers in (3, 16):  # compile two of them to see the backend agree
        assert IPUBackend(deep_model(layers), dev, slots=dev.slots, max_len=32).slots == expected


@pytest.mark.parametrize(("device", "ipus", "concurrency"), [("ipu-pod4", 4, 4), ("ipu", 16, 64), ("cpu-fp32", 0, 3)])
def test_celery_concurrency_is_the_engines_slot_count(fake, device, ipus, concurrency):
    fake.reset(ipus=ipus)
    settings = load_settings(model="tiny-neox", device=device, **({"slots": 3} if device == "cpu-fp32" else {}))
    assert worker_options(settings)["concurrency"] == concurrency  # not the IPU micro-batch (1 or 4)


def test_celery_concurrency_without_poptorch(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setitem(sys.modules, "poptorch", None)  # the worker then fails at start, with the clear error
    assert worker_options(load_settings(model="tiny-neox", device="ipu-pod4"))["concurrency"] == 4  # counted anyway
    auto = load_settings(model="tiny-neox", device="ipu")  # which pod is unknown: the entry's own slots
    assert worker_options(auto)["concurrency"] == auto.device_preset().slots


def test_too_few_ipus_names_the_preset_that_fits(fake, tmp_path):
    fake.reset(ipus=4)
    with pytest.raises(RuntimeError, match=r"needs 16 IPUs, this host has 4.*'ipu-pod4'"):
        backend(tmp_path, name="ipu-pod16")
    fake.reset(ipus=8)  # the notebook's rule gives ipu-pod16 here too: no hint that names the same preset
    with pytest.raises(RuntimeError, match=r"needs 16 IPUs, this host has 8$"):
        backend(tmp_path, name="ipu-pod16")


@pytest.mark.parametrize(("name", "ipus", "micro"), [("ipu-pod4", 4, 1), ("ipu-pod16", 16, 4)])
def test_pod_presets_size_the_executable(fake, tmp_path, name, ipus, micro):
    dev = preset(name, tmp_path, dtype="float16", available_memory_proportion=0.3)
    be = IPUBackend(deep_model(16), dev, slots=dev.slots, max_len=32)
    opts = be.options
    assert (be.plan.stages, be.plan.replicas, be.plan.micro_batch) == (ipus, 1, micro)
    assert be.slots == micro * ipus  # one micro-batch per pipeline stage in every call
    assert opts.last("deviceIterations") == ipus
    assert opts.last("replicationFactor") == 1
    assert opts.last("setAvailableMemoryProportion") == {f"IPU{i}": 0.3 for i in range(ipus)}
    assert opts.last("enableExecutableCaching") == str(tmp_path / "poptorch-cache")
    assert (tmp_path / "poptorch-cache").is_dir()
    assert opts.last("Precision.setPartialsType") == torch.half
    assert opts.last("broadcastBuffers") is False
    assert opts.last("setExecutionStrategy").pipelined
    assert opts.last("autoRoundNumIPUs") is None  # 4 and 16 are powers of two
    assert opts.last("TensorLocations.setWeightLocation") is None  # a tiny model's weights fit on chip
    assert fake.ipus_in_use() == ipus
    assert be.prefill([Prefill(0, [1, 2, 3], 0)]).dtype == torch.float32  # fp16 on the device, fp32 to the engine


def test_layers_are_split_evenly_over_the_ipus(fake, tmp_path):
    dev = preset("ipu-pod4", tmp_path)
    be = IPUBackend(deep_model(10), dev, slots=dev.slots, max_len=32)
    assert be.layer_ipus == [0, 0, 1, 1, 1, 2, 2, 3, 3, 3]
    assert [ipu for _, _, ipu in fake.blocks] == [0, 1, 2, 3]
    assert fake.executables[-1].stage_ipus == [0, 1, 2, 3]  # the forward visits the IPUs in order
    starts = sizing.stage_starts(36, 16)
    sizes = [b - a for a, b in zip(starts, [*starts[1:], 36], strict=True)]
    assert sorted(set(sizes)) == [2, 3] and sum(sizes) == 36  # Pythia-12B over a POD16


def test_a_model_with_fewer_layers_than_ipus_is_replicated(fake, tmp_path):
    be = backend(tmp_path, name="ipu-pod16")  # tiny-neox: 2 layers
    assert (be.plan.stages, be.plan.replicas, be.plan.iterations) == (2, 8, 2)
    assert be.options.last("replicationFactor") == 8 and be.slots == 4 * 2 * 8
    assert sizing.plan_ipus(4, 3, 1).ipus_used == 3
    assert fake.ipus_in_use() == 16


def test_heavy_weights_go_to_streaming_memory(fake, tmp_path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(ipu_backend, "IPU_SRAM_BYTES", 1000)
    be = backend(tmp_path)
    setting = be.options.last("TensorLocations.setWeightLocation")
    assert setting.settings == {"onChip": False}


# -- the engine over the IPU backend --------------------------------------------------------------------
def test_greedy_batch_equals_each_alone_and_the_torch_backend(fake, tmp_path):
    loaded = tiny()
    be = backend(tmp_path, loaded)
    assert be.slots == 4
    texts = ["Hi", "Tell me about the IPU, please.", "A much longer prompt: " + "lorem ipsum " * 4]
    prompts = [loaded.codec.encode_plain(t) for t in texts]
    assert len({len(p) for p in prompts}) == 3 and max(map(len, prompts)) > be.step_tokens
    jobs = [(p, GREEDY, 12) for p in prompts]
    together = run_together(be, loaded, jobs)
    alone = [run_together(be, loaded, [job])[0] for job in jobs]
    assert [ids for ids, _ in together] == [ids for ids, _ in alone]
    assert all(ids for ids, _ in together)

    ref = tiny()
    torch_be = TorchBackend(ref.model, slots=4, max_len=MAX_LEN)
    engine = Engine(torch_be, ref.codec)
    handles = [engine.submit(p, params, n) for p, params, n in jobs]
    engine.start()
    try:
        assert [reply(engine, h)[0] for h in handles] == [ids for ids, _ in together]
    finally:
        engine.stop()


def test_each_sequence_keeps_its_own_sampling_in_a_batch(fake, tmp_path):
    loaded = tiny()
    be = backend(tmp_path, loaded)
    prompt_a = loaded.codec.encode_plain("Greedy, please.")
    prompt_b = loaded.codec.encode_plain("Surprise me")
    sampled = SamplingParams(temperature=1.5, top_k=0, seed=7)
    greedy_alone = run_together(be, loaded, [(prompt_a, GREEDY, 10)])[0][0]
    sampled_alone = run_together(be, loaded, [(prompt_b, sampled, 10)])[0][0]
    (greedy, _), (drawn, _) = run_together(be, loaded, [(prompt_a, GREEDY, 10), (prompt_b, sampled, 10)])
    assert greedy == greedy_alone
    assert drawn == sampled_alone  # a seeded sequence does not depend on its neighbours


def test_a_conversation_longer_than_the_sequence_completes(fake, tmp_path):
    loaded = tiny()
    be = backend(tmp_path, loaded)
    messages = [
        ChatMessage(role=Role.prompter, text="first question " * 10),
        ChatMessage(role=Role.assistant, text="a long answer " * 10),
        ChatMessage(role=Role.prompter, text="and the newest one, which is long too " * 4),
    ]
    total = sum(len(loaded.codec.encode_plain(m.text)) for m in messages)
    assert total > be.max_len
    fitted = fit(loaded.codec, messages, be.max_len, max_tokens=None)
    assert fitted.dropped_messages or fitted.truncated_tokens
    ((_, done),) = run_together(be, loaded, [(fitted.ids, GREEDY, fitted.max_new)])
    assert done.completion_tokens >= 1
    assert len(fitted.ids) + done.completion_tokens <= be.max_len


def test_detach_is_idempotent_and_attach_brings_it_back(fake, tmp_path):
    loaded = tiny()
    be = backend(tmp_path, loaded)
    prompt = loaded.codec.encode_plain("Same answer after re-attaching?")
    before = be.prefill([Prefill(2, prompt, 0)])[0]
    be.detach()
    be.detach()
    assert not be.attached
    assert fake.executables and not any(e.isAttachedToDevice() for e in fake.executables)
    assert fake.ipus_in_use() == 0
    with pytest.raises(RuntimeError, match="detached"):
        be.prefill([Prefill(0, prompt, 0)])[0]
    with pytest.raises(RuntimeError, match="detached"):
        be.decode(torch.zeros(1, dtype=torch.long), torch.zeros(1, dtype=torch.long), torch.ones(1, dtype=torch.bool))
    be.attach()
    be.attach()  # already attached: nothing to do
    assert be.attached
    assert torch.equal(be.prefill([Prefill(2, prompt, 0)])[0], before)
    be.close()
    assert not be.attached and fake.ipus_in_use() == 0


def test_a_second_backend_needs_the_first_to_release_the_ipus(fake, tmp_path):
    fake.reset(ipus=4)
    loaded = tiny()
    first = backend(tmp_path, loaded)
    with pytest.raises(fake.PoptorchError, match="free"):
        backend(tmp_path, loaded)  # same model again: its blocks are re-annotated, but the IPUs are taken
    first.detach()
    second = backend(tmp_path, loaded)
    assert second.attached and second.prefill([Prefill(0, [5, 6, 7], 0)])[0].shape == (272,)
