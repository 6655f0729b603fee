"""An independent, loop-based MolmoE forward over a state dict in the remote-code key layout.

Written from the Molmo architecture description with plain tensor ops (no transformers modules),
so the converter test compares two implementations, not one with itself.
"""

import math

import torch
import torch.nn.functional as F

V, T = "model.vision_backbone.", "model.transformer."


def molmo_key_shapes(cfg, extra_vocab: int = 128) -> dict[str, tuple[int, ...]]:
    """Every tensor of a MolmoE checkpoint in the Hugging Face remote-code layout, with its shape.

    Key names as that layout spells them: the LLM's layer norms sit under the attention and MLP
    modules (`blocks.N.attn.attn_norm`, `blocks.N.mlp.ff_norm`), experts one by one.
    """
    v, c, lm = cfg.vision, cfg.connector, cfg.llm
    sh = {}
    vit = V + "image_vit."
    sh[vit + "patch_embedding.weight"] = (v.width, v.patch_size**2 * 3)
    sh[vit + "class_embedding"] = (v.width,)
    sh[vit + "positional_embedding"] = (v.patches_per_side**2 + 1, v.width)
    sh[vit + "pre_ln.weight"] = sh[vit + "pre_ln.bias"] = (v.width,)
    for i in range(v.layers):
        b = f"{vit}transformer.resblocks.{i}."
        for n in ("wq", "wk", "wv", "wo"):
            sh[f"{b}attention.{n}.weight"], sh[f"{b}attention.{n}.bias"] = (v.width, v.width), (v.width,)
        sh[b + "feed_forward.w1.weight"], sh[b + "feed_forward.w1.bias"] = (v.mlp, v.width), (v.mlp,)
        sh[b + "feed_forward.w2.weight"], sh[b + "feed_forward.w2.bias"] = (v.width, v.mlp), (v.width,)
        for n in ("attention_norm", "ffn_norm"):
            sh[f"{b}{n}.weight"] = sh[f"{b}{n}.bias"] = (v.width,)
    sh[V + "pad_embed"] = (2, v.feature_width)
    inner = c.pool_heads * c.pool_head_dim
    for n in ("wq", "wk", "wv"):
        sh[f"{V}image_pooling_2d.{n}.weight"], sh[f"{V}image_pooling_2d.{n}.bias"] = (inner, v.feature_width), (inner,)
    sh[V + "image_pooling_2d.wo.weight"], sh[V + "image_pooling_2d.wo.bias"] = (inner, inner), (inner,)
    sh[V + "image_projector.w1.weight"] = sh[V + "image_projector.w3.weight"] = (c.projector_hidden, inner)
    sh[V + "image_projector.w2.weight"] = (lm.d_model, c.projector_hidden)
    d, e, h = lm.d_model, lm.experts, lm.expert_hidden
    sh[T + "wte.embedding"] = (lm.vocab_size - extra_vocab, d)
    sh[T + "wte.new_embedding"] = (extra_vocab, d)
    sh[T + "ln_f.weight"] = (d,)
    sh["lm_head.weight"] = (lm.output_vocab_size, d)
    for i in range(lm.layers):
        b = f"{T}blocks.{i}."
        sh[b + "attn.att_proj.weight"], sh[b + "attn.attn_out.weight"] = (3 * d, d), (d, d)
        for n in ("attn.q_norm", "attn.k_norm", "attn.attn_norm", "mlp.ff_norm"):
            sh[f"{b}{n}.weight"] = (d,)
        sh[b + "mlp.gate.weight"] = (e, d)
        for x in range(e):
            sh[f"{b}mlp.experts.{x}.gate_proj.weight"] = sh[f"{b}mlp.experts.{x}.up_proj.weight"] = (h, d)
            sh[f"{b}mlp.experts.{x}.down_proj.weight"] = (d, h)
    return sh


def synthetic_molmo_state_dict(cfg, extra_vocab: int = 128, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights for `molmo_key_shapes`: norms near 1, matrices scaled by 1/sqrt(fan-in) so image
    tokens reach the LLM at the size of text embeddings (the answers then depend on the image)."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for key, shape in molmo_key_shapes(cfg, extra_vocab).items():
        noise = torch.randn(*shape, generator=g)
        if ("norm" in key or "pre_ln" in key) and key.endswith("weight"):
            sd[key] = 1 + 0.1 * noise
        elif key.startswith(T + "wte"):
            sd[key] = noise
        elif key.endswith(("pad_embed", "mlp.gate.weight", "class_embedding", "positional_embedding")):
            sd[key] = 0.5 * noise
        elif len(shape) == 2:
            sd[key] = noise / shape[1] ** 0.5
        else:
            sd[key] = 0.1 * noise
    return sd


def to_megablocks(sd, cfg) -> dict[str, torch.Tensor]:
    """The same weights in megablocks' training layout: `ffn.router.layer.weight`, and experts fused
    along rows into `ffn.experts.mlp.w1` (gate), `v1` (up) and `w2` (down, stored as [E*h, d])."""
    out = {k: t for k, t in sd.items() if ".mlp.experts." not in k and not k.endswith("mlp.gate.weight")}
    for i in range(cfg.llm.layers):
        b = f"{T}blocks.{i}."
        out[b + "ffn.router.layer.weight"] = sd[b + "mlp.gate.weight"]
        ex = [f"{b}mlp.experts.{x}." for x in range(cfg.llm.experts)]
        out[b + "ffn.experts.mlp.w1"] = torch.cat([sd[x + "gate_proj.weight"] for x in ex])
        out[b + "ffn.experts.mlp.v1"] = torch.cat([sd[x + "up_proj.weight"] for x in ex])
        out[b + "ffn.experts.mlp.w2"] = torch.cat([sd[x + "down_proj.weight"].T for x in ex])
    return out


def molmo_config_json(cfg, max_crops: int = 12) -> dict:
    """Molmo's config.json fields for the shapes of `cfg`."""
    v, c, lm = cfg.vision, cfg.connector, cfg.llm
    return {
        "model_type": "molmo",
        "d_model": lm.d_model,
        "n_layers": lm.layers,
        "n_heads": lm.heads,
        "n_kv_heads": None,
        "moe_num_experts": lm.experts,
        "moe_top_k": lm.top_k,
        "mlp_ratio": 1,
        "mlp_hidden_size": 2 * lm.expert_hidden,
        "embedding_size": lm.output_vocab_size,
        "additional_vocab_size": lm.vocab_size - lm.output_vocab_size,
        "vocab_size": lm.output_vocab_size - 24,
        "layer_norm_type": "rms",
        "layer_norm_eps": lm.rms_norm_eps,
        "rope_theta": lm.rope_theta,
        "max_sequence_length": lm.max_positions,
        "attention_layer_norm": True,
        "block_type": "moe",
        "weight_tying": False,
        "max_crops": max_crops,
        "overlap_margins": [v.overlap_margin, v.overlap_margin],
        "always_start_with_space": True,
        "image_padding_embed": "pad_and_partial_pad",
        "image_pooling_2d": "attention-meanq",
        "use_col_tokens": True,
        "vit_layers": list(v.feature_layers),
        "vision_backbone": {
            "image_default_input_size": [v.crop_size, v.crop_size],
            "image_patch_size": v.patch_size,
            "image_emb_dim": v.width,
            "image_num_layers": v.layers,
            "image_num_heads": c.pool_heads,
            "image_head_dim": c.pool_head_dim,
            "image_mlp_dim": v.mlp,
            "image_norm_eps": 1e-5,
        },
    }


# ---------------------------------------------------------------- Molmo's preprocessing, from its description


def molmo_layout(tiling, side: int, margin_patches: int, ids):
    """Molmo's image tokens: the global view as one side x side block, then every tile's pooled grid
    placed at its offset in the whole image (tiles step by side - margin pooled tokens) with each
    tile's overlap trimmed - a tile owns its margin only on the image's outer edges. Returns
    (token ids, patch-token positions, (view, row, col) each patch token carries)."""
    rows, cols = tiling
    step, half = side - margin_patches, margin_patches // 2
    owner = {}
    for i in range(rows):
        for j in range(cols):
            for r in range(side):
                for c in range(side):
                    inner_r = (r >= half or i == 0) and (r < side - half or i == rows - 1)
                    inner_c = (c >= half or j == 0) and (c < side - half or j == cols - 1)
                    if inner_r and inner_c:
                        cell = (i * step + r, j * step + c)
                        assert cell not in owner, "two tiles claim one stitched cell"
                        owner[cell] = (1 + i * cols + j, r, c)
    h, w = max(y for y, _ in owner) + 1, max(x for _, x in owner) + 1
    assert len(owner) == h * w, "the stitched block has holes"
    tokens, positions, carried = [], [], []
    for grid in ([[(0, r, c) for c in range(side)] for r in range(side)],
                 [[owner[(y, x)] for x in range(w)] for y in range(h)]):  # fmt: skip
        tokens.append(ids["im_start"])
        for row in grid:
            for cell in row:
                positions.append(len(tokens))
                carried.append(cell)
                tokens.append(ids["im_patch"])
            tokens.append(ids["im_col"])
        tokens.append(ids["im_end"])
    return tokens, positions, carried


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
    # Molmo: 0 is all padding; any other value below 1 (fractions, the -1 rows) is partial padding
    feats = feats + (m == 0) * sd[V + "pad_embed"][0] + ((m < 1) & (m != 0)) * sd[V + "pad_embed"][1]
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
        y = _rms(x, sd[b + "attn.attn_norm.weight"], lm.rms_norm_eps)
        q, k, val = (y @ sd[b + "attn.att_proj.weight"].T).split(d, dim=-1)
        q, k = (
            _rms(q, sd[b + "attn.q_norm.weight"], lm.rms_norm_eps),
            _rms(k, sd[b + "attn.k_norm.weight"], lm.rms_norm_eps),
        )
        q, k, val = (z.view(t, lm.heads, -1).transpose(0, 1) for z in (q, k, val))
        q, k = _rope(q, lm.rope_theta), _rope(k, lm.rope_theta)
        att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]) + causal, dim=-1) @ val
        x = x + att.transpose(0, 1).reshape(t, d) @ sd[b + "attn.attn_out.weight"].T
        y = _rms(x, sd[b + "mlp.ff_norm.weight"], lm.rms_norm_eps)
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
