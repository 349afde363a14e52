"""Our CPU matmuls for quantized weights (cpu_gemm.c), built with the machine's C compiler at first use.

torch's packed CPU kernels (int4pack / int8pack) work row by row: 8 decode rows cost ~2.5x one row. These unpack each
weight block once for all rows, with activations quantized per row in blocks of 32 in two int8 levels (llama.cpp's
Q8_1 scheme, plus a second level for what the first leaves over: one level flipped near-tie greedy tokens), and fold
a decode layer's RMSNorm, SwiGLU and residual add into the call. A row's result never depends on its batch mates.
One SmolLM2 step's weight matmuls (`python -m tests.bench.matmul_rows`, docs/BENCHMARKS.md): 8.2 ms at 1 row against
int4pack's 11.0 on an AVX2-only EPYC (the two levels then scaled apart); 3.2 against 3.1 on an AVX-512 EPYC (VNNI
build), where int4pack is faster at 8 rows (8.3 against 10.0 ms); the step gains most from what is folded in (and
from cpu_decode_layer.py, which runs a decode step's layer, attention included, as one call).

The shared library is compiled once per source and flags into CHAT_KERNEL_DIR (default
~/.cache/chat-worker-pool/kernels) with `cc` (or $CC), for any x86-64 CPU with AVX2 and FMA, and a second build with
AVX512-VNNI where the CPU has it (best_isa; not -march=native: a cache shared between hosts stays valid). Where there
is no compiler, no AVX2, or the build fails, `available()` is False (logged once) and quantize.py keeps torch's
kernels.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shlex
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

log = logging.getLogger(__name__)

HERE = Path(__file__).parent
SOURCES = (HERE / "cpu_gemm.c", HERE / "cpu_attention.c", HERE / "cpu_decode_layer.c")  # one library
HEADERS = (HERE / "cpu_bf16.h",)
# -ffp-contract=off: no fused multiply-adds the compiler picks per row count; the other two change no result (they
# let rounding calls vectorize)
FLAGS = ("-O3", "-mavx2", "-mfma", "-ffp-contract=off", "-fno-math-errno", "-fno-trapping-math", "-fopenmp",
         "-shared", "-fPIC")
# the builds, by the instruction set they add to FLAGS; 256-bit vectors in both, so the compiler vectorizes the
# prologue's loops (and orders their sums) alike and the two give the same bits
ISAS = {"avx2": (), "avx512-vnni": ("-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512vnni",
                                    "-mprefer-vector-width=256")}
GROUP = 32  # cpu_gemm.c's GROUP: weights per scale, activations per int8 scale
TILE = 8  # cpu_gemm.c's TILE: output columns per tile
KEEP_BUILDS = 8  # builds kept in CHAT_KERNEL_DIR (prune): two per source version, one per ISA


def kernel_dir() -> Path:
    """Where built libraries are kept: $CHAT_KERNEL_DIR, else ~/.cache/chat-worker-pool/kernels."""
    return Path(os.environ.get("CHAT_KERNEL_DIR") or Path.home() / ".cache" / "chat-worker-pool" / "kernels")


def _cpu_ok() -> bool:
    return platform.machine().lower() in ("x86_64", "amd64") and torch.backends.cpu.get_cpu_capability() in (
        "AVX2", "AVX512")


@functools.cache
def best_isa() -> str:
    """The build to run: $CHAT_CPU_GEMM_ISA if set (a key of ISAS, ignored with a warning where this CPU lacks it:
    it would die of an illegal instruction), else the fastest this CPU runs: "avx512-vnni" (AVX-512 with VNNI: Intel
    since Cascade Lake, AMD since Zen 4; one instruction per 4-wide integer dot product instead of three), else
    "avx2". Both builds give the same bits."""
    cpu = torch.cpu
    detected = "avx512-vnni" if cpu._is_avx512_supported() and cpu._is_vnni_supported() else "avx2"
    wanted = os.environ.get("CHAT_CPU_GEMM_ISA")
    if not wanted:
        return detected
    runs = ["avx2", "avx512-vnni"] if detected == "avx512-vnni" else ["avx2"]
    if wanted not in runs:
        log.warning("cpu_gemm: CHAT_CPU_GEMM_ISA=%r is not a build this CPU runs (%s): %s instead", wanted,
                    ", ".join(runs), detected)
        return detected
    return wanted


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _compiler() -> list[str]:
    """$CC split into words ("ccache gcc"), else cc or gcc on the PATH; [""] where there is none."""
    return shlex.split(os.environ.get("CC") or "") or [shutil.which("cc") or shutil.which("gcc") or ""]


def build(out_dir: Path, isa: str = "avx2") -> Path:
    """Compile SOURCES for `isa` (a key of ISAS) into one library in out_dir (once: the file is named by a hash of
    the sources, compiler and flags; written to a temporary name, then renamed, so concurrent workers never load a
    half-written file) and return its path.
    A file already there is used only if it matches the checksum written beside it when it was built (a damaged
    library could crash the process at load); otherwise it is built again. $CC may carry arguments ("ccache gcc").
    RuntimeError naming the compiler (and $CC where it came from there), its exit status and its message when
    compiling fails, or the directory (and CHAT_KERNEL_DIR) when it cannot be written."""
    from_env = bool(os.environ.get("CC"))
    cc = _compiler()
    if not cc[0]:
        raise RuntimeError("no C compiler (cc, gcc or $CC) to build the CPU kernels")
    flags = (*FLAGS, *ISAS[isa])
    source = b"".join(f.read_bytes() for f in (*SOURCES, *HEADERS))
    key = hashlib.sha256(source + " ".join((*cc, *flags)).encode()).hexdigest()[:16]
    path, checksum = out_dir / f"cpu_gemm-{key}.so", out_dir / f"cpu_gemm-{key}.sha256"
    if path.exists() and checksum.exists() and checksum.read_text().strip() == _digest(path):
        os.utime(checksum)  # used now: the last to be pruned
        return path
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=out_dir, suffix=".so.tmp")
    except OSError as e:
        raise RuntimeError(f"the kernel directory {out_dir} (CHAT_KERNEL_DIR) is not a writable directory: "
                           f"{e.strerror or e}") from None
    os.close(fd)
    try:
        done = subprocess.run([*cc, *flags, *map(str, SOURCES), "-o", tmp], capture_output=True, text=True,
                              timeout=300)
        if done.returncode != 0:
            message = done.stderr.strip()[-2000:] or "no output"
            raise RuntimeError(f"{' '.join(cc)}{' (from $CC)' if from_env else ''} failed to build the CPU kernels "
                               f"(exit status {done.returncode}): {message}")
        digest = _digest(Path(tmp))
        os.replace(tmp, path)
        with tempfile.NamedTemporaryFile("w", dir=out_dir, suffix=".tmp", delete=False) as f:
            f.write(digest)
        os.replace(f.name, checksum)  # after the library: a reader that finds this checksum finds that file
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    prune(out_dir)
    return path


def prune(out_dir: Path, keep: int = KEEP_BUILDS) -> list[str]:
    """Remove all but the `keep` builds in out_dir used (built or loaded) last, by their checksum file's time: each
    source change adds ~50 KB per build. A process that has one loaded keeps its mapping; a worker of an older
    version that starts later builds it again (~1 s). Returns the names removed."""
    builds = sorted(out_dir.glob("cpu_gemm-*.sha256"), key=lambda f: f.stat().st_mtime, reverse=True)
    removed = []
    for old in builds[keep:]:
        for f in (old.with_suffix(".so"), old):
            try:
                f.unlink()
                removed.append(f.name)
            except FileNotFoundError:
                pass  # another worker pruned it first
    return removed


@functools.cache
def library(isa: str = "avx2") -> ctypes.CDLL | None:
    """The loaded kernels built for `isa` (a key of ISAS; `loaded` gives best_isa()'s), built on first use; None where
    they cannot run here (the reason is logged once, as a warning: these workers then run torch's slower kernels)."""
    if not _cpu_ok():
        log.warning("cpu_gemm: needs an x86-64 CPU with AVX2 (torch sees %s): torch's int4/int8 kernels instead",
                    torch.backends.cpu.get_cpu_capability())
        return None
    try:
        path = build(kernel_dir(), isa)
        lib = ctypes.CDLL(str(path))
        ptr, i32 = ctypes.c_void_p, ctypes.c_int
        for fn in (lib.chat_q4_gemm, lib.chat_q8_gemm):
            fn.argtypes = [ptr, i32, i32, ptr, ptr, i32, ptr, i32, ptr, ctypes.c_float, i32, ptr, i32]
            fn.restype = i32
        lib.chat_decode_attention.argtypes = [ptr, i32, i32, i32, i32, ptr, ptr, ptr, ptr, ptr, ptr, i32, i32,
                                              ctypes.c_float, ptr, i32]
        lib.chat_decode_attention.restype = i32
        f32 = ctypes.c_float
        lib.chat_decode_layer.argtypes = [ptr, i32, i32, i32, i32, *[i32, ptr, ptr] * 4, ptr, ptr, f32, i32, i32, i32,
                                          ptr, ptr, ptr, ptr, ptr, ptr, i32, i32, f32, ptr, ptr, ptr]
        lib.chat_decode_layer.restype = i32
    except Exception as e:  # whatever stops the build or the load, the worker runs on torch's kernels
        log.warning("cpu_gemm: not built or not loadable (%s): torch's int4/int8 kernels instead", e)
        return None
    log.info("cpu_gemm: kernels loaded from %s", path)
    return lib


def buildable() -> bool:
    """Whether the kernels should build here: an x86-64 CPU with AVX2 and a C compiler. Where this holds and
    available() does not, the build failed (tests fail on it instead of skipping)."""
    return _cpu_ok() and bool(_compiler()[0])


def available() -> bool:
    """Whether the kernels run here (builds them on first call)."""
    return library(best_isa()) is not None


def loaded() -> ctypes.CDLL:
    """The library best_isa() names; RuntimeError where it is not built here (the reason was logged)."""
    lib = library(best_isa())
    if lib is None:
        raise RuntimeError("cpu_gemm: the CPU kernels are not built here (the warning logged at first use says why)")
    return lib


@functools.cache
def fast_bf16_gemm() -> bool:
    """Whether this CPU multiplies bf16 natively (AMX or AVX-512 BF16): there a GEMM on a bf16 copy of the weights
    beats these kernels for prompt chunks (on AMX, 33.9 ms for one SmolLM2 step's matmuls at 64 rows); elsewhere it
    is ~9x slower than them (738 against 86 ms at 64 rows on the AVX2 EPYC)."""
    cpu = torch.cpu
    return any(getattr(cpu, name, lambda: False)() for name in ("_is_amx_tile_supported", "_is_avx512_bf16_supported"))


def q4_layout(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """q (N, K) integers in 0..15, scale and zero (N, K / GROUP) bf16 (w = (q - 8) * scale + zero) -> the kernel's
    `packed` (N / TILE, K / GROUP, 4, TILE, 4) uint8 and `scales_zeros` (N / TILE, K / GROUP, 2, TILE) bf16, laid out
    as cpu_gemm.c's q4_tile reads them. Both concatenate along dim 0 for fused layers. ValueError unless fits(N, K)
    and q is in 0..15 (16 would spill into its neighbour's nibble)."""
    n, k = q.shape
    if not fits(n, k) or q.numel() and not 0 <= int(q.min()) <= int(q.max()) <= 15:
        raise ValueError(f"cpu_gemm: q4_layout needs q (N, K) in 0..15, N a multiple of {TILE}, K of {GROUP}; got "
                         f"{tuple(q.shape)}")
    t, g = n // TILE, k // GROUP
    steps = q.to(torch.uint8).reshape(t, TILE, g, 2, 4, 4).permute(0, 2, 3, 4, 1, 5)  # t, g, half, j, column, i
    packed = (steps[:, :, 0] | (steps[:, :, 1] << 4)).contiguous()
    sz = torch.stack([scale, zero], -1).reshape(t, TILE, g, 2).permute(0, 2, 3, 1).contiguous()
    return packed, sz


def q8_layout(w: torch.Tensor) -> torch.Tensor:
    """w (N, K) int8 -> (N / TILE, K / GROUP, 8, TILE, 4) int8, as q8_tile reads it. ValueError unless fits(N, K)."""
    n, k = w.shape
    if not fits(n, k) or w.dtype != torch.int8:
        raise ValueError(f"cpu_gemm: q8_layout needs int8 (N, K), N a multiple of {TILE}, K of {GROUP}; got "
                         f"{tuple(w.shape)} {w.dtype}")
    return w.reshape(n // TILE, TILE, k // GROUP, 8, 4).permute(0, 2, 3, 1, 4).contiguous()


def q8_unlayout(tiles: torch.Tensor) -> torch.Tensor:
    """q8_layout's inverse: (N / TILE, K / GROUP, 8, TILE, 4) -> (N, K)."""
    t, g, _, _, _ = tiles.shape
    return tiles.permute(0, 3, 1, 2, 4).reshape(t * TILE, g * GROUP)


def fits(out_features: int, in_features: int) -> bool:
    """Whether a layer's shape suits the kernels: out a multiple of TILE, in of GROUP."""
    return out_features % TILE == 0 and in_features % GROUP == 0


def check_weights(bits: int, weight: torch.Tensor, scales: torch.Tensor) -> tuple[int, int]:
    """(K, N), the in and out features, of a layer's kernel weights, after checking them: `bits` 4, q4_layout's
    (packed, scales_zeros); 8, q8_layout's tiles and per-column scales (N,) bf16; contiguous, on the CPU. ValueError
    naming what is wrong (wrong weights could make the kernel read past them)."""
    if bits not in (4, 8):
        raise ValueError(f"cpu_gemm: bits must be 4 or 8, got {bits}")
    if weight.device.type != "cpu" or scales.device.type != "cpu":
        raise ValueError("cpu_gemm: the weights must be on the CPU")
    if weight.dim() != 5:
        raise ValueError(f"cpu_gemm: weight must be in the kernel's 5-d tiled layout, got {tuple(weight.shape)}")
    k, n = weight.shape[1] * GROUP, weight.shape[0] * TILE
    four = bits == 4
    layout, kind = (n // TILE, k // GROUP, 4 if four else 8, TILE, 4), torch.uint8 if four else torch.int8
    if weight.dtype != kind or weight.shape != layout or not weight.is_contiguous():
        raise ValueError(f"cpu_gemm: weight must be contiguous {kind} {layout}, got {tuple(weight.shape)} "
                         f"{weight.dtype}")
    shape = (n // TILE, k // GROUP, 2, TILE) if four else (n,)
    if scales.dtype != torch.bfloat16 or scales.shape != shape or not scales.is_contiguous():
        raise ValueError(f"cpu_gemm: scales must be contiguous bf16 {shape}, got {tuple(scales.shape)} "
                         f"{scales.dtype}")
    return k, n


def _run(bits: int, x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor, k: int, n: int,
         norm: torch.Tensor | None, eps: float, swiglu: bool, residual: torch.Tensor | None,
         out_dtype: torch.dtype) -> torch.Tensor:
    """The kernel on weights that check_weights passed ((k, n) its answer): checks the rest."""
    width = 2 * k if swiglu else k
    if (not x.is_cpu or x.dtype != torch.bfloat16 or x.dim() != 2 or not x.is_contiguous() or x.shape[1] != width
            or x.is_neg()):
        raise ValueError(f"cpu_gemm: x must be 2-d contiguous bf16 on the CPU with {width} columns, "
                         f"got {tuple(x.shape)} {x.dtype} on {x.device}")
    m = x.shape[0]
    for name, t, shape in (("norm", norm, (k,)), ("residual", residual, (m, n))):
        if t is not None and (not t.is_cpu or t.dtype != torch.bfloat16 or t.shape != shape or not t.is_contiguous()
                              or t.is_neg()):
            raise ValueError(f"cpu_gemm: {name} must be contiguous bf16 {shape} on the CPU, got {tuple(t.shape)} "
                             f"{t.dtype} on {t.device}")
    f32 = out_dtype == torch.float32
    if not f32 and out_dtype != torch.bfloat16 or f32 and residual is not None:
        raise ValueError(f"cpu_gemm: out_dtype must be bf16, or fp32 without a residual, got {out_dtype}")
    y = torch.empty(m, n, dtype=out_dtype)
    lib = loaded()
    fn = lib.chat_q4_gemm if bits == 4 else lib.chat_q8_gemm
    if m and fn(x.data_ptr(), m, k, weight.data_ptr(), scales.data_ptr(), n, y.data_ptr(), torch.get_num_threads(),
                None if norm is None else norm.data_ptr(), eps, int(swiglu),
                None if residual is None else residual.data_ptr(), int(f32)):
        raise MemoryError(f"cpu_gemm: no scratch memory for {m} rows of {k}")
    return y


def _call(bits: int, x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor, norm: torch.Tensor | None,
          eps: float, swiglu: bool, residual: torch.Tensor | None, out_dtype: torch.dtype) -> torch.Tensor:
    return _run(bits, x, weight, scales, *check_weights(bits, weight, scales), norm, eps, swiglu, residual, out_dtype)


@torch.library.custom_op("chat_cpu_gemm::q4_mm", mutates_args=())
def _q4_op(x: torch.Tensor, packed: torch.Tensor, scales_zeros: torch.Tensor, norm: torch.Tensor | None, eps: float,
           swiglu: bool, residual: torch.Tensor | None, out_dtype: torch.dtype) -> torch.Tensor:
    return _call(4, x, packed, scales_zeros, norm, eps, swiglu, residual, out_dtype)


@torch.library.custom_op("chat_cpu_gemm::q8_mm", mutates_args=())
def _q8_op(x: torch.Tensor, tiles: torch.Tensor, scales: torch.Tensor, norm: torch.Tensor | None, eps: float,
           swiglu: bool, residual: torch.Tensor | None, out_dtype: torch.dtype) -> torch.Tensor:
    return _call(8, x, tiles, scales, norm, eps, swiglu, residual, out_dtype)


@_q4_op.register_fake
@_q8_op.register_fake
def _(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor, norm: torch.Tensor | None, eps: float,
      swiglu: bool, residual: torch.Tensor | None, out_dtype: torch.dtype) -> torch.Tensor:
    return x.new_empty(x.shape[0], weight.shape[0] * TILE, dtype=out_dtype)


def q4_mm(x: torch.Tensor, packed: torch.Tensor, scales_zeros: torch.Tensor, norm: torch.Tensor | None = None,
          eps: float = 0.0, swiglu: bool = False, residual: torch.Tensor | None = None,
          out_dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """x (M, K) bf16 contiguous @ the 4-bit weight (q4_layout's parts) -> (M, N) `out_dtype` (bf16; or fp32 for
    logits: bf16's 8 bits turn near-ties into ties, whose pick is then the lower token id), with what a decode layer
    does around its matmuls folded in (no torch operation each): `swiglu`, x is (M, 2K) and the matmul reads
    silu(x[:, :K]) * x[:, K:]; `norm` (K,) bf16, it reads RMSNorm(x) * norm with `eps` (Llama's, in torch's
    roundings); `residual` (M, N) bf16 is added to a bf16 output. ValueError naming a wrong shape or dtype. Under
    torch.compile an opaque custom op; eagerly a direct call (the op's dispatch would cost more than the kernel)."""
    if torch.compiler.is_compiling():
        return _q4_op(x, packed, scales_zeros, norm, eps, swiglu, residual, out_dtype)
    return _call(4, x, packed, scales_zeros, norm, eps, swiglu, residual, out_dtype)


def q8_mm(x: torch.Tensor, tiles: torch.Tensor, scales: torch.Tensor, norm: torch.Tensor | None = None,
          eps: float = 0.0, swiglu: bool = False, residual: torch.Tensor | None = None,
          out_dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """x (M, K) bf16 contiguous @ the int8 weight (q8_layout) with per-column `scales` (N,) bf16 -> (M, N);
    the rest as q4_mm."""
    if torch.compiler.is_compiling():
        return _q8_op(x, tiles, scales, norm, eps, swiglu, residual, out_dtype)
    return _call(8, x, tiles, scales, norm, eps, swiglu, residual, out_dtype)


def layer_mm(bits: int, x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor, shape: tuple[int, int],
             norm: torch.Tensor | None = None, eps: float = 0.0, swiglu: bool = False,
             residual: torch.Tensor | None = None, out_dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """q4_mm (`bits` 4) or q8_mm (8) for a layer whose weights check_weights passed when it was built, `shape` its
    answer: only the activations and the fused inputs are checked per call (the quantized layers' calls outside
    cpu_decode_layer.py: the head, prompt chunks, GPT-NeoX; checking the weights each time cost a few microseconds)."""
    if torch.compiler.is_compiling():
        return (_q4_op if bits == 4 else _q8_op)(x, weight, scales, norm, eps, swiglu, residual, out_dtype)
    return _run(bits, x, weight, scales, *shape, norm, eps, swiglu, residual, out_dtype)
