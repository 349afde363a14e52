"""Load a model and its tokenizer from a preset: hub id, local path, a package's GGUF, or tiny-neox."""

from __future__ import annotations

import importlib.util
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from config.presets import ModelPreset
from config.quiet import no_progress_bars
from shared.codec import Codec

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class LoadError(RuntimeError):
    """The model could not be loaded: the worker must not start."""


@dataclass
class LoadedModel:
    """A loaded model with its tokenizer and Codec; load_s: how long loading took (seconds)."""

    preset: ModelPreset
    model: Any  # a transformers *ForCausalLM
    tokenizer: Any
    codec: Codec
    load_s: float


def resolve_source(preset: ModelPreset) -> str:
    """Where the preset's model is read from: for `package:<name>` the installed package's directory (LoadError
    when it is not installed), else the source as given (hub id or path)."""
    if preset.source.startswith("package:"):
        pkg = preset.source.removeprefix("package:")
        spec = importlib.util.find_spec(pkg)
        if spec is None or spec.origin is None:
            raise LoadError(f"model {preset.name!r}: package {pkg!r} is not installed")
        return os.path.dirname(spec.origin)
    return preset.source


def quiet_progress_bars() -> None:
    """No tqdm bars while loading: in a worker Celery logs them as WARNING lines (one per refresh), and in
    the CLI they would mix with the chat. The loader logs its own INFO lines instead. (tqdm reads
    TQDM_DISABLE when it is imported: processes set it first thing, as worker/__main__.py does.)"""
    no_progress_bars()
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


def load_model(preset: ModelPreset, dtype: torch.dtype = torch.float32, cache_dir: str | None = None) -> LoadedModel:
    """The model and its tokenizer. A GGUF source is read from `cache_dir`'s copy when there is a good one
    (worker/pipeline/weights_cache.py), and cached there after a full load; "" or None = no cache."""
    quiet_progress_bars()
    t0 = time.perf_counter()
    try:
        if preset.source == "builtin:tiny-neox":
            from worker.pipeline import tiny_neox

            tokenizer, model = tiny_neox.build()
            model = model.to(dtype)
        else:
            tokenizer, model = _load_pretrained(preset, dtype, cache_dir)
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


def _load_pretrained(preset: ModelPreset, dtype: torch.dtype, cache_dir: str | None) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from worker.pipeline import weights_cache

    src = resolve_source(preset)
    kw: dict[str, Any] = {"gguf_file": preset.gguf_file} if preset.gguf_file else {}
    root = Path(cache_dir).expanduser() if cache_dir and preset.gguf_file else None
    source_file = Path(src, preset.gguf_file) if preset.gguf_file else None
    key = weights_cache.cache_key(source_file, dtype) if root and source_file else None
    if root is not None and key is not None:
        hit = weights_cache.load(root, key, dtype)
        if hit is not None:
            log.info("loaded model %s from the weight cache %s", preset.name, root / key)
            return hit
    tokenizer = AutoTokenizer.from_pretrained(src, **kw)
    model = AutoModelForCausalLM.from_pretrained(src, dtype=dtype, attn_implementation="sdpa", **kw)
    if root is not None and key is not None and source_file is not None:
        try:
            weights_cache.store(root, key, tokenizer, model, source_file)
        except OSError as e:  # a read-only or full disk: the worker still serves, it only starts slowly again
            log.warning("weight cache not written (%s): the next start loads %s again", e, preset.gguf_file)
    return tokenizer, model
