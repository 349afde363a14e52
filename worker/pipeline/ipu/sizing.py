"""How an IPU preset maps onto a host, without compiling anything: the IPUs the host has, the auto
preset `ipu` resolved by them, the plan (pipeline stages x replicas) the backend compiles, and the
engine slots and Celery concurrency that plan gives. Only `detect_ipus`, `import_poptorch`,
`resolve_device` and `check_hardware` touch poptorch.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from types import ModuleType
from typing import Any

from config.presets import DevicePreset, ModelPreset, choose_ipu_preset, resolve_auto_ipu
from worker.pipeline.loader import resolve_source

log = logging.getLogger(__name__)


def import_poptorch(device: DevicePreset) -> ModuleType:
    """poptorch, or RuntimeError naming `device` and how to install it (it ships with the Poplar SDK)."""
    try:
        import poptorch
    except ImportError:
        raise RuntimeError(
            f"device {device.name!r} needs poptorch, which ships with Graphcore's Poplar SDK (not on PyPI): "
            "enable the SDK and install its poptorch wheel into this virtualenv (see docs/IPU.md)"
        ) from None
    return poptorch


def detect_ipus(poptorch: ModuleType) -> int:
    """How many IPUs this host has (the largest power of two poptorch reports; free or not)."""
    n = 0
    while n < 1024 and poptorch.ipuHardwareIsAvailable(max(1, 2 * n)):
        n = max(1, 2 * n)
    return n


def resolve_device(device: DevicePreset, announce: bool = True) -> DevicePreset:
    """`config.presets.resolve_auto_ipu` with the IPUs this host reports: the auto preset `ipu` becomes
    ipu-pod4 or ipu-pod16; any other preset comes back as it is. Raises RuntimeError without poptorch
    (the same start-up error as the backend's)."""
    if device.backend != "ipu" or device.ipus:
        return device
    have = detect_ipus(import_poptorch(device))
    chosen = resolve_auto_ipu(device, have)
    if announce:
        log.info(
            "device %r: this host reports %d IPU(s): using preset %r (%d IPUs, micro-batch %d)",
            device.name,
            have,
            chosen.name,
            chosen.ipus,
            chosen.slots,
        )
    return chosen


def check_hardware(poptorch: ModuleType, device: DevicePreset, plan: IPUPlan) -> None:
    """Raises RuntimeError naming the preset when this host has fewer IPUs than `plan` needs (and the
    preset that would fit); poptorch's IPU model (POPTORCH_IPU_MODEL=1) needs none."""
    if os.environ.get("POPTORCH_IPU_MODEL") == "1":  # poptorch's simulator: no hardware needed
        return
    if not poptorch.ipuHardwareIsAvailable(plan.ipus):
        have = detect_ipus(poptorch)
        fits = choose_ipu_preset(have)
        hint = f"; for {have} IPUs the preset is {fits!r}" if have and fits != device.name else ""
        raise RuntimeError(f"device {device.name!r} needs {plan.ipus} IPUs, this host has {have}{hint}")


def model_layers(model: ModelPreset) -> int | None:
    """A model's decoder layer count from its config alone (no weights); None when it cannot be read."""
    try:
        if model.source == "builtin:tiny-neox":
            from worker.pipeline import tiny_neox

            return int(tiny_neox.build_model(16).config.num_hidden_layers)
        from transformers import AutoConfig

        kw: dict[str, Any] = {"gguf_file": model.gguf_file} if model.gguf_file else {}
        cfg = AutoConfig.from_pretrained(resolve_source(model), **kw)
        cfg = getattr(cfg, "text_config", None) or cfg
        return int(cfg.num_hidden_layers)
    except Exception as e:  # the load itself reports a bad source; here it only costs precision
        log.warning("model %r: cannot read its layer count (%s)", model.name, e)
        return None


@dataclass(frozen=True)
class IPUPlan:
    """How one executable uses the preset's IPUs."""

    ipus: int  # IPUs the preset asks for
    stages: int  # IPUs one copy of the model spans (its decoder layers split evenly)
    replicas: int  # copies of the model (data parallel), ipus // stages
    micro_batch: int  # rows one stage processes at a time (the preset's slots)
    iterations: int  # micro-batches per call per replica (>= stages when pipelined)
    pipelined: bool

    @property
    def rows(self) -> int:
        """Rows per call: the sequences the engine runs together."""
        return self.micro_batch * self.iterations * self.replicas

    @property
    def ipus_used(self) -> int:
        """IPUs the plan occupies: stages x replicas (autoRoundNumIPUs may reserve up to the next power of two)."""
        return self.stages * self.replicas


def plan_ipus(ipus: int, num_layers: int, micro_batch: int, pipelined: bool = True) -> IPUPlan:
    """Spread the layers over all the IPUs; a model with fewer layers than IPUs is replicated instead."""
    if ipus < 1:
        raise ValueError("an IPU device preset needs ipus >= 1")
    stages = max(1, min(ipus, num_layers))
    replicas = max(1, ipus // stages)
    iterations = stages if pipelined else 1  # poptorch: pipelined inference needs deviceIterations >= stages
    return IPUPlan(ipus, stages, replicas, micro_batch, iterations, pipelined)


def stage_starts(num_layers: int, stages: int) -> list[int]:
    """First layer of each stage: layers split as evenly as they go."""
    return [i * num_layers // stages for i in range(stages)]


def engine_slots(device: DevicePreset, num_layers: int | None, pipelined: bool = True) -> int:
    """The slots the engine over an IPUBackend gets (`IPUPlan.rows`), without compiling anything. With
    the layer count unknown: micro-batch x IPUs, the most a plan can give (stages x replicas <= ipus)."""
    if num_layers is None:
        return device.slots * device.ipus
    return plan_ipus(device.ipus, num_layers, device.slots, pipelined).rows


def worker_slots(device: DevicePreset, model: ModelPreset) -> int:
    """Celery's concurrency for an IPU worker: one task thread per engine slot. Only the auto preset
    needs poptorch here; without it the count falls back to the preset's own slots, as the worker
    then fails at start anyway, with the clear error."""
    try:
        device = resolve_device(device, announce=False)
    except RuntimeError:
        return device.slots
    return engine_slots(device, model_layers(model))
