"""Model and device presets, read from presets.yaml and validated."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from shared.errors import first_error
from shared.prompts import PromptFormat

PRESETS_FILE = Path(__file__).with_name("presets.yaml")


class ModelPreset(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = ""
    source: str  # hub id, local path, package:<python package dir>, or builtin:tiny-neox
    gguf_file: str | None = None
    prompt_format: PromptFormat = PromptFormat.chat_template
    end_keys: list[str] = Field(default_factory=list)  # extra end tokens beside the tokenizer's eos
    sequence_length: int = Field(512, ge=16)
    max_sequence_length: int = Field(2048, ge=16)

    @model_validator(mode="after")
    def _lengths(self) -> ModelPreset:
        if self.sequence_length > self.max_sequence_length:
            raise ValueError(
                f"sequence_length {self.sequence_length} exceeds max_sequence_length {self.max_sequence_length}"
            )
        return self


class DevicePreset(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = ""
    backend: Literal["torch", "ipu"] = "torch"
    device: Literal["cpu", "cuda", "ipu"] = "cpu"
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    slots: int = Field(8, ge=1, le=1024)  # concurrent sequences (the IPU micro-batch)
    # Weight-only quantization on CPU (worker/pipeline/quantize.py): int8 per output channel, or int4 in groups of
    # 32 (GGUF's Q4_1 layout: a Q4_1 model's weights as the file has them); bf16 activations either way.
    quantize: Literal["none", "int8", "int4"] = "none"
    # The quantized layers' matmuls: "auto", our kernels (worker/pipeline/cpu_gemm.c, built with the C compiler at
    # the first start: x86-64 with AVX2) where they build, else torch's; "torch", torch's int4pack / int8pack.
    cpu_gemm: Literal["auto", "torch"] = "auto"
    cuda_graphs: bool = False  # static decode shapes, each captured once as a CUDA graph
    # torch.compile the decode step (fuses the small ops between the matmuls): on CUDA the static step before its
    # capture (a minute or two at start); on CPU the 1-row step only, where it pays (~1 min at the first start).
    compile_decode: bool = False
    # A lean forward (worker/pipeline/lean_llama.py, lean_neox.py) for Llama-shaped and GPT-NeoX models instead of
    # transformers' modules: the same arithmetic with far fewer operations per step; others keep transformers'.
    lean_model: bool = False
    # Prefix reuse (worker/engine/prefix_cache.py): finished sequences' KV stays for prompts that extend it.
    prefix_cache: bool = True
    # KV rows beyond `slots` that only hold cached prefixes, each as large as a slot; None = as many as slots.
    prefix_cache_slots: int | None = Field(None, ge=0, le=4096)
    ipus: int = Field(0, ge=0)
    available_memory_proportion: float = Field(0.4, gt=0, le=1)
    executable_cache: str = ".cache/poptorch"

    @model_validator(mode="after")
    def _compile_needs_graphs(self) -> DevicePreset:
        if self.compile_decode and not self.cuda_graphs and self.device != "cpu":
            raise ValueError("compile_decode compiles the static decode step: set cuda_graphs too")
        return self

    @property
    def spare_slots(self) -> int:
        """KV rows for cached prefixes past the decode slots: 0 with the prefix cache off."""
        if not self.prefix_cache:
            return 0
        return self.slots if self.prefix_cache_slots is None else self.prefix_cache_slots


class Presets(BaseModel):
    models: dict[str, ModelPreset]
    devices: dict[str, DevicePreset]

    def model(self, name: str) -> ModelPreset:
        """A preset by name; anything else is taken as a hub id or local path."""
        if name in self.models:
            return self.models[name].model_copy(update={"name": name})
        if "/" in name or Path(name).exists():
            return ModelPreset(name=name, source=name)
        raise KeyError(f"unknown model {name!r}: not a preset ({', '.join(self.models)}), a hub id or a path")

    def device(self, name: str) -> DevicePreset:
        if name not in self.devices:
            raise KeyError(f"unknown device {name!r}: expected one of {', '.join(self.devices)}")
        return self.devices[name].model_copy(update={"name": name})


def choose_ipu_preset(available_ipus: int) -> str:
    """The device preset for a host with `available_ipus` IPUs, as the original notebook chose:
    exactly 4 -> ipu-pod4, anything else -> ipu-pod16."""
    return "ipu-pod4" if available_ipus == 4 else "ipu-pod16"


def resolve_auto_ipu(device: DevicePreset, available_ipus: int) -> DevicePreset:
    """The auto preset `ipu` (an IPU preset with `ipus: 0`) as the preset `choose_ipu_preset` picks for
    `available_ipus`; any other preset comes back as it is. Fields set on the auto entry itself or by
    CHAT_SLOTS (everything but name, backend, device and ipus) override the chosen preset's."""
    if device.backend != "ipu" or device.ipus:
        return device
    keep = device.model_fields_set - {"name", "backend", "device", "ipus"}
    chosen = load_presets().device(choose_ipu_preset(available_ipus))
    return chosen.model_copy(update={k: getattr(device, k) for k in keep})


@lru_cache(maxsize=4)
def load_presets(path: Path = PRESETS_FILE) -> Presets:
    raw = yaml.safe_load(path.read_text())
    try:
        return Presets.model_validate(raw)
    except ValidationError as e:
        err = first_error(e)
        raise ValueError(f"{path.name}: {err.dotted}: {err.msg}") from None
