"""What the engine asks of a device: prefill prompt pieces into slots, decode a batch of slots, detach.

Every backend keeps a KV cache of `slots x max_len` positions on its device. Shapes are static:
prefill runs in chunks from a fixed set of sizes, decode over a fixed row count per call site, so
compiled graphs (CUDA graphs, poptorch executables) are reused instead of rebuilt per prompt.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple, Protocol

import torch

# Prompt chunk sizes; a prompt is cut into these. Steps of 16 keep padding under 16 tokens a chunk
# (prompts prefilled together share a chunk size, so padding is paid once per row), and 16 shapes
# are few enough to warm up. The largest is also the engine's per-iteration prefill budget.
PREFILL_CHUNKS = tuple(range(16, 257, 16))


def chunk_plan(n: int, chunks: tuple[int, ...] = PREFILL_CHUNKS) -> list[tuple[int, int]]:
    """Cut n prompt tokens into (real, padded) chunk sizes: full largest chunks, then the smallest
    chunk size that holds the rest."""
    plan = []
    big = chunks[-1]
    while n > big:
        plan.append((big, big))
        n -= big
    plan.append((n, next(c for c in chunks if c >= n)))
    return plan


@dataclass(frozen=True)
class Prefill:
    """Prompt tokens `ids` to write into `slot` at positions start, start+1, ..."""

    slot: int
    ids: list[int]
    start: int


def check_prefills(prefills: Sequence[Prefill], slots: int, max_len: int) -> None:
    """The contract every backend enforces before touching its cache."""
    if not prefills:
        raise ValueError("prefill: nothing to prefill")
    seen: set[int] = set()
    for p in prefills:
        if not 0 <= p.slot < slots:
            raise ValueError(f"prefill: slot {p.slot} outside 0..{slots - 1}")
        if p.slot in seen:
            raise ValueError(f"prefill: slot {p.slot} given twice")
        seen.add(p.slot)
        if not p.ids:
            raise ValueError(f"prefill: no tokens for slot {p.slot}")
        if p.start + len(p.ids) > max_len:
            raise ValueError(f"prompt of {p.start + len(p.ids)} tokens exceeds the sequence length {max_len}")


class Copy(NamedTuple):
    """Copy positions 0..length-1 of every layer's keys and values from KV row `src` to row `dst`."""

    src: int
    dst: int
    length: int


class Piece(NamedTuple):
    """One chunk of prefill number `index`: ids[offset : offset + real], padded to `size`."""

    index: int
    offset: int
    real: int
    size: int


def prefill_rounds(prefills: Sequence[Prefill], chunks: tuple[int, ...]) -> list[list[Piece]]:
    """Cut every prefill into chunks (chunk_plan) and deal them into rounds: round k holds each
    prefill's k-th chunk, so one forward per round (and padded size) serves all slots at once,
    each slot's chunks in order."""
    rounds: list[list[Piece]] = []
    for i, p in enumerate(prefills):
        offset = 0
        for k, (real, size) in enumerate(chunk_plan(len(p.ids), chunks)):
            if k == len(rounds):
                rounds.append([])
            rounds[k].append(Piece(i, offset, real, size))
            offset += real
    return rounds


def kv_dims(config: Any) -> tuple[int, int]:
    """(kv_heads, head_dim) of a transformers model config: grouped-query models have fewer KV heads
    than attention heads (num_key_value_heads); head_dim defaults to hidden_size / heads."""
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return kv_heads, head_dim


def cache_keyword(forward: Callable[..., Any]) -> str:
    """The keyword a transformers model's forward takes its KV cache by: `cache` since transformers 5.2x
    renamed it, `past_key_values` before (the Poplar SDK pins an older one)."""
    return "cache" if "cache" in inspect.signature(forward).parameters else "past_key_values"


class Backend(Protocol):
    """What the engine needs of a device (TorchBackend, IPUBackend): a KV cache of `slots x max_len` positions
    written by prefill and decode."""

    slots: int  # sequences decoded together (the micro-batch on IPU)
    max_len: int  # positions per slot (the compiled sequence length)
    attached: bool
    prefix_reuse: bool  # copy_kv works: the engine keeps finished sequences' KV for prompts that extend it
    spare_slots: int  # KV rows past `slots` that only hold cached prefixes (prefix_reuse only)

    def prefill(self, prefills: Sequence[Prefill]) -> torch.Tensor:
        """Write each prefill into its slot (distinct slots), batched where the device allows.
        Returns the logits of each prefill's last token, (len(prefills), vocab) fp32, in order."""
        ...

    def decode(self, ids: torch.Tensor, positions: torch.Tensor, active: torch.Tensor) -> torch.Tensor:
        """One token for each of the first `len(ids)` slots at `positions`; rows where `active` is
        False are idle (their writes go nowhere). Returns logits (rows, vocab) fp32."""
        ...

    def copy_kv(self, copies: Sequence[Copy]) -> None:
        """Run KV row copies in order, before the next forward (only called when prefix_reuse)."""
        ...

    def warm_up(self) -> None:
        """Run what the first requests would otherwise pay for (first-call costs, graph capture, compile),
        before the worker takes turns."""
        ...

    def detach(self) -> None:
        """Release the device. Idempotent."""
        ...
