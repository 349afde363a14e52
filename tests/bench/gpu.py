"""Section 3 (only with CUDA): the engine (TorchBackend on cuda, CUDA graphs without and with
torch.compile, the `cuda` device preset's slots) on a Pythia-12B-shaped GPT-NeoX with random fp16
weights (speed does not depend on weight values), prompt 128, 128 new tokens, at 1/8/32/64
concurrent streams, beside ../shared/bench/gpu_baseline.py run in the same invocation; weight bytes
read per decode step against the card's measured copy bandwidth.

Without a GPU nothing is measured. `smoke=True` runs the same code on CPU with gpu_baseline.py's SMALL
config (and the baseline with SMALL=1), to check the code path, never as a measurement.
"""

from __future__ import annotations

import gc
import time
from collections.abc import Callable, Sequence
from typing import Any

from tests.bench.common import TimedBackend, log, measure, rnd, run_baseline, run_streams

NOT_MEASURED = "GPU: not measured (no GPU in this run)"
PROMPT = 128
NEW = 128
CONCURRENCY = (1, 8, 32, 64)
SMOKE_CONCURRENCY = (1, 4)
# Ours, each measured over the same weights: the static decode step captured as CUDA graphs, without
# and with torch.compile first (compile_decode, the `cuda` preset's default).
VARIANTS = {"graphs": False, "compiled": True}
# As gpu_baseline.py: pythia-12b / oasst-sft-4-pythia-12b-epoch-3.5, and its SMALL=1 smoke config.
PYTHIA_12B = dict(
    hidden_size=5120,
    num_hidden_layers=36,
    num_attention_heads=40,
    intermediate_size=20480,
    vocab_size=50288,
    rotary_pct=0.25,
    rotary_emb_base=10000,
    max_position_embeddings=2048,
    use_parallel_residual=True,
    tie_word_embeddings=False,
)
SMALL = dict(
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=256,
    vocab_size=50288,
    rotary_pct=0.25,
    max_position_embeddings=2048,
    use_parallel_residual=True,
)
OASST_TOKENS = 50282  # real token ids of the OASST tokenizer; rows past it are padding, never sampled


class StubCodec:
    """No tokenizer for random weights: every id decodes to one character, and nothing ends a turn
    (exactly NEW tokens per stream, as the baseline's min_new_tokens)."""

    vocab_size = OASST_TOKENS
    end_ids: set[int] = set()

    @staticmethod
    def decode(ids: list[int]) -> str:
        return "x" * len(ids)


def copy_bandwidth_gbps() -> float:
    """gpu_baseline.py's measurement: 2 GiB device-to-device copies, read + write bytes per second."""
    import torch

    x = torch.empty(2 * 1024**3, dtype=torch.uint8, device="cuda")
    y = torch.empty_like(x)
    for _ in range(3):
        y.copy_(x)
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(10):
        y.copy_(x)
    torch.cuda.synchronize()
    dt = (time.perf_counter() - t) / 10
    del x, y
    torch.cuda.empty_cache()
    return round(2 * 2 * 1024**3 / dt / 1e9)


def build_model(small: bool, device: str, dtype: Any) -> Any:
    import torch
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    cfg = GPTNeoXConfig(**(SMALL if small else PYTHIA_12B))
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    prev = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # parameters are created in fp16 directly (no fp32 copy of 12B)
    try:
        with torch.device(device):
            model = GPTNeoXForCausalLM(cfg).to(dtype).eval()
    finally:
        torch.set_default_dtype(prev)
    model.requires_grad_(False)
    return model


def decode_check(device: str, dtype: Any, variants: Sequence[str]) -> dict[str, Any]:
    """On the device itself, SMALL config: each variant's decode (graphs captured on CUDA, compiled or
    not) against eager dynamic decode from the same cache state. The capture is the one thing CPU
    tests can't run; recorded, not asserted (a failure here must not cost the measurements)."""
    import torch

    try:
        model = build_model(True, device, dtype)
        gen = torch.Generator().manual_seed(1)
        prompts = {s: torch.randint(10, 50000, (n,), generator=gen).tolist() for s, n in ((0, 40), (2, 90), (3, 7))}
        out = {name: _check_variant(model, device, VARIANTS[name], prompts) for name in variants}
        log(f"gpu decode check: {out}")
        return out
    except Exception as e:
        log(f"gpu decode check failed: {e!r}")
        return {"error": repr(e)[:500]}


def _check_variant(model: Any, device: str, compile_decode: bool, prompts: dict[int, list[int]]) -> dict[str, Any]:
    """Greedy steps at widths that change every step (row buckets 1, 2, 4; slot 1 idle)."""
    import torch

    from tests.models import lockstep_decode
    from worker.pipeline.torch_backend import TorchBackend

    ref = TorchBackend(model, slots=4, max_len=256, device=device)
    be = TorchBackend(model, slots=4, max_len=256, device=device, cuda_graphs=True, compile_decode=compile_decode)
    be.warm_up()
    diff, scale, agree, total = 0.0, 0.0, 0, 0
    for active, (a, b) in lockstep_decode([ref, be], prompts, [4, 3, 2, 1] * 6):
        diff = max(diff, float((a[active] - b[active]).abs().max()))
        scale = max(scale, float(a[active].abs().max()))
        agree += int(torch.equal(a[active].argmax(-1), b[active].argmax(-1)))
        total += 1
    res = {
        "max_abs_logit_diff": float(f"{diff:.3g}"),
        "max_abs_logit": float(f"{scale:.3g}"),  # the scale the difference is read against
        "steps_same_argmax": f"{agree}/{total}",
        "compiled": be.compiled,
        "graphs": len(be._graphs),
    }
    be.detach()
    ref.detach()
    return res


def parse_baseline(res: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {k: v for k, v in res.items() if k != "lines"}
    out["raw"] = res.get("lines", [])
    out["rows"] = []
    for line in res.get("lines", []):
        if "label" in line:
            out["rows"].append(line)
        else:
            for k in ("card", "copy_GBps_rw", "weight_GB", "params", "compile_and_run_s", "compiled_error"):
                if k in line:
                    out[k] = line[k]
    return out


def run(
    *,
    smoke: bool,
    baseline: bool,
    compile_baseline: bool,
    max_len: int,
    variants: Sequence[str] = tuple(VARIANTS),
    partial: Callable[[dict[str, Any]], Any] | None = None,
) -> dict[str, Any]:
    """The section's results; `partial` gets them so far after the baseline and after each variant."""
    import torch

    from config.presets import load_presets

    cuda = torch.cuda.is_available()
    if not cuda and not smoke:
        return {"measured": False, "note": NOT_MEASURED}
    small = not cuda  # on CPU only the smoke config makes sense
    device = "cuda" if cuda else "cpu"
    dtype = torch.float16 if cuda else torch.float32
    preset = load_presets().device("cuda")
    slots = preset.slots if cuda else 8
    conc = [c for c in (CONCURRENCY if cuda else SMOKE_CONCURRENCY) if c <= slots]
    new = NEW if cuda else 16
    out: dict[str, Any] = {
        "measured": cuda,
        "note": None if cuda else NOT_MEASURED,
        "smoke": None if cuda else "code path checked on CPU with gpu_baseline.py's SMALL config; not a measurement",
        "config": "pythia-12b shape" if not small else "SMALL (hidden 64, 2 layers)",
        "device": device,
        "card": torch.cuda.get_device_name() if cuda else None,
        "dtype": str(dtype).removeprefix("torch."),
        "prompt_tokens": PROMPT,
        "new_tokens": new,
        "slots": slots,
        "max_len": max_len,
        "cuda_graphs": bool(preset.cuda_graphs and cuda),
        "preset_compile_decode": preset.compile_decode,
        "concurrency": conc,
    }
    out["decode_check"] = decode_check(device, dtype, variants)  # first: quick, and what CPU tests can't show
    if partial:
        partial(out)
    if baseline:
        env = {"SMALL": "1"} if small else {}
        env["COMPILE"] = "1" if (compile_baseline and cuda) else "0"
        out["baseline"] = parse_baseline(run_baseline("gpu_baseline.py", timeout=3600, env=env))
        if not out["baseline"].get("ran"):
            log(f"gpu baseline failed: {out['baseline'].get('error')}")
    else:
        out["baseline"] = {"ran": False, "skipped": "--no-baseline"}
    if cuda:
        out["copy_GBps_rw"] = copy_bandwidth_gbps()
        log(f"gpu: {out['card']}, copy bandwidth {out['copy_GBps_rw']} GB/s (read+write)")

    if partial:
        partial(out)
    t0 = time.perf_counter()
    model = build_model(small, device, dtype)
    out["init_s"] = round(time.perf_counter() - t0, 1)
    nbytes = sum(p.numel() * p.element_size() for p in model.parameters())
    emb = model.gpt_neox.embed_in.weight
    read_bytes = nbytes - emb.numel() * emb.element_size()  # as the baseline: embedding rows are gathered
    out.update(
        params=sum(p.numel() for p in model.parameters()),
        weight_GB=round(nbytes / 1e9, 2),
        weight_GB_read_per_step=round(read_bytes / 1e9, 2),
    )
    gen = torch.Generator().manual_seed(0)
    prompts = torch.randint(10, 50000, (max(conc), PROMPT), generator=gen).tolist()
    base_rows = {
        r["batch"]: r for r in out["baseline"].get("rows", []) if r["label"] == "hf_generate_eager_dynamic_cache"
    }
    compiled = [r for r in out["baseline"].get("rows", []) if r["label"] == "hf_generate_static_cache_autocompile"]
    out["variants"], out["rows"] = [], []
    for name in variants:
        opts = dict(slots=slots, max_len=max_len, device=device, prompts=prompts, conc=conc, new=new)
        info, rows = measure_variant(model, name, VARIANTS[name], **opts)
        out["variants"].append(info)
        for row in rows:
            step = row["step_ms_all_active"]
            if step:
                row["GBps_weights"] = round(read_bytes / (step / 1e3) / 1e9)
                if out.get("copy_GBps_rw"):
                    row["fraction_of_copy_bw"] = rnd(row["GBps_weights"] / out["copy_GBps_rw"], 3)
            b = base_rows.get(row["concurrency"])
            if b:
                row["baseline"] = b
                if step:
                    row["ratio_decode_tok_s_total"] = rnd(row["decode_tok_s_total"] / b["tok_s_total"], 2)
            if row["concurrency"] == 1 and compiled:
                row["baseline_compiled_static"] = compiled[0]
                if step:
                    row["ratio_vs_compiled_static"] = rnd(row["decode_tok_s_total"] / compiled[0]["tok_s_total"], 2)
            out["rows"].append(row)
        if partial:
            partial(out)
    del model
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    return out


def measure_variant(
    model: Any, name: str, compile_decode: bool, *, slots: int, max_len: int, device: str, prompts, conc, new
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """One engine over `model` (the static decode path, compiled or not), measured at each concurrency,
    then detached so the next variant has the memory."""
    import torch

    from shared.sampling import SamplingParams
    from worker.engine.engine import Engine
    from worker.engine.own_thread import start_on_own_thread
    from worker.pipeline.torch_backend import TorchBackend

    t0 = time.perf_counter()

    def setup() -> Any:
        """As the worker does it: everything on the engine's own thread (own_thread.py)."""
        inner = TorchBackend(
            model, slots=slots, max_len=max_len, device=device, cuda_graphs=True, compile_decode=compile_decode
        )
        inner.warm_up()  # compiles, and captures the decode graphs on CUDA
        backend = TimedBackend(inner)
        return Engine(backend, StubCodec(), device=device), (inner, backend)

    engine, (inner, backend) = start_on_own_thread(setup)
    params = SamplingParams(temperature=0.0)
    run_streams(engine, prompts, 4, params)  # warm-up: every batch width, first-call costs
    run_streams(engine, prompts[:1], 4, params)
    info: dict[str, Any] = {
        "variant": name,
        "compile_decode": compile_decode,
        "compiled": inner.compiled,  # False after a failed compile fell back
        "graphs": len(inner._graphs),
        "warm_up_s": round(time.perf_counter() - t0, 1),
    }
    if device == "cuda":
        info["memory_GB_peak"] = round(torch.cuda.max_memory_allocated() / 1e9, 1)
    log(f"gpu [{name}]: ready in {info['warm_up_s']}s (compiled: {inner.compiled}); measuring {conc}")
    rows = []
    for c in conc:
        res = measure(engine, backend, prompts[:c], new, params)
        step = res["step_ms_all_active"]
        row: dict[str, Any] = {"variant": name, "concurrency": c, **res}
        if step:
            row["decode_tok_s_per_stream"] = rnd(1e3 / step, 1)
            row["decode_tok_s_total"] = rnd(c * 1e3 / step, 1)
        rows.append(row)
        log(f"gpu [{name}]: {c} streams: step {step} ms, {row.get('decode_tok_s_total')} tok/s decode total")
    engine.stop()
    inner.detach()
    del engine, backend, inner
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
    return info, rows
