"""The IPU backend: transformers' model modules compiled by poptorch for Graphcore IPUs.

NOT VERIFIED ON IPU HARDWARE. It follows poptorch's documented API and is tested against a strict
double of poptorch (tests/fake_poptorch.py) that runs the same module on the CPU; see docs/IPU.md.

Design (each choice is forced by how poptorch executables work):

- ONE executable. A poptorch executable owns its copy of the weights and buffers on the device and
  holds its IPUs while attached; two executables share no device memory, and two over the same IPUs
  cannot be attached at once. A KV cache written by a "prefill executable" would be invisible to a
  "decode executable", so prefill and decode run through one compiled step of `rows x step_tokens`
  tokens: prefill feeds a prompt `step_tokens` at a time into its slot's row, decode feeds one token
  per row (the other columns are padding). The extra columns cost decode compute; the alternative,
  one token per step (Graphcore's own decoder-only KV-cache generation), makes a prompt of n tokens
  cost n steps. `step_tokens` picks the trade-off.
- KV cache ON DEVICE, as module buffers updated in place (poptorch keeps buffers on the device
  between runs and never copies an inference model's buffers back to the host). A step then moves
  only token ids in and one row of logits per sequence out. The original pipeline had no cache: each
  token recomputed the whole padded sequence (~1.25 s per token on POD4).
- Sampling on the HOST. Each sequence brings its own temperature / top-k / top-p / repetition penalty
  and seeded generator (the engine samples rows of one batch differently); on device those would be
  more inputs and a rebuild per feature, while one fp16 row of logits (~100 KB) per step is cheap.
- Static shapes. Sequence length, micro-batch, step tokens and the IPU layout are compiled in: any
  change means a recompile (minutes for a large model). The executable cache (preset
  `executable_cache`) makes a restart with the same shapes load instead of compile.
- Decoder layers split evenly over the IPUs with poptorch.BeginBlock (embedding on the first IPU,
  final norm and head on the last). Pipelined inference needs at least one micro-batch per stage in
  each call, so a call carries `micro_batch x stages` rows (per replica) and the engine gets that many
  slots. Each row carries the index of its cache row, so whatever order poptorch hands micro-batches
  and replicas, a sequence always meets its own cache; with replication every replica keeps its own
  buffers (rows it never serves stay unused there).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import torch
from torch import nn

from config.presets import DevicePreset
from worker.pipeline.backend import (
    PREFILL_CHUNKS,
    Copy,
    Prefill,
    cache_keyword,
    check_prefills,
    kv_dims,
    prefill_rounds,
)
from worker.pipeline.ipu.sizing import IPUPlan, check_hardware, import_poptorch, plan_ipus, stage_starts
from worker.pipeline.loader import DTYPES

log = logging.getLogger(__name__)

IPU_SRAM_BYTES = 900 * 10**6  # In-Processor-Memory of one Mk2 / Bow IPU
WEIGHTS_ON_CHIP_SHARE = 0.5  # beyond this share of an IPU's memory for weights, they go to streaming memory
MASKED = -1e4  # additive mask: exp() underflows to 0 yet stays finite in fp16 (no floating-point exceptions)
INDEX = torch.int32  # IPUs have no 64-bit integers: every index input is int32


# -- compiling ------------------------------------------------------------------------------------------
def decoder_layers(model: Any) -> nn.ModuleList:
    """The model's decoder layers (a transformers CausalLM); ValueError when none is found."""
    base = model.base_model
    for name in ("layers", "h", "layer", "blocks"):
        layers = getattr(base, name, None)
        if isinstance(layers, nn.ModuleList):
            return layers
    raise ValueError(f"{type(model).__name__}: cannot find its list of decoder layers")


def annotate(poptorch: ModuleType, model: Any, stages: int) -> list[int]:
    """Put each stage's first layer in a BeginBlock for its IPU; returns the IPU of every layer."""
    poptorch.removeBlocks(model)  # a model wrapped before (an earlier backend) keeps its old hooks otherwise
    layers = decoder_layers(model)
    starts = stage_starts(len(layers), stages)
    for ipu, first in enumerate(starts):
        poptorch.BeginBlock(layers[first], ipu_id=ipu)
    return [sum(first <= i for first in starts) - 1 for i in range(len(layers))]


def weights_fit_on_chip(model: nn.Module, stages: int) -> bool:
    """Whether each stage's share of the weights (bytes) stays under WEIGHTS_ON_CHIP_SHARE of an IPU."""
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    return weight_bytes / stages <= IPU_SRAM_BYTES * WEIGHTS_ON_CHIP_SHARE


def build_options(
    poptorch: ModuleType, device: DevicePreset, plan: IPUPlan, dtype: torch.dtype, weights_on_chip: bool
) -> Any:
    """poptorch.Options for `plan`: iterations, replicas, per-replica buffers (the KV cache), every
    micro-batch's output, pipelined or sharded stages, executable caching, fp16 partials, and weights in
    streaming memory when they do not fit on chip."""
    opts = poptorch.Options()
    opts.deviceIterations(plan.iterations)
    opts.replicationFactor(plan.replicas)
    opts.broadcastBuffers(False)  # poptorch only supports per-replica buffers: each replica its own KV cache
    opts.outputMode(poptorch.OutputMode.All)  # logits of every micro-batch, not just the last
    strategy = poptorch.PipelinedExecution if plan.pipelined else poptorch.ShardedExecution
    opts.setExecutionStrategy(strategy(poptorch.AutoStage.SameAsIpu))
    if plan.ipus_used & (plan.ipus_used - 1):
        opts.autoRoundNumIPUs(True)  # e.g. 3 stages: reserve 4 IPUs, one idle
    opts.setAvailableMemoryProportion({f"IPU{i}": device.available_memory_proportion for i in range(plan.stages)})
    os.makedirs(device.executable_cache, exist_ok=True)
    opts.enableExecutableCaching(device.executable_cache)
    if dtype == torch.float16:
        opts.Precision.setPartialsType(torch.half)  # half matmul partials: less temporary memory per tile
    if not weights_on_chip:
        # Weights larger than the IPUs' memory live in streaming memory and are loaded as used.
        opts.TensorLocations.setWeightLocation(poptorch.TensorLocationSettings().useOnChipStorage(False))
    return opts


# -- the compiled module --------------------------------------------------------------------------------
class DeviceKVCache(nn.Module):
    """The KV cache as buffers of the compiled module: `rows x kv_heads x (max_len + 1) x head_dim` per
    layer, column `max_len` a scratch column that padding and idle rows write to and nothing reads.

    transformers' attention calls `update(key, value, layer_idx)`. Writes are one-hot matmuls, not
    scatters or index_put: static shapes and ops poptorch supports on any position (Graphcore's own
    KV caches for poptorch do the same, as dynamic updates and scatters place badly on tiles).
    """

    def __init__(self, num_layers: int, rows: int, kv_heads: int, head_dim: int, max_len: int, dtype: torch.dtype):
        super().__init__()
        self.num_layers = num_layers
        self.max_len = max_len
        self.scratch = max_len
        self.dtype = dtype
        shape = (rows, kv_heads, max_len + 1, head_dim)
        for i in range(num_layers):
            self.register_buffer(f"k{i}", torch.zeros(shape, dtype=dtype), persistent=False)
            self.register_buffer(f"v{i}", torch.zeros(shape, dtype=dtype), persistent=False)
        self._rows = torch.zeros(0, dtype=INDEX)
        self._hit = torch.zeros(0)
        self._keep_cols = torch.zeros(0)
        self._row_hot: torch.Tensor | None = None
        self._keep_rows = torch.zeros(0)

    def bind(self, rows: torch.Tensor, write: torch.Tensor) -> None:
        """Before each forward: the cache rows this micro-batch owns (m,), and the column each of its
        tokens writes (m, T). Building the one-hots once here serves every layer."""
        cols = torch.arange(self.max_len + 1, dtype=write.dtype)
        self._hit = (write.unsqueeze(-1) == cols).to(self.dtype)  # (m, T, L+1)
        written = (self._hit.sum(1) > 0).to(self.dtype)  # (m, L+1); 0/1 even where padding piles up
        self._keep_cols = (1 - written)[:, None, :, None]
        total = self.k0.shape[0]
        self._rows = rows
        if rows.shape[0] == total:  # the micro-batch is every row, in order: no row selection
            self._row_hot = None
            return
        self._row_hot = (rows.unsqueeze(-1) == torch.arange(total, dtype=rows.dtype)).to(self.dtype)  # (m, rows)
        self._keep_rows = (1 - self._row_hot.sum(0)).view(-1, 1, 1, 1)

    def update(self, key: torch.Tensor, value: torch.Tensor, layer_idx: int, *args: Any, **kwargs: Any):
        """Write a layer's new keys and values, (m, kv_heads, T, head_dim), at the bound rows and columns.
        Returns that layer's keys and values for the micro-batch, (m, kv_heads, max_len, head_dim)."""
        # key/value: (m, kv_heads, T, head_dim), already rotated.
        return self._write(getattr(self, f"k{layer_idx}"), key), self._write(getattr(self, f"v{layer_idx}"), value)

    def _write(self, buf: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
        mine = buf if self._row_hot is None else buf.index_select(0, self._rows)
        placed = self._hit.transpose(1, 2).unsqueeze(1) @ new.to(buf.dtype)  # (m, 1, L+1, T) @ (m, h, T, d)
        mine = mine * self._keep_cols + placed
        if self._row_hot is None:
            buf.copy_(mine)
        else:  # rows of other micro-batches keep their values
            back = (self._row_hot.t() @ mine.flatten(1)).view(buf.shape)
            buf.copy_(buf * self._keep_rows + back)
        return mine[:, :, : self.max_len]  # attention never sees the scratch column

    # transformers asks these of any cache object in a few code paths.
    def get_seq_length(self, layer_idx: int = 0) -> int:
        """Always max_len: attention reads every position; the mask hides those after each token's own."""
        return self.max_len

    def __len__(self) -> int:
        return self.num_layers


class StepModule(nn.Module):
    """What poptorch compiles. Inputs, all int32: ids, rot (rotary position of each token) and write
    (the cache column its key/value goes to: its position, or the scratch column) of shape
    (rows, T); cache_rows (rows,) the cache row each input row owns; last (rows,) the token whose
    logits come back. Output: logits (rows, vocab) in the model's dtype."""

    def __init__(self, model: Any, cache: DeviceKVCache, cache_kw: str):
        super().__init__()
        self.lm = model
        self.cache = cache
        self._cache_kw = cache_kw

    def forward(
        self, ids: torch.Tensor, rot: torch.Tensor, write: torch.Tensor, cache_rows: torch.Tensor, last: torch.Tensor
    ) -> torch.Tensor:
        """Write every token's key/value to the cache; return the logits (rows, vocab) of each row's `last` token."""
        self.cache.bind(cache_rows, write)
        cols = torch.arange(self.cache.max_len, dtype=rot.dtype)
        hidden_from = cols.view(1, 1, 1, -1) > rot.unsqueeze(1).unsqueeze(-1)  # (rows, 1, T, L): the future
        mask = hidden_from.to(self.cache.dtype) * MASKED
        out = self.lm.base_model(
            input_ids=ids, position_ids=rot, attention_mask=mask, use_cache=True, **{self._cache_kw: self.cache}
        )
        hidden = out.last_hidden_state  # (rows, T, H)
        pick = (torch.arange(ids.shape[1], dtype=last.dtype) == last.unsqueeze(-1)).to(hidden.dtype)
        return self.lm.get_output_embeddings()(pick.unsqueeze(1) @ hidden)[:, 0]


@dataclass
class StepInputs:
    """One step's host inputs for StepModule, int32: ids, rot, write (slots, step_tokens); last (slots,)."""

    ids: torch.Tensor
    rot: torch.Tensor
    write: torch.Tensor
    last: torch.Tensor


# -- the backend ----------------------------------------------------------------------------------------
class IPUBackend:
    """The Backend protocol over one poptorch executable (see the module docstring for why one).

    `slots` is the preset's micro-batch; the engine gets `self.slots = micro-batch x stages x
    replicas` rows (`engine_slots()` tells that number before any model is loaded, for Celery's
    concurrency). Sequence length (`max_len`), micro-batch, `step_tokens` and the IPU layout are
    compiled in: changing any of them means a recompile at the next start.
    """

    def __init__(
        self,
        model: Any,
        device: DevicePreset,
        *,
        slots: int,
        max_len: int,
        step_tokens: int = PREFILL_CHUNKS[0],
        pipelined: bool = True,
    ):
        poptorch = import_poptorch(device)
        self.device = device
        self.max_len = max_len
        self.step_tokens = step_tokens
        self.plan = plan_ipus(device.ipus, len(decoder_layers(model)), slots, pipelined)
        check_hardware(poptorch, device, self.plan)
        self.slots = self.plan.rows
        self.dtype = DTYPES[device.dtype]
        model = self._prepare(model)
        self.layer_ipus = annotate(poptorch, model, self.plan.stages)
        self.cache = DeviceKVCache(
            model.config.num_hidden_layers, self.slots, *kv_dims(model.config), max_len, self.dtype
        )
        opts = build_options(poptorch, device, self.plan, self.dtype, weights_fit_on_chip(model, self.plan.stages))
        self.options = opts
        self._cache_rows = torch.arange(self.slots, dtype=INDEX)
        # Prefix reuse would need a KV row copy on the device: another compiled program (and its IPU
        # memory) beside the step. Not built yet: every prompt is prefilled whole here.
        self.prefix_reuse = False
        self.spare_slots = 0
        log.info("prefix reuse is off on the IPU backend: every prompt is prefilled whole")
        self._exe = poptorch.inferenceModel(StepModule(model, self.cache, self._cache_kw), opts)
        self._compile()

    def _prepare(self, model: Any) -> Any:
        model = model.to(self.dtype).eval()
        model.requires_grad_(False)
        # poptorch has no kernel for torch's fused scaled_dot_product_attention: plain matmul + softmax.
        if hasattr(model, "set_attn_implementation"):
            model.set_attn_implementation("eager")
        else:  # older transformers (the Poplar SDK's torch pins one)
            model.config._attn_implementation = "eager"
        self._cache_kw = cache_keyword(model.base_model.forward)
        return model

    def _compile(self) -> None:
        p = self.plan
        log.info(
            "compiling the IPU step: %d rows x %d tokens, sequence length %d, %d stage(s) x %d replica(s), "
            "micro-batch %d; minutes on a first run, then loaded from %s",
            self.slots,
            self.step_tokens,
            self.max_len,
            p.stages,
            p.replicas,
            p.micro_batch,
            self.device.executable_cache,
        )
        t0 = time.perf_counter()
        inp = self._idle()
        self._exe.compile(inp.ids, inp.rot, inp.write, self._cache_rows, inp.last)
        log.info("compiled the IPU step in %.1fs", time.perf_counter() - t0)

    # -- helpers -----------------------------------------------------------------------------------
    def _idle(self) -> StepInputs:
        """Inputs where every row is idle: token 0 at position 0, written to the scratch column."""
        shape = (self.slots, self.step_tokens)
        return StepInputs(
            torch.zeros(shape, dtype=INDEX),
            torch.zeros(shape, dtype=INDEX),
            torch.full(shape, self.cache.scratch, dtype=INDEX),
            torch.zeros(self.slots, dtype=INDEX),
        )

    def _run(self, inp: StepInputs) -> torch.Tensor:
        return self._exe(inp.ids, inp.rot, inp.write, self._cache_rows, inp.last).float()

    def _check(self) -> None:
        if not self.attached:
            raise RuntimeError("backend is detached")

    # -- Backend -----------------------------------------------------------------------------------
    @property
    def attached(self) -> bool:
        """Whether the executable holds its IPUs."""
        return self._exe.isAttachedToDevice()

    def prefill(self, prefills: Sequence[Prefill]) -> torch.Tensor:
        """Each step carries one `step_tokens` chunk for every slot being prefilled (rows are slots)."""
        self._check()
        check_prefills(prefills, self.slots, self.max_len)
        logits: list[torch.Tensor | None] = [None] * len(prefills)
        for round_ in prefill_rounds(prefills, (self.step_tokens,)):
            inp = self._idle()
            for i, offset, real, size in round_:
                slot, p0 = prefills[i].slot, prefills[i].start + offset
                pos = torch.arange(p0, p0 + size, dtype=INDEX)
                inp.ids[slot, :real] = torch.tensor(prefills[i].ids[offset : offset + real], dtype=INDEX)
                inp.rot[slot] = pos.clamp(max=self.max_len - 1)
                inp.write[slot, :real] = pos[:real]  # padding keeps writing to the scratch column
                inp.last[slot] = real - 1
            out = self._run(inp)
            for piece in round_:
                logits[piece.index] = out[prefills[piece.index].slot]
        return torch.stack(logits)  # type: ignore[arg-type]

    def decode(self, ids: torch.Tensor, positions: torch.Tensor, active: torch.Tensor) -> torch.Tensor:
        """One token for each of the first `len(ids)` slots at `positions`; inactive rows write the scratch column.
        Returns logits (rows, vocab) fp32. ValueError for more rows than slots or a position >= max_len;
        RuntimeError once detached."""
        self._check()
        n = ids.shape[0]
        if n > self.slots:
            raise ValueError(f"decode of {n} rows on {self.slots} slots")
        if bool((positions[active] >= self.max_len).any()):
            raise ValueError(f"decode position past the sequence length {self.max_len}")
        inp = self._idle()
        inp.ids[:n, 0] = torch.where(active, ids, 0).to(INDEX)
        inp.rot[:n, 0] = torch.where(active, positions, 0).to(INDEX)
        inp.write[:n, 0] = torch.where(active, positions, self.cache.scratch).to(INDEX)
        return self._run(inp)[:n]

    def warm_up(self) -> None:
        """One idle step: proves the executable runs before the first request (it writes only scratch)."""
        self._check()
        self._run(self._idle())

    def detach(self) -> None:
        """Free the IPUs. Idempotent. The executable stays compiled: attach() takes the IPUs again."""
        if self._exe.isAttachedToDevice():
            self._exe.detachFromDevice()
            log.info("detached from the IPUs")

    def copy_kv(self, copies: Sequence[Copy]) -> None:
        """Not available here (prefix_reuse is False): NotImplementedError."""
        raise NotImplementedError("the IPU backend keeps no KV across sequences")

    def attach(self) -> None:
        """Take the IPUs again after detach(). poptorch uploads the host's weights and buffers on attach, so
        the KV cache starts empty: no sequence survives a detach."""
        if not self._exe.isCompiled():
            raise RuntimeError("the IPU executable was destroyed: build a new backend")
        if not self._exe.isAttachedToDevice():
            self._exe.attachToDevice()
            log.info("attached to %d IPU(s)", self.plan.ipus_used)

    def close(self) -> None:
        """Detach and drop the executable (its host memory too); the backend is unusable after."""
        self.detach()
        self._exe.destroy()
