"""Build the backend a device preset asks for, over a loaded model."""

from __future__ import annotations

import torch

from config.presets import DevicePreset
from worker.pipeline.backend import Backend
from worker.pipeline.loader import DTYPES, LoadedModel


def backend_dtype(device: DevicePreset) -> torch.dtype:
    """The dtype to load weights in: int8 quantization starts from fp32 and converts itself."""
    return DTYPES[device.dtype]


def build_backend(device: DevicePreset, loaded: LoadedModel, max_len: int) -> Backend:
    if device.backend == "ipu":
        from worker.pipeline.ipu_backend import IPUBackend, resolve_device  # poptorch is optional: import only here

        device = resolve_device(device)  # the auto preset `ipu`: ipu-pod4 or ipu-pod16 by the host's IPUs
        return IPUBackend(loaded.model, device, slots=device.slots, max_len=max_len)
    from worker.pipeline.torch_backend import TorchBackend

    if device.device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device 'cuda': no CUDA GPU is visible to torch on this host")
    return TorchBackend(
        loaded.model,
        slots=device.slots,
        max_len=max_len,
        device=device.device,
        quantize=device.quantize,
        cuda_graphs=device.cuda_graphs,
        compile_decode=device.compile_decode,
    )
