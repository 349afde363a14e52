"""A lean forward pass for Llama-shaped models (SmolLM2), over transformers' own weights and modules' parameters.

transformers' modules spend most of a CPU decode step outside the matmuls: ~6,700 ATen operations per SmolLM2
step (mask and position plumbing, attention-interface dispatch, casts, module hooks; tests/bench/step_profile.py).
This is the same arithmetic written as gpt-fast writes it: the rotary tables computed once for every position,
one attention call per layer on the slot KV cache (kv_cache.py's `update`), no per-step mask or position building
beyond what the backend passes. It reads the weights of the model it is built from (no copy), so int8 layers
(quantize.py) and tied embeddings stay as they are.

Numerics follow transformers' LlamaModel (RMSNorm in fp32, rotary tables in fp32 cast to the activations' dtype,
SDPA with grouped-query attention), so greedy fp32 replies are the same; tests/test_lean_llama.py compares them.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from worker.pipeline.kv_cache import SlotKVCache


def supports(model: Any) -> bool:
    """Whether `model` (a transformers CausalLM) is Llama-shaped with the plain rotary embedding this implements."""
    cfg = model.config
    scaling = getattr(cfg, "rope_scaling", None) or {}
    return (cfg.model_type == "llama" and not getattr(cfg, "attention_bias", False)
            and not getattr(cfg, "mlp_bias", False) and scaling.get("rope_type", "default") == "default"
            and getattr(cfg, "hidden_act", "silu") == "silu")


class LeanLlama(nn.Module):
    """forward(ids (rows, tokens) int64, rot_pos (rows, tokens) int64, mask (rows, 1, tokens, kv_len) bool, cache)
    -> hidden states (rows, tokens, hidden) after the final norm, as LlamaModel's last_hidden_state."""

    def __init__(self, base: Any, max_len: int):
        super().__init__()
        cfg = base.config
        self.base = base
        self.heads = cfg.num_attention_heads
        self.kv_heads = cfg.num_key_value_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.scale = self.head_dim ** -0.5
        rope = base.rotary_emb
        pos = torch.arange(max_len, dtype=torch.float32, device=rope.inv_freq.device)
        freqs = torch.outer(pos, rope.inv_freq.float())
        emb = torch.cat((freqs, freqs), dim=-1)
        dtype = base.embed_tokens.weight.dtype
        # (max_len, head_dim), computed in fp32 and cast once, as transformers casts per step
        self.register_buffer("cos", (emb.cos() * rope.attention_scaling).to(dtype), persistent=False)
        self.register_buffer("sin", (emb.sin() * rope.attention_scaling).to(dtype), persistent=False)

    @staticmethod
    def _norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
        return weight * h.to(x.dtype)

    @staticmethod
    def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        half = x.shape[-1] // 2
        rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
        return x * cos + rotated * sin

    def forward(self, ids: torch.Tensor, rot_pos: torch.Tensor, mask: torch.Tensor, cache: SlotKVCache
                ) -> torch.Tensor:
        """See the class docstring; `cache` is bound to the rows and write positions by the caller."""
        rows, tokens = ids.shape
        h = self.base.embed_tokens(ids)
        cos = self.cos[rot_pos].unsqueeze(1)  # (rows, 1, tokens, head_dim)
        sin = self.sin[rot_pos].unsqueeze(1)
        for i, layer in enumerate(self.base.layers):
            attn, mlp = layer.self_attn, layer.mlp
            x = self._norm(h, layer.input_layernorm.weight, layer.input_layernorm.variance_epsilon)
            q = attn.q_proj(x).view(rows, tokens, self.heads, self.head_dim).transpose(1, 2)
            k = attn.k_proj(x).view(rows, tokens, self.kv_heads, self.head_dim).transpose(1, 2)
            v = attn.v_proj(x).view(rows, tokens, self.kv_heads, self.head_dim).transpose(1, 2)
            q, k = self._rotate(q, cos, sin), self._rotate(k, cos, sin)
            keys, values = cache.update(k, v, i)
            o = F.scaled_dot_product_attention(q, keys.to(q.dtype), values.to(q.dtype), attn_mask=mask,
                                               scale=self.scale, enable_gqa=self.kv_heads != self.heads)
            h = h + attn.o_proj(o.transpose(1, 2).reshape(rows, tokens, self.heads * self.head_dim))
            x = self._norm(h, layer.post_attention_layernorm.weight, layer.post_attention_layernorm.variance_epsilon)
            h = h + mlp.down_proj(F.silu(mlp.gate_proj(x)) * mlp.up_proj(x))
        return self._norm(h, self.base.norm.weight, self.base.norm.variance_epsilon)
