"""Build the backend a device preset asks for, over a loaded model."""

from __future__ import annotations

import torch

from config.presets import DevicePreset
from worker.pipeline.backend import Backend
from worker.pipeline.loader import DTYPES, LoadedModel


def backend_dtype(device: DevicePreset) -> torch.dtype:
    """The dtype to load weights in: int8/int4 quantization starts from fp32 and converts itself."""
    return DTYPES[device.dtype]


def check_device(device: DevicePreset) -> None:
    """Fail before any weights are loaded (a 24 GB model, say) when the device cannot exist here.

    Raises RuntimeError naming the device: an IPU preset without poptorch, `cuda` without a visible GPU.
    Whether the host has enough IPUs for the preset's plan is checked when the pipeline is built."""
    if device.backend == "ipu":
        from worker.pipeline.ipu.sizing import import_poptorch

        import_poptorch(device)
    elif device.device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device {device.name!r}: no CUDA GPU is visible to torch on this host")


def build_backend(device: DevicePreset, loaded: LoadedModel, max_len: int) -> Backend:
    """The backend for `device` over `loaded`'s weights, `max_len` positions per slot (see check_device)."""
    check_device(device)
    if device.backend == "ipu":
        from worker.pipeline.ipu.backend import IPUBackend  # poptorch is optional: import only here
        from worker.pipeline.ipu.sizing import resolve_device

        device = resolve_device(device)  # the auto preset `ipu`: ipu-pod4 or ipu-pod16 by the host's IPUs
        return IPUBackend(loaded.model, device, slots=device.slots, max_len=max_len)
    from worker.pipeline.torch_backend import TorchBackend

    return TorchBackend(
        loaded.model,
        slots=device.slots,
        max_len=max_len,
        device=device.device,
        quantize=device.quantize,
        cuda_graphs=device.cuda_graphs,
        compile_decode=device.compile_decode,
        prefix_reuse=device.prefix_cache,
        spare_slots=device.spare_slots,
        lean=device.lean_model,
        cpu_gemm=device.cpu_gemm,
    )
