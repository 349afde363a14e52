"""A test double of Graphcore's `poptorch`, installed as `sys.modules["poptorch"]` by tests.

It runs the wrapped torch module on the CPU, but keeps the rules a real IPU executable imposes, so
code that breaks them fails here instead of on a host nobody can test on:

- one compiled executable per wrapper, with the exact input shapes and dtypes it was compiled for;
- the input batch is split into `deviceIterations x replicationFactor` micro-batches, and each
  replica keeps its own copy of the module's buffers (replicated buffers need broadcastBuffers(False));
- a pipelined inference model needs deviceIterations >= its pipeline stages, stages (the ipu ids of
  BeginBlock annotations, in the order the forward visits them) must not go back, and the IPU count
  must be a power of two unless autoRoundNumIPUs;
- an executable holds its IPUs while attached: attaching needs that many free IPUs on the host.

Where it is deliberately stricter than poptorch (flagged below), it is so that tests catch a backend
relying on poptorch's implicit behaviour: calling an uncompiled wrapper compiles it, and calling a
detached one re-attaches it (grabbing the IPUs again), in real poptorch; here both raise.

Everything called on `Options` is recorded in `Options.calls` so tests can check IPU sizing.

In a worker SUBPROCESS (tests/test_ipu_worker.py) the double is `poptorch` through the shim
tests/fake_ipu_site/poptorch.py, configured from the environment (`configure_from_env`):
FAKE_POPTORCH_IPUS is the host's IPU count, and FAKE_POPTORCH_LOG names a file that gets one JSON
line per device event (compile with the recorded options, attach, detach, destroy), written and
closed before the call returns, so the test reads the device's history after the process is gone.
"""

from __future__ import annotations

import copy
import enum
import json
import os
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import torch

__version__ = "0.0.0+fake"

# -- host state (configure with reset()) --------------------------------------------------------------
ipu_count = 0  # IPUs this fake host has
executables: list[PoplarExecutor] = []  # every wrapper created, in order
blocks: list[tuple[torch.nn.Module, str | None, int | None]] = []  # BeginBlock calls
_visited: list[int] | None = None  # ipu ids entered while tracing a compile
event_log: str | None = None  # a file that gets one JSON line per device event (see configure_from_env)


def reset(ipus: int = 16, log: str | None = None) -> None:
    """Forget every executable and annotation; the host now has `ipus` IPUs; events go to `log`, if given."""
    global ipu_count, _visited, event_log
    ipu_count = ipus
    executables.clear()
    blocks.clear()
    _visited = None
    event_log = log


def configure_from_env(environ: Any = None) -> None:
    """A fresh host from FAKE_POPTORCH_IPUS (default 16) and FAKE_POPTORCH_LOG (default: no event log)."""
    env = os.environ if environ is None else environ
    reset(int(env.get("FAKE_POPTORCH_IPUS", "16")), env.get("FAKE_POPTORCH_LOG") or None)


def _json_default(value: Any) -> Any:
    if isinstance(value, TensorLocationSettings):
        return {type(value).__name__: value.settings}
    if isinstance(value, PipelinedExecution):
        return {type(value).__name__: list(value.args)}
    return str(value)  # torch dtypes, anything else


def log_event(event: str, **data: Any) -> None:
    """Append one event to the event log (a no-op without one). Opened and closed per event: a line is
    on disk before the call that made it returns, whatever happens to the process after."""
    if event_log is None:
        return
    line = json.dumps({"event": event, "pid": os.getpid(), "t": time.time(), **data}, default=_json_default)
    with open(event_log, "a") as f:
        f.write(line + "\n")


class PoptorchError(RuntimeError):
    pass


# -- hardware queries ---------------------------------------------------------------------------------
def ipuHardwareIsAvailable(num_ipus: int = 1) -> bool:
    return ipu_count >= num_ipus


def ipuHardwareVersion() -> int:
    if ipu_count == 0:
        raise AssertionError("No IPU hardware available on this system")
    return 2


def ipus_in_use() -> int:
    return sum(e._ipus for e in executables if e.isAttachedToDevice())


# -- enums and strategies -----------------------------------------------------------------------------
class OutputMode(enum.IntEnum):
    All = 0
    Final = 1
    EveryN = 2
    Sum = 3
    Default = 4


class AutoStage(enum.IntEnum):
    SameAsIpu = 0
    AutoIncrement = 1


class ConnectionType(enum.IntEnum):
    Always = 0
    OnDemand = 1
    Never = 2


class PipelinedExecution:
    pipelined = True

    def __init__(self, *args: Any):
        self.args = args


class ShardedExecution(PipelinedExecution):
    pipelined = False


# -- options ------------------------------------------------------------------------------------------
class _Recorder:
    """Any method call is recorded as (qualified name, args) in the root Options' `calls` and returns self."""

    _known: frozenset[str] = frozenset()

    def __init__(self, root: Options | None, prefix: str):
        self._root = root
        self._prefix = prefix

    def __getattr__(self, name: str) -> Callable[..., Any]:
        if name.startswith("_") or name not in self._known:
            raise AttributeError(f"poptorch {self._prefix or 'Options'} has no option {name!r} (in this double)")

        def record(*args: Any, **kwargs: Any) -> Any:
            root = self._root if self._root is not None else self
            root.calls.append((self._prefix + name, args + tuple(kwargs.values())))  # type: ignore[union-attr]
            return self

        return record


class _Precision(_Recorder):
    _known = frozenset(
        {"setPartialsType", "enableStochasticRounding", "enableFloatingPointExceptions", "runningStatisticsAlwaysFloat"}
    )


class _TensorLocations(_Recorder):
    _known = frozenset({"setWeightLocation", "setActivationLocation", "setOptimizerLocation", "setAccumulatorLocation"})


class TensorLocationSettings:
    def __init__(self) -> None:
        self.settings: dict[str, Any] = {}

    def useOnChipStorage(self, use: bool = True) -> TensorLocationSettings:
        self.settings["onChip"] = use
        return self


class Options(_Recorder):
    _known = frozenset(
        {
            "deviceIterations",
            "replicationFactor",
            "enableExecutableCaching",
            "autoRoundNumIPUs",
            "setAvailableMemoryProportion",
            "setExecutionStrategy",
            "broadcastBuffers",
            "outputMode",
            "connectionType",
            "useIpuModel",
            "logDir",
            "modelName",
            "randomSeed",
            "enableSyntheticData",
            "showCompilationProgressBar",
        }
    )

    def __init__(self) -> None:
        super().__init__(None, "")
        self.calls: list[tuple[str, tuple[Any, ...]]] = []
        self.Precision = _Precision(self, "Precision.")
        self.TensorLocations = _TensorLocations(self, "TensorLocations.")

    def last(self, name: str, default: Any = None) -> Any:
        """The first argument of the last call of `name` (the setting in force), or `default`."""
        for called, args in reversed(self.calls):
            if called == name:
                return args[0] if args else True
        return default


# -- annotations --------------------------------------------------------------------------------------
class _BlockHook:
    def __init__(self, user_id: str | None, ipu_id: int | None):
        self.user_id = user_id
        self.ipu_id = ipu_id

    def __call__(self, module: torch.nn.Module, args: Any) -> None:
        if _visited is not None:
            _visited.append(self.ipu_id if self.ipu_id is not None else (_visited[-1] if _visited else 0))


def BeginBlock(
    layer_to_call: torch.nn.Module, user_id: str | None = None, ipu_id: int | None = None
) -> torch.nn.Module:
    if any(isinstance(h, _BlockHook) for h in layer_to_call._forward_pre_hooks.values()):
        raise PoptorchError("module has already been assigned to a block.")
    layer_to_call.register_forward_pre_hook(_BlockHook(user_id, ipu_id))
    blocks.append((layer_to_call, user_id, ipu_id))
    return layer_to_call


def removeBlocks(module: torch.nn.Module) -> None:
    for m in module.modules():
        m._forward_pre_hooks = OrderedDict(
            (k, h) for k, h in m._forward_pre_hooks.items() if not isinstance(h, _BlockHook)
        )
    blocks[:] = [b for b in blocks if not any(b[0] is m for m in module.modules())]


# -- the executor ---------------------------------------------------------------------------------------
def inferenceModel(model: torch.nn.Module, options: Options | None = None) -> PoplarExecutor:
    # poptorch wraps a shallow copy: parameters and buffers are shared with `model`.
    exe = PoplarExecutor(copy.copy(model), options or Options())
    executables.append(exe)
    return exe


def _signature(inputs: tuple[Any, ...]) -> list[tuple[tuple[int, ...], torch.dtype]]:
    if not all(isinstance(t, torch.Tensor) for t in inputs):
        raise PoptorchError("this double only takes positional tensor inputs")
    return [(tuple(t.shape), t.dtype) for t in inputs]


class PoplarExecutor:
    def __init__(self, model: torch.nn.Module, options: Options):
        self.model = model
        self.options = options
        self._compiled = False
        self._attached = False
        self._signature: list[tuple[tuple[int, ...], torch.dtype]] = []
        self._ipus = 0
        self.stage_ipus: list[int] = []  # ipu ids in forward order, as traced at compile
        self.runs = 0
        self._replica_buffers: list[dict[str, torch.Tensor]] = []
        self._index = len(executables)  # its position in `executables` (inferenceModel appends it)

    # sizing taken from the options
    @property
    def _iterations(self) -> int:
        return int(self.options.last("deviceIterations", 1))

    @property
    def _replicas(self) -> int:
        return int(self.options.last("replicationFactor", 1))

    def compile(self, *inputs: torch.Tensor) -> None:
        if self._compiled:
            return  # poptorch logs a warning and ignores a second compile
        self._signature = _signature(inputs)
        self._check_batch(inputs)
        self._check_options()
        self._trace(inputs)
        self._compiled = True
        log_event(
            "compile",
            exe=self._index,
            ipus=self._ipus,
            stage_ipus=self.stage_ipus,
            inputs=[list(shape) for shape, _ in self._signature],
            options=[[name, list(args)] for name, args in self.options.calls],
        )
        if self.options.last("connectionType", ConnectionType.Always) == ConnectionType.Always:
            self.attachToDevice()

    def _check_options(self) -> None:
        mode = self.options.last("outputMode", OutputMode.Default)
        if mode not in (OutputMode.All, OutputMode.Default):
            raise NotImplementedError("this double only returns every micro-batch (OutputMode.All)")
        named = dict(self.model.named_buffers())
        if self._replicas > 1 and named and self.options.last("broadcastBuffers", True):
            raise PoptorchError("buffers with replication need Options.broadcastBuffers(False)")

    def _trace(self, inputs: tuple[torch.Tensor, ...]) -> None:
        """Run one micro-batch to learn the stage layout (buffers are restored: tracing changes nothing)."""
        global _visited
        saved = {k: v.clone() for k, v in self.model.named_buffers()}
        _visited = []
        try:
            with torch.no_grad():
                self.model(*self._micro_batches(inputs)[0])
            visited = _visited
        finally:
            _visited = None
            self._load_buffers(saved)
        self.stage_ipus = [i for n, i in enumerate(visited) if n == 0 or i != visited[n - 1]]
        stages = max(visited, default=0) + 1
        strategy = self.options.last("setExecutionStrategy", PipelinedExecution())
        if strategy.pipelined:
            if self.stage_ipus != sorted(self.stage_ipus):
                raise PoptorchError(f"pipeline stages must not go back to an earlier IPU: {self.stage_ipus}")
            if self._iterations < len(set(visited or [0])):
                raise PoptorchError(
                    f"pipelined inference needs deviceIterations >= {stages} stages, got {self._iterations}"
                )
        self._ipus = stages * self._replicas
        if self._ipus & (self._ipus - 1) and not self.options.last("autoRoundNumIPUs", False):
            raise PoptorchError(f"the model needs {self._ipus} IPUs, not a power of 2 (see autoRoundNumIPUs)")
        if self._ipus & (self._ipus - 1):
            self._ipus = 1 << (self._ipus - 1).bit_length()
        snapshot = {k: v.clone() for k, v in self.model.named_buffers()}
        self._replica_buffers = [{k: v.clone() for k, v in snapshot.items()} for _ in range(self._replicas)]

    def _check_batch(self, inputs: tuple[torch.Tensor, ...]) -> None:
        per_call = self._iterations * self._replicas
        for t in inputs:
            if t.dim() == 0 or t.shape[0] % per_call:
                raise PoptorchError(
                    f"input batch {tuple(t.shape)} must be a multiple of deviceIterations x "
                    f"replicationFactor = {per_call}"
                )

    def _micro_batches(self, inputs: tuple[torch.Tensor, ...]) -> list[tuple[torch.Tensor, ...]]:
        """Host batch -> micro-batches, iteration-major then replica (the order is the double's own)."""
        n = self._iterations * self._replicas
        return [tuple(c) for c in zip(*(t.chunk(n) for t in inputs), strict=True)]

    def _load_buffers(self, values: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            for name, buf in self.model.named_buffers():
                buf.copy_(values[name])

    def __call__(self, *inputs: torch.Tensor) -> Any:
        if not self._compiled:
            raise PoptorchError("not compiled: call compile() first (stricter than poptorch, which compiles here)")
        if not self._attached:
            raise PoptorchError("not attached (stricter than poptorch, which would attach again here)")
        sig = _signature(inputs)
        if sig != self._signature:
            raise PoptorchError(f"inputs {sig} differ from the compiled {self._signature}: that is a recompile")
        # Buffers live on the device: an inference model never copies them back to the host module.
        host = {k: v.clone() for k, v in self.model.named_buffers()}
        outs = []
        with torch.no_grad():
            try:
                for n, micro in enumerate(self._micro_batches(inputs)):
                    outs.append(self._run_replica(n % self._replicas, micro))
            finally:
                self._load_buffers(host)
        self.runs += 1
        return torch.cat(outs)

    def _run_replica(self, replica: int, micro: tuple[torch.Tensor, ...]) -> torch.Tensor:
        self._load_buffers(self._replica_buffers[replica])
        out = self.model(*micro)
        if not isinstance(out, torch.Tensor):
            raise PoptorchError("this double only returns a single tensor output")
        self._replica_buffers[replica] = {k: v.clone() for k, v in self.model.named_buffers()}
        return out.clone()

    # -- device state, with poptorch's own errors --------------------------------------------------
    def isCompiled(self) -> bool:
        return self._compiled

    def isAttachedToDevice(self) -> bool:
        return self._compiled and self._attached

    def attachToDevice(self) -> None:
        if not self._compiled:
            raise PoptorchError("Model has not been compiled or has been destroyed.")
        if self._attached:
            raise PoptorchError("Device is already attached")
        free = ipu_count - ipus_in_use()
        if self._ipus > free:
            raise PoptorchError(f"needs {self._ipus} IPUs, {free} of {ipu_count} are free")
        self._attached = True
        # poptorch copies the host weights and buffers to the device on every attach.
        host = {k: v.clone() for k, v in self.model.named_buffers()}
        self._replica_buffers = [{k: v.clone() for k, v in host.items()} for _ in range(self._replicas)]
        log_event("attach", exe=self._index, ipus=self._ipus, in_use=ipus_in_use(), of=ipu_count)

    def detachFromDevice(self) -> None:
        if not self._compiled:
            raise PoptorchError("Model has not been compiled or has been destroyed.")
        if not self._attached:
            raise PoptorchError("Device is not attached")
        self._attached = False
        log_event("detach", exe=self._index, runs=self.runs, in_use=ipus_in_use(), of=ipu_count)

    def destroy(self) -> None:
        self._compiled = False
        self._attached = False
        self._replica_buffers = []
        log_event("destroy", exe=self._index)
