"""Small offline models for engine tests: tiny-neox (the preset) and a Llama-shaped twin with
grouped-query attention, the SmolLM2 code path, on the same byte tokenizer."""

from __future__ import annotations

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from shared.codec import Codec
from shared.prompts import PromptFormat
from worker.engine.engine import Engine
from worker.pipeline.backend import Prefill
from worker.pipeline.tiny_neox import build_tokenizer
from worker.pipeline.torch_backend import TorchBackend


def tiny_llama(hidden: int = 64):
    """(tokenizer, a random LlamaForCausalLM): 4 heads, 2 KV heads, MLP twice `hidden`. At hidden 128 every
    projection is whole int4 packing blocks (quantize.PACK_BLOCK_N), so int4 layers fuse."""
    tok = build_tokenizer()
    cfg = LlamaConfig(vocab_size=272, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048)
    cfg._attn_implementation = "sdpa"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(7)
        model = LlamaForCausalLM(cfg).eval()
        with torch.no_grad():
            model.lm_head.weight.mul_(8.0)
    return tok, model


def engine_for(model, tokenizer, *, slots: int = 8, max_len: int = 256, lean: bool = False,
               quantize: str = "none") -> Engine:
    codec = Codec(tokenizer, PromptFormat.oasst, ["<|endoftext|>"])  # a fresh codec: tests may edit it
    return Engine(TorchBackend(model, slots=slots, max_len=max_len, lean=lean, quantize=quantize), codec).start()


def lockstep_decode(backends: list[TorchBackend], prompts: dict[int, list[int]], widths: list[int]):
    """Prefill `prompts` into their slots on every backend, then one greedy decode step per width n
    (rows past n are not passed at all; a slot < n without a prompt is idle), all fed the first
    backend's tokens. Yields (rows that count, each backend's logits): the prefill, then each step."""
    out = [be.prefill([Prefill(s, p, 0) for s, p in prompts.items()]) for be in backends]
    yield torch.ones(len(prompts), dtype=torch.bool), out
    ids = {s: int(t) for s, t in zip(prompts, out[0].argmax(-1))}
    pos = {s: len(p) for s, p in prompts.items()}
    for n in widths:
        active = torch.tensor([s in prompts for s in range(n)])
        tokens, positions = (torch.tensor([d.get(s, 0) for s in range(n)]) for d in (ids, pos))
        out = [be.decode(tokens, positions, active) for be in backends]
        yield active, out
        for s in range(n):
            if active[s]:
                ids[s], pos[s] = int(out[0][s].argmax()), pos[s] + 1
