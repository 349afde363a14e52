"""A lean forward pass for Llama-shaped models (SmolLM2), over transformers' own weights and modules' parameters.

transformers' modules spend most of a CPU decode step outside the matmuls: ~6,700 ATen operations per SmolLM2
step (mask and position plumbing, attention-interface dispatch, casts, module hooks; tests/bench/step_profile.py).
This is the same arithmetic written as gpt-fast writes it: the rotary tables computed once for every position,
activations kept 2-d so each weight matmul is one bare call, q/k/v and gate/up fused into one matmul each
(fused_linear.py), q and k rotated together, one index_copy_ per KV write and one attention call per layer on the
slot KV cache (kv_cache.py's `write` and `read`), no per-step mask or position building beyond what the backend
passes. It reads the weights of the model it is built from (fused in place, no copy), so int8 layers
(quantize.py) and tied embeddings stay as they are. About 1,600 ATen operations per 1-row SmolLM2 step instead of
transformers' 6,700 (docs/BENCHMARKS.md).

Numerics follow transformers' LlamaModel (RMSNorm in fp32, rotary tables in fp32 cast to the activations' dtype,
SDPA with grouped-query attention), so greedy fp32 replies are the same; tests/test_lean_llama.py compares them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from worker.pipeline.fused_linear import fuse_linears
from worker.pipeline.kv_cache import SlotKVCache


def supports(model: Any) -> bool:
    """Whether `model` (a transformers CausalLM) is Llama-shaped with the plain rotary embedding this implements."""
    cfg = model.config
    scaling = getattr(cfg, "rope_scaling", None) or {}
    return (cfg.model_type == "llama" and not getattr(cfg, "attention_bias", False)
            and not getattr(cfg, "mlp_bias", False) and scaling.get("rope_type", "default") == "default"
            and getattr(cfg, "hidden_act", "silu") == "silu")


def _matmul(layer: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """The bare matmul of a bias-free layer, (rows, in) contiguous -> (rows, out): one ATen call, no reshapes."""
    # quantize.py's layers and fused_linear.Concatenated have a bare `mm`; nn.Linear's forward is F.linear, no hooks.
    return layer.mm if hasattr(layer, "mm") else layer.forward


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
        self.inner = cfg.intermediate_size
        rope = base.rotary_emb
        pos = torch.arange(max_len, dtype=torch.float32, device=rope.inv_freq.device)
        freqs = torch.outer(pos, rope.inv_freq.float())
        emb = torch.cat((freqs, freqs), dim=-1)
        dtype = base.embed_tokens.weight.dtype
        # (max_len, head_dim), computed in fp32 and cast once, as transformers casts per step. rotate_half(x) * sin
        # = roll(x, half) * cat(-sin_half, sin_half) exactly (a sign flip is exact), in one op fewer.
        half = self.head_dim // 2
        sin = emb.sin() * rope.attention_scaling
        self.register_buffer("cos", (emb.cos() * rope.attention_scaling).to(dtype), persistent=False)
        self.register_buffer("sin", torch.cat((-sin[:, :half], sin[:, half:]), -1).to(dtype), persistent=False)
        self.qkv = nn.ModuleList(fuse_linears([layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj])
                                 for layer in base.layers)
        self.gate_up = nn.ModuleList(fuse_linears([layer.mlp.gate_proj, layer.mlp.up_proj]) for layer in base.layers)

    @staticmethod
    def _norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        # LlamaRMSNorm's order: normalize in fp32, cast back, then the weight. (F.rms_norm for the middle: fewer
        # calls, no faster on CPU, measured side by side.)
        h = x.float()
        return weight * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)

    def forward(self, ids: torch.Tensor, rot_pos: torch.Tensor, mask: torch.Tensor, cache: SlotKVCache
                ) -> torch.Tensor:
        """See the class docstring; `cache` is bound to the rows and write positions by the caller."""
        rows, tokens = ids.shape
        n, heads, kv_heads, d = rows * tokens, self.heads, self.kv_heads, self.head_dim
        qk_heads = heads + kv_heads
        # Activations stay 2-d, (rows x tokens, features), so every weight matmul is one bare call.
        h = self.base.embed_tokens(ids.view(n))
        cos = self.cos[rot_pos.view(n)].unsqueeze(1)  # (n, 1, head_dim), broadcast over q's and k's heads
        sin = self.sin[rot_pos.view(n)].unsqueeze(1)
        for i, layer in enumerate(self.base.layers):
            attn, norm1, norm2 = layer.self_attn, layer.input_layernorm, layer.post_attention_layernorm
            qkv = _matmul(self.qkv[i])(self._norm(h, norm1.weight, norm1.variance_epsilon)).view(n, -1, d)
            qk = qkv[:, :qk_heads]  # q and k rotated together: (n, heads + kv_heads, head_dim)
            qk = qk * cos + qk.roll(d // 2, -1) * sin
            cache.write(i, qk[:, heads:].reshape(-1, d), qkv[:, qk_heads:].reshape(-1, d))
            keys, values = cache.read(i)
            q = qk[:, :heads].view(rows, tokens, heads, d).transpose(1, 2)
            o = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=self.scale,
                                               enable_gqa=kv_heads != heads)
            h = h + _matmul(attn.o_proj)(o.transpose(1, 2).reshape(n, heads * d))
            gate_up = _matmul(self.gate_up[i])(self._norm(h, norm2.weight, norm2.variance_epsilon))
            h = h + _matmul(layer.mlp.down_proj)(F.silu(gate_up[:, : self.inner]) * gate_up[:, self.inner:])
        return self._norm(h, self.base.norm.weight, self.base.norm.variance_epsilon).view(rows, tokens, self.hidden)
