"""worker/pipeline/weights_cache.py: a GGUF model's second load comes from the safetensors cache, with the
same weights; a stale entry is never used, a corrupt one is found, removed and rebuilt."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import pytest
import torch

from config.presets import load_presets
from worker.pipeline import weights_cache
from worker.pipeline.loader import load_model, resolve_source


@pytest.mark.smollm2
def test_the_second_load_reads_the_cache_and_a_corrupt_entry_is_rebuilt(tmp_path: Path, caplog) -> None:
    preset = load_presets().model("smollm2-135m")
    with caplog.at_level(logging.INFO, logger="worker.pipeline"):
        first = load_model(preset, torch.float32, str(tmp_path))
        (entry,) = [p for p in tmp_path.iterdir() if not p.name.startswith(".")]
        assert "weight cache: saved" in caplog.text
        caplog.clear()
        second = load_model(preset, torch.float32, str(tmp_path))
        assert f"from the weight cache {entry}" in caplog.text
    assert second.load_s < first.load_s
    for (name, a), (_, b) in zip(first.model.state_dict().items(), second.model.state_dict().items()):
        assert torch.equal(a, b), name
    assert second.codec.encode_plain("héllo <|im_start|>") == first.codec.encode_plain("héllo <|im_start|>")
    assert second.tokenizer.chat_template == first.tokenizer.chat_template

    import shutil

    same_size = tmp_path / "damaged-in-place"
    shutil.copytree(entry, same_size)
    with open(same_size / "model.safetensors", "r+b") as f:  # bytes overwritten, the size kept (it was served)
        f.seek(50 << 20)
        f.write(os.urandom(1 << 20))
    weights = entry / "model.safetensors"
    with open(weights, "r+b") as f:  # a disk that filled up while it was written, say
        f.truncate(weights.stat().st_size // 2)
    for damaged in (entry, same_size):
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="worker.pipeline"):
            assert weights_cache.load(tmp_path, damaged.name, torch.float32) is None
        assert "is unreadable" in caplog.text and not damaged.exists()  # removed: the next load rebuilds it


def test_an_entry_is_keyed_by_the_source_file_as_it_is_now(tmp_path: Path) -> None:
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF v1")
    key = weights_cache.cache_key(gguf, torch.float32)
    assert weights_cache.cache_key(gguf, torch.float32) == key
    assert weights_cache.cache_key(gguf, torch.bfloat16) != key  # another dtype, another entry
    os.utime(gguf, ns=(1, 1))  # the file was replaced: a stale entry is never looked up
    assert weights_cache.cache_key(gguf, torch.float32) != key
    preset = load_presets().model("smollm2-135m")
    assert Path(resolve_source(preset), preset.gguf_file).exists()  # what the worker keys on


def test_entries_whose_source_is_gone_or_changed_are_pruned(tmp_path: Path) -> None:
    """Every new checkout keys its own entry (the GGUF's path is in the key): without pruning, each one left
    ~540 MB behind for good. An entry no key can reach again is removed; the rest stay."""
    kept_src, moved_src, changed_src = (tmp_path / f"{n}.gguf" for n in ("kept", "moved", "changed"))
    for src in (kept_src, moved_src, changed_src):
        src.write_bytes(b"GGUF v1")
    root = tmp_path / "cache"

    def entry(name: str, source: list | None) -> Path:
        folder = root / name
        folder.mkdir(parents=True)
        body = {"files": {}, "written": 0.0, **({"source": source} if source is not None else {})}
        (folder / weights_cache.MANIFEST).write_text(json.dumps(body))
        return folder

    kept = entry("kept", weights_cache._source(kept_src))
    moved = entry("moved", weights_cache._source(moved_src))
    changed = entry("changed", weights_cache._source(changed_src))
    legacy = entry("legacy", None)  # written before manifests named their source
    moved_src.unlink()  # a deleted checkout
    os.utime(changed_src, ns=(1, 1))  # the file replaced
    assert sorted(weights_cache.prune_stale(root)) == ["changed", "moved"]
    assert kept.exists() and legacy.exists() and not moved.exists() and not changed.exists()
