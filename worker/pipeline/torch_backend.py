"""The torch backend (CPU and CUDA): transformers' model modules, or a lean forward over their weights
(lean_llama.py, lean_neox.py), over a slot KV cache.

Weights are transformers' own (int8/int4 on CPU: quantize.py); what is ours is the cache layout (kv_cache.py), the
masks, chunked prefill, and on CUDA one captured graph per decode shape, replayed every step
(optionally over a torch.compile'd step, which fuses the many small ops between the matmuls).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Any

import torch

from worker.pipeline import lean_llama, lean_neox
from worker.pipeline.backend import (
    PREFILL_CHUNKS,
    Copy,
    Prefill,
    cache_keyword,
    check_prefills,
    kv_dims,
    prefill_rounds,
)
from worker.pipeline.cpu_gemm import available as kernels_available
from worker.pipeline.kv_cache import SlotKVCache
from worker.pipeline.quantize import quantize_weights

log = logging.getLogger(__name__)


def lean_forward(model: Any, max_len: int) -> torch.nn.Module | None:
    """The lean forward for `model`'s architecture (lean_llama.py, lean_neox.py), or None: transformers' modules."""
    if lean_llama.supports(model):
        return lean_llama.LeanLlama(model.base_model, max_len)
    if lean_neox.supports(model):
        return lean_neox.LeanNeoX(model.base_model, max_len)
    return None


def row_buckets(slots: int) -> list[int]:
    """Decode batch widths that get their own graph: 1, 2, 4, 8, then every multiple of 8, and `slots`.
    A step runs the smallest that holds its rows, so one stream never pays for 64 slots' KV reads."""
    return sorted({w for w in (1, 2, 4, *range(8, slots + 1, 8)) if w < slots} | {slots})


class TorchBackend:
    """The Backend protocol over a transformers CausalLM on CPU or CUDA, with a SlotKVCache. quantize="int8" /
    "int4": weight-only int8 / int4 Linear layers (quantize.py; CPU only); cuda_graphs: static decode, on CUDA one
    captured graph per (row bucket, kv bucket); compile_decode: torch.compile that step (needs cuda_graphs), or on a
    CPU without cuda_graphs the 1-row decode step only;
    kv_block: the kv-length bucket (256 with cuda_graphs); prefix_reuse: the engine may keep finished sequences'
    KV and copy it between rows (copy_kv); spare_slots: KV rows beyond `slots` that only hold such cached prefixes
    (each costs as much memory as a slot); lean: a lean forward instead of transformers' modules where the
    model is Llama-shaped or GPT-NeoX (lean_forward; ignored otherwise); cpu_gemm: "auto", the quantized layers run
    cpu_gemm.py's kernels where they are built (and a bf16 Llama's decode step runs one kernel call per layer,
    cpu_decode_layer.py), or "torch", torch's int4pack / int8pack (quantize.py) and SDPA.
    ValueError for an option combination it cannot run."""

    def __init__(
        self,
        model: Any,
        *,
        slots: int,
        max_len: int,
        device: str = "cpu",
        quantize: str = "none",
        cuda_graphs: bool = False,
        compile_decode: bool = False,
        kv_block: int = 32,
        prefix_reuse: bool = True,
        spare_slots: int = 0,
        lean: bool = False,
        cpu_gemm: str = "auto",
    ):
        if spare_slots < 0 or (spare_slots and not prefix_reuse):
            raise ValueError("spare_slots: at least 0, and only with prefix_reuse")
        self.slots = slots
        self.prefix_reuse = prefix_reuse
        self.spare_slots = spare_slots
        self.max_len = max_len
        self.device = torch.device(device)
        if compile_decode and not cuda_graphs and self.device.type != "cpu":
            raise ValueError("compile_decode compiles the static decode step: it needs cuda_graphs")
        if cpu_gemm not in ("auto", "torch"):
            raise ValueError(f"cpu_gemm: auto or torch, not {cpu_gemm!r}")
        if quantize not in ("none", "int8", "int4"):
            raise ValueError(f"quantize: none, int8 or int4, not {quantize!r}")
        if quantize != "none":
            if self.device.type != "cpu":
                raise ValueError(f"quantize={quantize} is a CPU option")
            # Weight-only int8/int4 + bf16 activations: a quarter/eighth of fp32's bytes per step on a CPU.
            # Decode (at most `slots` rows) keeps the per-row kernels; prompt chunks have more rows.
            model = quantize_weights(model, 4 if quantize == "int4" else 8, gemv_rows=slots,
                                     native=None if cpu_gemm == "auto" else False)
        self.model = model.to(self.device)
        self.base = model.base_model
        self.head = model.get_output_embeddings()
        self.dtype = model.get_input_embeddings().weight.dtype
        self._cache_kw = cache_keyword(self.base.forward)
        # A lean forward (lean_llama.py, lean_neox.py) instead of transformers' modules, where one fits the model.
        self._lean = lean_forward(model, max_len) if lean else None
        if self._lean is not None:
            self._lean.to(self.device)
        if isinstance(self._lean, lean_llama.LeanLlama):
            # a decode step as one kernel call per layer, where every projection runs ours
            self._lean.use_kernels(cpu_gemm == "auto" and self.device.type == "cpu" and self.dtype == torch.bfloat16
                                   and kernels_available())
        self.cache = SlotKVCache(model.config.num_hidden_layers, slots, max_len, self.dtype, self.device,
                                 spare_slots)
        try:
            self.cache.allocate(*kv_dims(model.config))
        except RuntimeError as e:  # torch's out-of-memory errors are RuntimeErrors
            raise RuntimeError(
                f"the KV cache ({slots} slots + {spare_slots} prefix-cache rows x {max_len} positions) does not fit: "
                f"{e}; lower CHAT_PREFIX_CACHE_SLOTS, CHAT_SLOTS or CHAT_SEQUENCE_LENGTH") from None
        self.kv_block = kv_block if not cuda_graphs else 256
        self.attached = True
        # Static decode: a step runs a bucket of rows (row_buckets) from fixed input buffers, one set
        # per (rows, kv length). On CUDA each is captured as a graph and replayed; elsewhere the same
        # buffers run eagerly (what the tests check on CPU: everything but the capture itself).
        self._static = cuda_graphs
        self._capture_graphs = cuda_graphs and self.device.type == "cuda"
        self.row_buckets = row_buckets(slots)
        self._graphs: dict[tuple[int, int], tuple[torch.cuda.CUDAGraph | None, dict[str, torch.Tensor]]] = {}
        # dynamic=True: the rows and kv length stay symbolic, so two compiles (rows == 1 is always
        # specialized) serve every graph. Graph breaks are tolerated (another transformers version may
        # have one): inside a CUDA graph the Python between the pieces runs once, at capture.
        native = any(getattr(m, "native", False) for m in self.model.modules())
        if compile_decode and self.device.type == "cpu" and native:
            # The project's CPU kernels leave torch.compile nothing to fuse, and each becomes a custom op call that
            # costs more inside a compiled graph: SmolLM2's 1-row step took 11.0 ms compiled against 4.5 eager
            # (docs/BENCHMARKS.md, issue 15). The step stays eager where they run.
            log.info("compile_decode: not compiling the 1-row step, it runs the project's CPU kernels (faster eager)")
            compile_decode = False
        self.compiled = compile_decode
        self._step_fn = torch.compile(self._step, dynamic=True) if compile_decode and cuda_graphs else self._step
        # On a CPU without the static path only the 1-row step is compiled, where it pays (one stream on torch's
        # kernels: ~15% less per step; 8 rows gained nothing measurable, docs/BENCHMARKS.md). dynamic=None: rows
        # stay 1, the KV length turns symbolic at its second value, so two compiles serve every length.
        self._one_row = torch.compile(self._logits, dynamic=None) if compile_decode and not cuda_graphs else None

    # -- helpers -----------------------------------------------------------------------------------
    def _kv_len(self, needed: int) -> int:
        """Attention reads a bucketed prefix of the cache: fewer shapes, and not the whole max_len."""
        return min(self.max_len, -(-needed // self.kv_block) * self.kv_block)

    def _forward(
        self, ids: torch.Tensor, rot_pos: torch.Tensor, write_pos: torch.Tensor, kv_len: int, rows: int | torch.Tensor
    ) -> torch.Tensor:
        """Hidden states (rows, tokens, hidden) for `ids` at rotary positions `rot_pos`."""
        self.cache.bind(rows, write_pos, kv_len)
        kv = torch.arange(kv_len, device=self.device)
        # (rows, 1, tokens, kv_len): a token sees cached positions up to its own.
        mask = kv.view(1, 1, 1, -1) <= rot_pos.unsqueeze(1).unsqueeze(-1)
        if self._lean is not None:
            return self._lean(ids, rot_pos, mask, self.cache)
        out = self.base(
            input_ids=ids, position_ids=rot_pos, attention_mask=mask, use_cache=True, **{self._cache_kw: self.cache}
        )
        return out.last_hidden_state

    def _check(self) -> None:
        if not self.attached:
            raise RuntimeError("backend is detached")

    # -- Backend -----------------------------------------------------------------------------------
    @torch.inference_mode()
    def prefill(self, prefills: Sequence[Prefill]) -> torch.Tensor:
        """All slots' chunks of a round in one forward per padded size: a GEMM of many rows instead
        of one weight pass per prompt."""
        self._check()
        check_prefills(prefills, self.slots, self.max_len)
        last: list[torch.Tensor | None] = [None] * len(prefills)
        for round_ in prefill_rounds(prefills, PREFILL_CHUNKS):
            for size in sorted({piece.size for piece in round_}):
                group = [piece for piece in round_ if piece.size == size]
                ids = torch.zeros(len(group), size, dtype=torch.long)
                rot = torch.zeros(len(group), size, dtype=torch.long)
                write = torch.full((len(group), size), self.cache.scratch, dtype=torch.long)
                for r, (i, offset, real, _) in enumerate(group):
                    p0 = prefills[i].start + offset
                    ids[r, :real] = torch.tensor(prefills[i].ids[offset : offset + real])
                    rot[r] = torch.arange(p0, p0 + size).clamp(max=self.max_len - 1)
                    write[r, :real] = rot[r, :real]  # padding writes go to the scratch column
                kv_len = self._kv_len(max(prefills[p.index].start + p.offset + p.real for p in group))
                slots = torch.tensor([prefills[p.index].slot for p in group])
                hidden = self._forward(ids.to(self.device), rot.to(self.device), write.to(self.device), kv_len, slots)
                for r, p in enumerate(group):
                    last[p.index] = hidden[r, p.real - 1]
        return self.head(torch.stack(last)).float()  # type: ignore[arg-type]

    @torch.inference_mode()
    def decode(self, ids: torch.Tensor, positions: torch.Tensor, active: torch.Tensor) -> torch.Tensor:
        """One token for each of the first `len(ids)` slots: ids, positions and active (rows,); inactive rows write
        the scratch column. Returns logits (rows, vocab) fp32; ValueError for more rows than slots; RuntimeError once
        detached."""
        self._check()
        n = ids.shape[0]
        if n > self.slots:
            raise ValueError(f"decode: {n} rows, but the backend has {self.slots} slots")
        positions = positions.long()
        rot = torch.where(active, positions, 0).view(n, 1)
        write = torch.where(active, positions, self.cache.scratch).view(n, 1)
        kv_len = self._kv_len(int(positions[active].max()) + 1 if bool(active.any()) else 1)
        if self._static:
            return self._decode_graph(ids.view(n, 1), rot, write, kv_len, n)
        args = (ids.view(n, 1).to(self.device), rot.to(self.device), write.to(self.device), kv_len, n)
        if n == 1 and self._one_row is not None:
            return self._compiled_or_eager(self._one_row, self._logits, *args).float()
        return self._logits(*args).float()

    def _logits(self, ids: torch.Tensor, rot: torch.Tensor, write: torch.Tensor, kv_len: int,
                rows: int | torch.Tensor) -> torch.Tensor:
        """The last position's logits (rows, vocab) in the model's dtype for `ids` (rows, tokens)."""
        return self.head(self._forward(ids, rot, write, kv_len, rows)[:, -1])

    @torch.inference_mode()
    def copy_kv(self, copies: Sequence[Copy]) -> None:
        """Run row copies in order (worker/engine/prefix_cache.py plans them). ValueError for a bad row or
        length; RuntimeError once detached."""
        self._check()
        for c in copies:
            self.cache.copy(c.src, c.dst, c.length)

    # -- CUDA graphs -------------------------------------------------------------------------------
    def _decode_graph(self, ids: torch.Tensor, rot: torch.Tensor, write: torch.Tensor, kv_len: int, n: int):
        """Decode runs the smallest row bucket that holds n rows (the rest idle, masked), one graph per
        (rows, kv bucket)."""
        rows = next(w for w in self.row_buckets if w >= n)
        if (rows, kv_len) not in self._graphs:
            self._capture(rows, kv_len)
        graph, io = self._graphs[rows, kv_len]
        # All three inputs in one host-to-device copy (idle rows: token 0 at position 0, written to scratch).
        host = torch.zeros(3, rows, 1, dtype=torch.long)
        host[2].fill_(self.cache.scratch)
        host[0, :n], host[1, :n], host[2, :n] = ids, rot, write
        io["inputs"].copy_(host)
        if graph is not None:
            graph.replay()
        else:
            io["logits"].copy_(self._run_step(io, kv_len))
        return io["logits"][:n].float()

    def _step(self, io: dict[str, torch.Tensor], kv_len: int) -> torch.Tensor:
        """The static decode step: logits for io's rows (the first rows slots), nothing read back to the
        host (tests/test_torch_backend.py runs it on the meta device to check)."""
        return self._logits(io["ids"], io["rot"], io["write"], kv_len, io["ids"].shape[0])

    def _run_step(self, io: dict[str, torch.Tensor], kv_len: int) -> torch.Tensor:
        """The static step, compiled if asked."""
        return self._compiled_or_eager(self._step_fn, self._step, io, kv_len)

    def _compiled_or_eager(self, compiled: Any, eager: Any, *args: Any) -> torch.Tensor:
        """`compiled(*args)` while compiling is on, else `eager(*args)`. A compile that fails costs speed, not the
        worker: it is logged once and every later step (static or 1-row) runs eagerly."""
        if not self.compiled or compiled is eager:
            return eager(*args)
        try:
            return compiled(*args)
        except Exception as e:
            log.warning("torch.compile of the decode step failed, decoding uncompiled: %s", e)
            self.compiled, self._step_fn, self._one_row = False, self._step, None
            return eager(*args)

    def _capture(self, rows: int, kv_len: int) -> None:
        t0 = time.perf_counter()
        inputs = torch.zeros(3, rows, 1, dtype=torch.long, device=self.device)
        inputs[2].fill_(self.cache.scratch)
        io = {"inputs": inputs, "ids": inputs[0], "rot": inputs[1], "write": inputs[2]}  # views: fixed addresses
        if not self._capture_graphs:
            io["logits"] = self._run_step(io, kv_len)
            self._graphs[rows, kv_len] = (None, io)
            return
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):  # warm-up outside the graph (compile, allocations, autotuning)
                self._run_step(io, kv_len)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        first = next(iter(self._graphs.values()), None)
        pool = first[0].pool() if first is not None and first[0] is not None else None
        with torch.cuda.graph(graph, pool=pool):
            io["logits"] = self._step_fn(io, kv_len)
        self._graphs[rows, kv_len] = (graph, io)
        log.debug("captured decode graph: %d rows x %d positions in %.2fs", rows, kv_len, time.perf_counter() - t0)

    def warm_up(self) -> None:
        """Run every shape once so no request pays for first-call costs (and graphs are captured)."""
        # On CUDA every chunk size once (kernel selection per shape); elsewhere one prompt faults the
        # weights in, and batched prompts make too many shapes to pre-run anyway.
        sizes = PREFILL_CHUNKS if self.device.type == "cuda" else (PREFILL_CHUNKS[-1],)
        for size in sizes:
            self.prefill([Prefill(0, [0] * min(size, self.max_len), 0)])
        if self._one_row is not None:  # both compiles (the first KV length, then a symbolic one) before serving
            t0 = time.perf_counter()
            for kv in sorted({self._kv_len(1), self._kv_len(self.kv_block + 1)}):
                self.decode(torch.zeros(1, dtype=torch.long), torch.full((1,), kv - 1), torch.ones(1, dtype=torch.bool))
            log.info("compiled the 1-row decode step in %.1fs (%s)", time.perf_counter() - t0,
                     "compiled" if self.compiled else "failed: eager")
        t0 = time.perf_counter()
        kvs = sorted({self._kv_len(k) for k in range(1, self.max_len + 1, self.kv_block)})
        widths = self.row_buckets if self._capture_graphs else [self.slots]
        for n in widths:
            for kv in kvs:
                pos = torch.full((n,), kv - 1, dtype=torch.long)
                self.decode(torch.zeros(n, dtype=torch.long), pos, torch.ones(n, dtype=torch.bool))
                if not self._capture_graphs:
                    return  # eager: one pass is enough to fault in the weights
        log.info(
            "captured %d decode graphs (rows %s x kv %s, %s) in %.1fs",
            len(self._graphs), widths, kvs, "compiled" if self.compiled else "eager modules", time.perf_counter() - t0,
        )

    def detach(self) -> None:
        """Free the KV cache and the decode graphs (and CUDA's cached memory). Idempotent."""
        if not self.attached:
            return
        self.attached = False
        self._graphs.clear()
        self.cache.k.clear()
        self.cache.v.clear()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
