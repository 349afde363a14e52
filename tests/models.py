"""Small offline models for engine tests: tiny-neox (the preset) and a Llama-shaped twin with
grouped-query attention, the SmolLM2 code path, on the same byte tokenizer."""

from __future__ import annotations

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from shared.prompts import PromptFormat
from worker.engine.engine import Engine
from worker.pipeline.codec import Codec
from worker.pipeline.tiny_neox import build_tokenizer
from worker.pipeline.torch_backend import TorchBackend


def tiny_llama():
    tok = build_tokenizer()
    cfg = LlamaConfig(vocab_size=272, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048)
    cfg._attn_implementation = "sdpa"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(7)
        model = LlamaForCausalLM(cfg).eval()
        with torch.no_grad():
            model.lm_head.weight.mul_(8.0)
    return tok, model


def engine_for(model, tokenizer, *, slots: int = 8, max_len: int = 256) -> Engine:
    codec = Codec(tokenizer, PromptFormat.oasst, ["<|endoftext|>"])  # a fresh codec: tests may edit it
    return Engine(TorchBackend(model, slots=slots, max_len=max_len), codec).start()
