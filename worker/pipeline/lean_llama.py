"""A lean forward pass for Llama-shaped models (SmolLM2), over transformers' own weights and modules' parameters.

transformers' modules spend most of a CPU decode step outside the matmuls: ~6,700 ATen operations per SmolLM2
step (mask and position plumbing, attention-interface dispatch, casts, module hooks; tests/bench/step_profile.py).
This is the same arithmetic written as gpt-fast writes it: the rotary tables computed once for every position,
activations kept 2-d so each weight matmul is one bare call, q/k/v and gate/up fused into one matmul each
(fused_linear.py), q and k rotated together, one index_copy_ per KV write and one attention call per layer on the
slot KV cache (kv_cache.py's `write` and `read`), no per-step mask or position building beyond what the backend
passes. With bf16 activations on a CPU where the project's kernels run every projection (`use_kernels`, called by
the backend), a decode step is one kernel call per layer (cpu_decode_layer.py: the projections, rotary, KV write
and attention). It reads the weights of the model it is built from (fused in place, no copy), so int8/int4 layers
(quantize.py) and tied embeddings stay as they are. 1,552 top-level ATen operations per 1-row SmolLM2 step instead
of transformers' ~2,590 on torch's kernels; 125 events on the project's (docs/BENCHMARKS.md, issue 15).

Numerics follow transformers' LlamaModel (RMSNorm in fp32, rotary tables in fp32 cast to the activations' dtype,
SDPA with grouped-query attention), so greedy fp32 replies are the same; tests/test_lean_llama.py compares them.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from worker.pipeline.cpu_attention import MAX_HEAD_DIM
from worker.pipeline.cpu_decode_layer import LayerKernels, decode_layers
from worker.pipeline.fused_linear import fuse_linears, project, rms_norm
from worker.pipeline.kv_cache import SlotKVCache
from worker.pipeline.rotary import plain_rope, rotary_tables, rotate


def supports(model: Any) -> bool:
    """Whether `model` (a transformers CausalLM) is Llama-shaped with the plain rotary embedding this implements."""
    cfg = model.config
    return (cfg.model_type == "llama" and not getattr(cfg, "attention_bias", False)
            and not getattr(cfg, "mlp_bias", False) and plain_rope(cfg)
            and getattr(cfg, "hidden_act", "silu") == "silu")


class LeanLlama(nn.Module):
    """forward(ids (rows, tokens) int64, rot_pos (rows, tokens) int64, mask (rows, 1, tokens, kv_len) bool, cache)
    -> hidden states (rows, tokens, hidden) after the final norm, as LlamaModel's last_hidden_state.

    Building it fuses each layer's q/k/v and gate/up projections (fused_linear.py: the modules keep views of the
    fused weights, so transformers' forward still runs on the same memory)."""

    def __init__(self, base: Any, max_len: int):
        super().__init__()
        cfg = base.config
        self.base = base
        self.heads = cfg.num_attention_heads
        self.kv_heads = cfg.num_key_value_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.scale = self.head_dim ** -0.5
        self.hidden = cfg.hidden_size
        cos, sin = rotary_tables(base.rotary_emb, max_len, base.embed_tokens.weight.dtype)  # (max_len, head_dim)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)
        self.qkv = nn.ModuleList(fuse_linears([layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj])
                                 for layer in base.layers)
        self.gate_up = nn.ModuleList(fuse_linears([layer.mlp.gate_proj, layer.mlp.up_proj]) for layer in base.layers)
        self.layer_kernels: list[LayerKernels] | None = None  # use_kernels: None, torch's operations

    def use_kernels(self, on: bool) -> None:
        """Run decode steps as one kernel call per layer (cpu_decode_layer.py: rotary, KV write and attention in
        cpu_attention.c, the projections in cpu_gemm.c) where `on` (the backend's word: bf16 activations on a CPU
        that builds the kernels), every layer's projections run the kernels and the heads suit the attention kernel
        (head_dim a multiple of 8 up to MAX_HEAD_DIM); else torch's operations."""
        layers = []
        on = on and self.head_dim % 8 == 0 and self.head_dim <= MAX_HEAD_DIM and self.heads % self.kv_heads == 0
        for i, layer in enumerate(self.base.layers):
            norms = layer.input_layernorm, layer.post_attention_layernorm
            parts = self.qkv[i], layer.self_attn.o_proj, self.gate_up[i], layer.mlp.down_proj
            if not (on and LayerKernels.fits(*parts) and norms[0].variance_epsilon == norms[1].variance_epsilon):
                self.layer_kernels = None
                return
            layers.append(LayerKernels(*parts, norms[0].weight, norms[1].weight, float(norms[0].variance_epsilon)))
        self.layer_kernels = layers

    def forward(self, ids: torch.Tensor, rot_pos: torch.Tensor, mask: torch.Tensor, cache: SlotKVCache
                ) -> torch.Tensor:
        """See the class docstring; `cache` is bound to the rows and write positions by the caller."""
        rows, tokens = ids.shape
        n, heads, kv_heads, d = rows * tokens, self.heads, self.kv_heads, self.head_dim
        # Activations stay 2-d, (rows x tokens, features), so every weight matmul is one bare call.
        h = self.base.embed_tokens(ids.view(n))
        if (self.layer_kernels is not None and tokens == 1 and cache.first_rows == rows
                and not torch.compiler.is_compiling()):
            h = decode_layers(h, self.layer_kernels, heads, kv_heads, self.cos, self.sin, rot_pos.reshape(n),
                              cache.write_positions().reshape(n), [cache.layer(i) for i in range(len(self.qkv))],
                              self.scale)
            return rms_norm(h, self.base.norm.weight, self.base.norm.variance_epsilon).view(rows, tokens, self.hidden)
        cos = self.cos[rot_pos.view(n)].unsqueeze(1)  # (n, 1, head_dim), broadcast over q's and k's heads
        sin = self.sin[rot_pos.view(n)].unsqueeze(1)
        for i, layer in enumerate(self.base.layers):
            attn, norm1, norm2 = layer.self_attn, layer.input_layernorm, layer.post_attention_layernorm
            # Each project line is one call where the layers run cpu_gemm's kernels (the norm, SwiGLU and residual
            # folded in)
            qkv = project(self.qkv[i], h, norm=norm1)
            o = self._attention(i, qkv.view(n, -1, d), cos, sin, mask, cache, rows, tokens)
            h = project(attn.o_proj, o, residual=h)
            gate_up = project(self.gate_up[i], h, norm=norm2)
            h = project(layer.mlp.down_proj, gate_up, swiglu=True, residual=h)
        return rms_norm(h, self.base.norm.weight, self.base.norm.variance_epsilon).view(rows, tokens, self.hidden)

    def _attention(self, i: int, qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor,
                   cache: SlotKVCache, rows: int, tokens: int) -> torch.Tensor:
        """Layer i's attention in torch operations: qkv (n, heads + 2 kv_heads, head_dim) -> (n, heads x head_dim),
        rotary tables (n, 1, head_dim) at the rows' positions."""
        n, heads, kv_heads, d = rows * tokens, self.heads, self.kv_heads, self.head_dim
        qk = rotate(qkv[:, : heads + kv_heads], cos, sin)  # q and k rotated together
        cache.write(i, qk[:, heads:].reshape(-1, d), qkv[:, heads + kv_heads:].reshape(-1, d))
        keys, values = cache.read(i)
        if tokens == 1 and kv_heads != heads:
            # Decode with grouped KV heads: the query heads that share a KV head become that head's queries,
            # (rows, kv_heads, group, head_dim). Same sums; SDPA's CPU kernel runs 4x faster than with
            # enable_gqa on AVX2 (docs/BENCHMARKS.md, issue 15). o comes back in q-head order.
            q = qk[:, :heads].reshape(rows, kv_heads, heads // kv_heads, d)
            o = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=self.scale)
            return o.reshape(n, heads * d)
        q = qk[:, :heads].view(rows, tokens, heads, d).transpose(1, 2)
        o = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=self.scale,
                                           enable_gqa=kv_heads != heads)
        return o.transpose(1, 2).reshape(n, heads * d)
