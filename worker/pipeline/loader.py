"""Load a model and its tokenizer from a preset: hub id, local path, a package's GGUF, or tiny-neox."""

from __future__ import annotations

import importlib.util
import logging
import os
import time
from dataclasses import dataclass
from typing import Any

import torch

from config.presets import ModelPreset
from shared.codec import Codec

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class LoadError(RuntimeError):
    """The model could not be loaded: the worker must not start."""


@dataclass
class LoadedModel:
    preset: ModelPreset
    model: Any  # a transformers *ForCausalLM
    tokenizer: Any
    codec: Codec
    load_s: float


def resolve_source(preset: ModelPreset) -> str:
    if preset.source.startswith("package:"):
        pkg = preset.source.removeprefix("package:")
        spec = importlib.util.find_spec(pkg)
        if spec is None or spec.origin is None:
            raise LoadError(f"model {preset.name!r}: package {pkg!r} is not installed")
        return os.path.dirname(spec.origin)
    return preset.source


def quiet_progress_bars() -> None:
    """No tqdm bars while loading: in a worker Celery logs them as WARNING lines (one per refresh), and in
    the CLI they would mix with the chat. The loader logs its own INFO lines instead."""
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TQDM_DISABLE", "1")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


def load_model(preset: ModelPreset, dtype: torch.dtype = torch.float32) -> LoadedModel:
    quiet_progress_bars()
    t0 = time.perf_counter()
    try:
        if preset.source == "builtin:tiny-neox":
            from worker.pipeline import tiny_neox

            tokenizer, model = tiny_neox.build()
            model = model.to(dtype)
        else:
            from transformers import AutoModelForCausalLM, AutoTokenizer

            src = resolve_source(preset)
            kw: dict[str, Any] = {"gguf_file": preset.gguf_file} if preset.gguf_file else {}
            tokenizer = AutoTokenizer.from_pretrained(src, **kw)
            model = AutoModelForCausalLM.from_pretrained(src, dtype=dtype, attn_implementation="sdpa", **kw)
    except LoadError:
        raise
    except Exception as e:  # hub unreachable, bad path, corrupt weights...
        raise LoadError(f"model {preset.name!r} from {preset.source!r} failed to load: {e}") from e
    model.eval()
    model.requires_grad_(False)
    codec = Codec(tokenizer, preset.prompt_format, preset.end_keys)
    dt = time.perf_counter() - t0
    log.info("loaded model %s (%s) in %.1fs", preset.name, preset.source, dt)
    return LoadedModel(preset, model, tokenizer, codec, dt)
