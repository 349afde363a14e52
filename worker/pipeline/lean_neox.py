"""A lean forward pass for GPT-NeoX models (Pythia, OASST's Pythia-12B, tiny-neox), over transformers' own weights.

The same arithmetic as transformers' GPTNeoXModel, written as lean_llama.py writes Llama's: activations 2-d, each
weight matmul one bare call (fused_linear.linear), rotary tables computed once (rotary.py), one index_copy_ per KV
write (kv_cache.py's `write` and `read`), one attention call per layer. GPT-NeoX already fuses q/k/v into one
`query_key_value` layer, laid out per head as [q | k | v]; its rotary embedding turns only the first `rotary_ndims`
dims of each head (Pythia: a quarter), and with `use_parallel_residual` attention and MLP both read the layer's input.

Numerics follow transformers (LayerNorm with bias, the model's own activation module, SDPA with 1/sqrt(head_size)),
so fp32 logits equal transformers' within float rounding; tests/test_lean_neox.py compares them.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from worker.pipeline.fused_linear import linear
from worker.pipeline.kv_cache import SlotKVCache
from worker.pipeline.rotary import plain_rope, rotary_tables, rotate


def supports(model: Any) -> bool:
    """Whether `model` (a transformers CausalLM) is a GPT-NeoX with the plain rotary embedding this implements."""
    return model.config.model_type == "gpt_neox" and plain_rope(model.config)


class LeanNeoX(nn.Module):
    """forward(ids (rows, tokens) int64, rot_pos (rows, tokens) int64, mask (rows, 1, tokens, kv_len) bool, cache)
    -> hidden states (rows, tokens, hidden) after the final LayerNorm, as GPTNeoXModel's last_hidden_state."""

    def __init__(self, base: Any, max_len: int):
        super().__init__()
        cfg = base.config
        self.base = base
        self.heads = cfg.num_attention_heads
        self.head_dim = cfg.hidden_size // cfg.num_attention_heads
        self.hidden = cfg.hidden_size
        self.rotary_dims = base.layers[0].attention.rotary_ndims
        self.parallel = cfg.use_parallel_residual
        cos, sin = rotary_tables(base.rotary_emb, max_len, base.embed_in.weight.dtype)  # (max_len, rotary_dims)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)

    @staticmethod
    def _norm(x: torch.Tensor, norm: nn.LayerNorm) -> torch.Tensor:
        return F.layer_norm(x, norm.normalized_shape, norm.weight, norm.bias, norm.eps)

    def forward(self, ids: torch.Tensor, rot_pos: torch.Tensor, mask: torch.Tensor, cache: SlotKVCache
                ) -> torch.Tensor:
        """See the class docstring; `cache` is bound to the rows and write positions by the caller."""
        rows, tokens = ids.shape
        n, heads, d, r = rows * tokens, self.heads, self.head_dim, self.rotary_dims
        h = self.base.embed_in(ids.view(n))
        cos = self.cos[rot_pos.view(n)].view(n, 1, 1, r)  # broadcast over heads and over q, k
        sin = self.sin[rot_pos.view(n)].view(n, 1, 1, r)
        for i, layer in enumerate(self.base.layers):
            attn, mlp = layer.attention, layer.mlp
            qkv = linear(attn.query_key_value, self._norm(h, layer.input_layernorm)).view(n, heads, 3, d)
            qk = qkv[:, :, :2]  # q and k together: (n, heads, 2, head_dim), the first rotary_dims dims turned
            qk = torch.cat((rotate(qk[..., :r], cos, sin), qk[..., r:]), -1) if r < d else rotate(qk, cos, sin)
            cache.write(i, qk[:, :, 1].reshape(-1, d), qkv[:, :, 2].reshape(-1, d))
            keys, values = cache.read(i)
            q = qk[:, :, 0].view(rows, tokens, heads, d).transpose(1, 2)
            o = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=d ** -0.5)
            a = linear(attn.dense, o.transpose(1, 2).reshape(n, heads * d))
            if self.parallel:  # transformers' order: mlp_output + attn_output + hidden_states
                h = self._mlp(mlp, self._norm(h, layer.post_attention_layernorm)) + a + h
            else:
                a = a + h
                h = self._mlp(mlp, self._norm(a, layer.post_attention_layernorm)) + a
        return self._norm(h, self.base.final_layer_norm).view(rows, tokens, self.hidden)

    @staticmethod
    def _mlp(mlp: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return linear(mlp.dense_4h_to_h, mlp.act(linear(mlp.dense_h_to_4h, x)))
