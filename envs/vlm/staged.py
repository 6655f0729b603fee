"""The knobbed LLM forward: a decoder layer of `OlmoeModel` run with a per-call router top-k.

Knobs are arguments here, never attributes set on shared modules, so concurrent or successive
requests cannot leak into each other. The runner calls the layer's own submodules (norms,
`OlmoeAttention`, router weight, `OlmoeExperts`), so the numerics are those of `transformers`.
`one_token_layer` computes the same layer for one new token per row in plain tensor ops (the
two-stage controller's budget token in replay), where the module path's plumbing dominates.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class KVCache:
    """Per-layer key/value cache with the `update` signature `OlmoeAttention` calls.

    `fork()` shares the already cached tensors without copying; updates concatenate into new
    tensors, so a forked cache never changes its parent. That is what lets one prefix state of
    layers 0-2 serve many `finish` calls with different knobs.
    """

    def __init__(self, layers: dict[int, tuple[torch.Tensor, torch.Tensor]] | None = None):
        self.layers = dict(layers or {})

    def update(self, key, value, layer_idx, *args, **kwargs):
        if layer_idx in self.layers:
            k0, v0 = self.layers[layer_idx]
            key, value = torch.cat([k0, key], dim=-2), torch.cat([v0, value], dim=-2)
        self.layers[layer_idx] = (key, value)
        return key, value

    def fork(self) -> KVCache:
        return KVCache(self.layers)


def attention_mask(valid: torch.Tensor, n_query: int, dtype: torch.dtype) -> torch.Tensor:
    """Additive causal + padding mask [B, 1, n_query, S] for the last `n_query` of S positions.

    Padding queries may see themselves so no row is fully masked (their outputs are never read).
    """
    s = valid.shape[1]
    q_pos = torch.arange(s - n_query, s, device=valid.device)[:, None]
    k_pos = torch.arange(s, device=valid.device)[None, :]
    allowed = (k_pos <= q_pos)[None] & valid[:, None, :]
    allowed |= (k_pos == q_pos)[None]
    mask = torch.zeros(allowed.shape, dtype=dtype, device=valid.device)
    mask.masked_fill_(~allowed, torch.finfo(dtype).min)
    return mask[:, None]


def gathered_experts(experts: nn.Module, x: torch.Tensor, index: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """The experts' output for a few tokens, with each token's chosen experts' weights gathered.

    `OlmoeExperts` loops over every expert a token hit (on CPU, `grouped_mm` falls back to the same
    loop): dozens of small kernel launches per layer for one token. Gathering the k chosen weight
    matrices per token makes it four launches; it costs N*k copies of an expert, so it is for
    decode-sized inputs (N*k <= number of experts), as the controller's budget token is.
    """
    flat = index.reshape(-1)  # index_select: several times faster than advanced indexing here
    w_in = experts.gate_up_proj.index_select(0, flat).view(*index.shape, *experts.gate_up_proj.shape[1:])
    w_out = experts.down_proj.index_select(0, flat).view(*index.shape, *experts.down_proj.shape[1:])
    gate, up = torch.einsum("nd,nkfd->nkf", x, w_in).chunk(2, dim=-1)
    y = torch.einsum("nkf,nkdf->nkd", experts.act_fn(gate) * up, w_out)
    return torch.einsum("nk,nkd->nd", weights, y)


def moe_forward(mlp: nn.Module, x: torch.Tensor, top_k: int, gathered: bool = False) -> torch.Tensor:
    """`OlmoeSparseMoeBlock.forward` with the router's top-k given per call (`gathered`: see
    `gathered_experts`)."""
    b, t, d = x.shape
    flat = x.reshape(-1, d)
    router_logits = F.linear(flat, mlp.gate.weight)
    probs = torch.softmax(router_logits, dim=-1, dtype=torch.float)
    weights, index = torch.topk(probs, top_k, dim=-1)
    if mlp.gate.norm_topk_prob:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    weights = weights.to(router_logits.dtype)
    out = gathered_experts(mlp.experts, flat, index, weights) if gathered else mlp.experts(flat, index, weights)
    return out.reshape(b, t, d)


def run_layer(layer: nn.Module, h, position_embeddings, mask, cache: KVCache | None, top_k: int):
    """`OlmoeDecoderLayer.forward` with a per-call top-k."""
    residual = h
    x, _ = layer.self_attn(
        hidden_states=layer.input_layernorm(h),
        position_embeddings=position_embeddings,
        attention_mask=mask,
        cache=cache,
    )
    h = residual + x
    return h + moe_forward(layer.mlp, layer.post_attention_layernorm(h), top_k)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


def _rms(norm: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """`OlmoeRMSNorm` as one fused op."""
    return F.rms_norm(x, norm.weight.shape, norm.weight, norm.variance_epsilon)


def one_token_layer(layer: nn.Module, h, cos, sin, past_k, past_v, mask, top_k: int) -> torch.Tensor:
    """`OlmoeDecoderLayer` for one new token per row against cached keys/values, in plain tensor ops.

    h [B, d]; cos, sin [B, head_dim]; past_k, past_v [B, H, L, head_dim]; mask [B, L + 1] additive.
    The same arithmetic as `run_layer` (the layer's own weights), with fused norms and attention and
    without the module plumbing and per-expert loop that cost a CPU milliseconds for one token.
    """
    attn, b = layer.self_attn, h.shape[0]
    heads, head_dim = past_k.shape[1], past_k.shape[-1]
    x = _rms(layer.input_layernorm, h)
    q = _rms(attn.q_norm, attn.q_proj(x)).view(b, heads, 1, head_dim)
    k = _rms(attn.k_norm, attn.k_proj(x)).view(b, heads, 1, head_dim)
    v = attn.v_proj(x).view(b, heads, 1, head_dim)
    if attn.config.clip_qkv is not None:
        q, k, v = (t.clamp(-attn.config.clip_qkv, attn.config.clip_qkv) for t in (q, k, v))
    cos, sin = cos[:, None, None], sin[:, None, None]
    q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
    keys, values = torch.cat([past_k, k], dim=2), torch.cat([past_v, v], dim=2)
    out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask[:, None, None], scale=attn.scaling)
    h = h + attn.o_proj(out.reshape(b, -1))
    return h + moe_forward(layer.mlp, _rms(layer.post_attention_layernorm, h)[:, None], top_k, gathered=True)[:, 0]
