"""Loaded weights kept on disk, so a worker's second start skips the slow part of loading.

A GGUF is dequantized at every load (transformers converts its tensors one by one: ~15 s for
SmolLM2-135M on 2 cores, most of a worker's start). After the first load the model and tokenizer are
saved once as a plain transformers folder (safetensors) under CHAT_WEIGHTS_CACHE, keyed by the source
file's identity (path, size, modification time), the dtype and the torch/transformers versions; the
next start loads that folder instead (about a second). Sources that are already safetensors folders,
and the built-in tiny-neox, are not cached: they load as fast as the cache would.

A stale entry cannot be used (its key names the source file as it was), so it is removed: each entry's
manifest names its source file, and writing a new entry prunes those whose source is gone or changed
(a deleted checkout, a replaced file: otherwise every new checkout's virtualenv left ~540 MB behind for
good). A corrupt one (a truncated
or damaged file, a missing one, sizes or checksums that differ from the manifest written last) fails
to load, is removed and rebuilt; an entry is written to a temporary folder and renamed into place
complete, so a worker killed while writing leaves no half entry.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
import uuid
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)

MANIFEST = "chat-weights.json"


def _source(source_file: Path) -> list[str | int]:
    """The source file's identity: [absolute path, size in bytes, modification time in ns]."""
    st = source_file.stat()
    return [str(source_file.resolve()), st.st_size, st.st_mtime_ns]


def cache_key(source_file: Path, dtype: torch.dtype) -> str:
    """The entry's name: what the loaded weights depend on."""
    import transformers

    ident = [*_source(source_file), str(dtype), torch.__version__, transformers.__version__]
    return hashlib.sha256(json.dumps(ident).encode()).hexdigest()[:32]


def prune_stale(root: Path) -> list[str]:
    """Remove the entries whose manifest names a source file that is gone or has changed since (no key can
    reach them again); returns their names. Entries written before manifests named their source are kept."""
    removed = []
    for manifest in root.glob(f"*/{MANIFEST}"):
        try:
            recorded = json.loads(manifest.read_text()).get("source")
            if recorded is None:
                continue
            path = Path(recorded[0])
            if path.exists() and _source(path) == recorded:
                continue
        except (OSError, ValueError, AttributeError, IndexError):
            continue  # unreadable now: load() finds and rebuilds it when its key comes up
        shutil.rmtree(manifest.parent, ignore_errors=True)
        removed.append(manifest.parent.name)
    if removed:
        log.info("weight cache: removed %d entr%s whose source file is gone or changed", len(removed),
                 "y" if len(removed) == 1 else "ies")
    return removed


def _digest(path: Path) -> str:
    """A checksum against damage, not against an attacker (who could rewrite the manifest too): SHA-1 reads
    the 540 MB of SmolLM2-135M's fp32 weights in ~0.3 s here (SHA-256: 1.4 s), and warms the page cache the
    load then reads from."""
    with path.open("rb") as f:
        return hashlib.file_digest(f, lambda: hashlib.sha1(usedforsecurity=False)).hexdigest()


def _files(folder: Path) -> dict[str, list[int | str]]:
    """name -> [size, checksum] of every file of the entry but the manifest."""
    return {p.name: [p.stat().st_size, _digest(p)] for p in sorted(folder.iterdir())
            if p.is_file() and p.name != MANIFEST}


def load(root: Path, key: str, dtype: torch.dtype) -> tuple[Any, Any] | None:
    """(tokenizer, model) from the entry, or None when there is none or it is corrupt (then it is removed)."""
    folder = root / key
    manifest = folder / MANIFEST
    if not manifest.exists():
        return None
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        expected = json.loads(manifest.read_text())["files"]
        if _files(folder) != expected:
            raise ValueError("its files differ from its manifest")
        tokenizer = AutoTokenizer.from_pretrained(folder)
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, attn_implementation="sdpa")
    except Exception as e:  # noqa: BLE001 - whatever is wrong with it, the source is still there
        log.warning("weight cache %s is unreadable (%s: %s): rebuilding it", folder, type(e).__name__, e)
        shutil.rmtree(folder, ignore_errors=True)
        return None
    return tokenizer, model


def store(root: Path, key: str, tokenizer: Any, model: Any, source_file: Path) -> None:
    """Write the entry for weights loaded from `source_file` (a no-op if another worker just did), then prune
    the stale ones. transformers will not save a model loaded from a GGUF, so a copy is built from its
    config and given its weights."""
    from transformers import AutoModelForCausalLM

    folder = root / key
    if (folder / MANIFEST).exists():
        return
    tmp = root / f".{key}.{uuid.uuid4().hex}.tmp"  # not the pid: containers sharing the volume repeat pids
    t0 = time.perf_counter()
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        with torch.device("meta"):
            plain = AutoModelForCausalLM.from_config(model.config, dtype=model.dtype)
        plain.load_state_dict(model.state_dict(), assign=True)
        plain.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        (tmp / MANIFEST).write_text(json.dumps({"files": _files(tmp), "written": time.time(),
                                                "source": _source(source_file)}))
        try:
            os.rename(tmp, folder)
        except OSError:  # another worker renamed its own copy in first: keep that one
            shutil.rmtree(tmp, ignore_errors=True)
            return
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("weight cache: saved %s in %.1fs (next start loads from it)", folder, time.perf_counter() - t0)
    prune_stale(root)
