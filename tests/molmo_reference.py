"""An independent, loop-based MolmoE forward over a state dict in the remote-code key layout.

Written from the Molmo architecture description with plain tensor ops (no transformers modules),
so the converter test compares two implementations, not one with itself.
"""

import math

import torch
import torch.nn.functional as F

V, T = "model.vision_backbone.", "model.transformer."


def synthetic_molmo_state_dict(cfg, extra_vocab: int = 128, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=0.05):
        return torch.randn(*shape, generator=g) * scale

    def norm(n):
        return 1 + rnd(n, scale=0.1)

    v, c, lm = cfg.vision, cfg.connector, cfg.llm
    sd = {}
    vit = V + "image_vit."
    sd[vit + "patch_embedding.weight"] = rnd(v.width, v.patch_size**2 * 3)
    sd[vit + "class_embedding"] = rnd(v.width)
    sd[vit + "positional_embedding"] = rnd(v.patches_per_side**2 + 1, v.width)
    sd[vit + "pre_ln.weight"], sd[vit + "pre_ln.bias"] = norm(v.width), rnd(v.width)
    for i in range(v.layers):
        b = f"{vit}transformer.resblocks.{i}."
        for n in ("wq", "wk", "wv", "wo"):
            sd[f"{b}attention.{n}.weight"], sd[f"{b}attention.{n}.bias"] = rnd(v.width, v.width), rnd(v.width)
        sd[b + "feed_forward.w1.weight"], sd[b + "feed_forward.w1.bias"] = rnd(v.mlp, v.width), rnd(v.mlp)
        sd[b + "feed_forward.w2.weight"], sd[b + "feed_forward.w2.bias"] = rnd(v.width, v.mlp), rnd(v.width)
        for n in ("attention_norm", "ffn_norm"):
            sd[f"{b}{n}.weight"], sd[f"{b}{n}.bias"] = norm(v.width), rnd(v.width)
    sd[V + "pad_embed"] = rnd(2, v.feature_width, scale=0.5)
    inner = c.pool_heads * c.pool_head_dim
    for n in ("wq", "wk", "wv"):
        sd[f"{V}image_pooling_2d.{n}.weight"] = rnd(inner, v.feature_width)
        sd[f"{V}image_pooling_2d.{n}.bias"] = rnd(inner)
    sd[V + "image_pooling_2d.wo.weight"], sd[V + "image_pooling_2d.wo.bias"] = rnd(inner, inner), rnd(inner)
    sd[V + "image_projector.w1.weight"] = rnd(c.projector_hidden, inner)
    sd[V + "image_projector.w3.weight"] = rnd(c.projector_hidden, inner)
    sd[V + "image_projector.w2.weight"] = rnd(lm.d_model, c.projector_hidden)
    d, e, h = lm.d_model, lm.experts, lm.expert_hidden
    sd[T + "wte.embedding"] = rnd(lm.vocab_size - extra_vocab, d, scale=1.0)
    sd[T + "wte.new_embedding"] = rnd(extra_vocab, d, scale=1.0)
    sd[T + "ln_f.weight"] = norm(d)
    sd["lm_head.weight"] = rnd(lm.output_vocab_size, d)
    for i in range(lm.layers):
        b = f"{T}blocks.{i}."
        sd[b + "attn.att_proj.weight"] = rnd(3 * d, d, scale=0.2)
        sd[b + "attn.attn_out.weight"] = rnd(d, d, scale=0.2)
        sd[b + "attn.q_norm.weight"], sd[b + "attn.k_norm.weight"] = norm(d), norm(d)
        sd[b + "attn_norm.weight"], sd[b + "ff_norm.weight"] = norm(d), norm(d)
        sd[b + "mlp.gate.weight"] = rnd(e, d, scale=0.5)
        for x in range(e):
            sd[f"{b}mlp.experts.{x}.gate_proj.weight"] = rnd(h, d, scale=0.2)
            sd[f"{b}mlp.experts.{x}.up_proj.weight"] = rnd(h, d, scale=0.2)
            sd[f"{b}mlp.experts.{x}.down_proj.weight"] = rnd(d, h, scale=0.2)
    return sd


def _heads(x, n):
    return x.view(x.shape[0], x.shape[1], n, -1).transpose(1, 2)


def reference_vision(sd, cfg, pixels: torch.Tensor, patch_mask: torch.Tensor) -> torch.Tensor:
    """pixels [n, 3, S, S], patch_mask [n, P, P] -> projected tokens [n, (P/2)^2, d_model]"""
    v, c = cfg.vision, cfg.connector
    vit = V + "image_vit."
    n, p, g = pixels.shape[0], v.patch_size, v.patches_per_side
    patches = pixels.permute(0, 2, 3, 1).reshape(n, g, p, g, p, 3).permute(0, 1, 3, 2, 4, 5).reshape(n, g * g, -1)
    x = patches @ sd[vit + "patch_embedding.weight"].T
    x = torch.cat([sd[vit + "class_embedding"].expand(n, 1, -1), x], dim=1) + sd[vit + "positional_embedding"]
    x = F.layer_norm(x, (v.width,), sd[vit + "pre_ln.weight"], sd[vit + "pre_ln.bias"], 1e-5)
    states = [x]
    for i in range(v.layers):
        b = f"{vit}transformer.resblocks.{i}."

        def lin(name, y, b=b):
            return y @ sd[f"{b}{name}.weight"].T + sd[f"{b}{name}.bias"]

        y = F.layer_norm(x, (v.width,), sd[b + "attention_norm.weight"], sd[b + "attention_norm.bias"], 1e-5)
        q, k, val = (_heads(lin(f"attention.{w}", y), v.heads) for w in ("wq", "wk", "wv"))
        att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]), dim=-1) @ val
        x = x + lin("attention.wo", att.transpose(1, 2).reshape(x.shape))
        y = F.layer_norm(x, (v.width,), sd[b + "ffn_norm.weight"], sd[b + "ffn_norm.bias"], 1e-5)
        y = lin("feed_forward.w1", y)
        x = x + lin("feed_forward.w2", y * torch.sigmoid(1.702 * y))  # quick GELU
        states.append(x)
    feats = torch.cat([states[i][:, 1:] for i in v.feature_layers], dim=-1)  # [n, g*g, 2W]
    m = patch_mask.reshape(n, g * g, 1)
    feats = feats + (m == 0) * sd[V + "pad_embed"][0] + ((m > 0) & (m < 1)) * sd[V + "pad_embed"][1]
    tokens = []
    for r in range(0, g, 2):
        for col in range(0, g, 2):
            win = torch.stack([feats[:, (r + dr) * g + col + dc] for dr in (0, 1) for dc in (0, 1)], dim=1)

            def lin(name, y):
                return y @ sd[f"{V}image_pooling_2d.{name}.weight"].T + sd[f"{V}image_pooling_2d.{name}.bias"]

            q = lin("wq", win.mean(1, keepdim=True)).view(n, 1, c.pool_heads, -1).transpose(1, 2)
            k = lin("wk", win).view(n, 4, c.pool_heads, -1).transpose(1, 2)
            val = lin("wv", win).view(n, 4, c.pool_heads, -1).transpose(1, 2)
            att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(c.pool_head_dim), dim=-1) @ val
            tokens.append(lin("wo", att.transpose(1, 2).reshape(n, -1)))
    pooled = torch.stack(tokens, dim=1)
    w1, w2, w3 = (sd[f"{V}image_projector.{w}.weight"] for w in ("w1", "w2", "w3"))
    return (F.silu(pooled @ w1.T) * (pooled @ w3.T)) @ w2.T


def _rms(x, w, eps):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def _rope(x, theta):
    t, hd = x.shape[-2], x.shape[-1]
    inv = 1.0 / theta ** (torch.arange(0, hd, 2, dtype=torch.float32) / hd)
    ang = torch.arange(t, dtype=torch.float32)[:, None] * inv[None]
    cos, sin = torch.cat([ang, ang], -1).cos(), torch.cat([ang, ang], -1).sin()
    rot = torch.cat([-x[..., hd // 2 :], x[..., : hd // 2]], dim=-1)
    return x * cos + rot * sin


def reference_llm(sd, cfg, input_ids: list[int], image_tokens: torch.Tensor, patch_positions: list[int]):
    """One unpadded sequence -> logits [T, V]; experts evaluated one by one."""
    lm = cfg.llm
    table = torch.cat([sd[T + "wte.embedding"], sd[T + "wte.new_embedding"]])
    x = table[torch.tensor(input_ids)].clone()
    x[torch.tensor(patch_positions)] += image_tokens
    t, d = x.shape
    causal = torch.full((t, t), float("-inf")).triu(1)
    for i in range(lm.layers):
        b = f"{T}blocks.{i}."
        y = _rms(x, sd[b + "attn_norm.weight"], lm.rms_norm_eps)
        q, k, val = (y @ sd[b + "attn.att_proj.weight"].T).split(d, dim=-1)
        q, k = (
            _rms(q, sd[b + "attn.q_norm.weight"], lm.rms_norm_eps),
            _rms(k, sd[b + "attn.k_norm.weight"], lm.rms_norm_eps),
        )
        q, k, val = (z.view(t, lm.heads, -1).transpose(0, 1) for z in (q, k, val))
        q, k = _rope(q, lm.rope_theta), _rope(k, lm.rope_theta)
        att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]) + causal, dim=-1) @ val
        x = x + att.transpose(0, 1).reshape(t, d) @ sd[b + "attn.attn_out.weight"].T
        y = _rms(x, sd[b + "ff_norm.weight"], lm.rms_norm_eps)
        probs = torch.softmax(y @ sd[b + "mlp.gate.weight"].T, dim=-1)
        weights, index = probs.topk(lm.top_k, dim=-1)
        out = torch.zeros_like(y)
        for tok in range(t):
            for w, e in zip(weights[tok], index[tok], strict=True):
                pre = f"{b}mlp.experts.{int(e)}."
                hid = F.silu(y[tok] @ sd[pre + "gate_proj.weight"].T) * (y[tok] @ sd[pre + "up_proj.weight"].T)
                out[tok] += w * (hid @ sd[pre + "down_proj.weight"].T)
        x = x + out
    return _rms(x, sd[T + "ln_f.weight"], lm.rms_norm_eps) @ sd["lm_head.weight"].T
