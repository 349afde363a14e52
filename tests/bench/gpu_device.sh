#!/usr/bin/env bash
# The GPU section on a lent GPU machine (the `device` tool), in one call. That machine's python3 holds
# torch and transformers but nothing else and reaches no registry, so what it lacks travels along:
#   here, once:  make gpu-bench-prep      (pydantic wheels -> .whl/, the baselines -> .baselines/)
#   device run:  bash tests/bench/gpu_device.sh   with carry [".whl", ".baselines"] (checked here with
#                redis, celery and fastapi made unimportable: the GPU section needs none of them)
#   here, after: python -m tests.bench.report --merge <files_at>/benchmarks.json
#                (docs/BENCHMARKS.md + docs/benchmarks.json: this machine's CPU figures, the GPU ones)
set -euo pipefail
cd "$(dirname "$0")/../.."
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH="/tmp/site:$PWD" PYTHONUNBUFFERED=1 CHAT_BENCH_BASELINES="$PWD/.baselines"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true
out="${OUT:-/tmp/out}"
mkdir -p "$out"
# Extra arguments go to the bench (e.g. --no-gpu-compile to skip the baseline's compiled row, or
# --gpu-variants graphs to skip our compiled variant, when device time is short). gpu_partial.json holds
# what was measured so far, so a run cut short by its timeout still merges (report --merge takes it too).
python3 -m tests.bench.run --only gpu --out "$out/BENCHMARKS.gpu.md" --json "$out/benchmarks.json" \
  --gpu-partial "$out/gpu_partial.json" "$@" 2>&1 | tee "$out/log"
