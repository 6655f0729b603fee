"""Map a MolmoE checkpoint (Hugging Face remote-code layout, or megablocks' fused experts) into `KnobVLM`.

The model config is built from the checkpoint's own `config.json` (Molmo's field names), so a
checkpoint of any shapes converts. Source keys (`model.transformer.*`, `model.vision_backbone.*`,
`lm_head.weight`) are renamed, split (fused q/k/v) or stacked (per-expert MLPs into `OlmoeExperts`'
3-D tensors). Every source tensor is checked against the shape config.json implies, every source key
must be consumed and every model tensor produced, or the conversion fails naming them.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from envs.vlm.checkpoint import _rebuild_buffers, check_state_dict, save_model
from envs.vlm.errors import CheckpointError
from envs.vlm.model import KnobVLM
from envs.vlm.presets import (
    FIRST_KNOBBED_LAYER,
    MOLMO_MAX_CROPS,
    TIERS,
    ConnectorConfig,
    KnobValues,
    LLMConfig,
    VisionConfig,
    VLMConfig,
    get_preset,
)
from envs.vlm.tokenizer import TextTokenizer

LLM, VIT = "model.transformer.", "model.vision_backbone."
INDEX = "model.safetensors.index.json"

# Spellings seen in Molmo / OLMo checkpoints -> the canonical (remote-code) names used below.
ALIASES = [
    (re.compile(r"^(model\.transformer\.blocks\.\d+\.)(att_proj|attn_out|q_norm|k_norm|attn_norm)\."), r"\1attn.\2."),
    (re.compile(r"^(model\.transformer\.blocks\.\d+\.)ffn\."), r"\1mlp."),
    (re.compile(r"^(model\.transformer\.blocks\.\d+\.)ff_norm\."), r"\1mlp.ff_norm."),
    (re.compile(r"^model\.transformer\.ff_out\.weight$"), "lm_head.weight"),
]

# config.json settings this model reproduces; any other value is refused rather than converted wrongly.
REQUIRED = {
    "layer_norm_type": "rms",
    "attention_layer_norm": True,
    "block_type": "moe",
    "weight_tying": False,
    "image_padding_embed": "pad_and_partial_pad",
    "image_pooling_2d": "attention-meanq",
    "image_projector": "mlp",
    "use_col_tokens": True,
    "crop_mode": "overlap-and-resize-c2",
    "activation_type": "swiglu",
    "qkv_bias": False,
    "clip_qkv": None,
    "image_pooling_h": 2,
    "image_pooling_w": 2,
}


def canonical(key: str) -> str:
    for pattern, repl in ALIASES:
        key = pattern.sub(repl, key)
    return key


def _knob_values(top_k: int, layers: int, max_crops: dict[str, int]) -> KnobValues:
    """Five router top-k values up to the trained k, five block counts up to every knobbed layer."""
    n = layers - FIRST_KNOBBED_LAYER
    ks = sorted({max(1, round(top_k * f)) for f in (1 / 8, 1 / 4, 1 / 2, 3 / 4, 1)})
    return KnobValues(dict(max_crops), tuple(ks), tuple(sorted({n - 2 * i for i in range(5) if n - 2 * i >= 0})))


def config_from_molmo(
    molmo: dict, name: str = "molmoe", max_crops: dict[str, int] | None = None, source: str = "config.json"
) -> VLMConfig:
    """A `VLMConfig` from Molmo's config.json fields; tiers are max-crops values (default low 2 /
    medium 6 / high 12), each within the checkpoint's `max_crops`."""
    for key, want in REQUIRED.items():
        if key in molmo and molmo[key] != want:
            raise CheckpointError(f"{source}: {key}={molmo[key]!r} is not supported (this model needs {want!r})")
    try:
        vb = molmo.get("vision_backbone", {})
        d = int(molmo["d_model"])
        hidden = molmo.get("mlp_hidden_size") or int(molmo.get("mlp_ratio", 1) * d)
        margins = list(molmo.get("overlap_margins", [4, 4]))
        size = list(vb.get("image_default_input_size", [336, 336]))
        eps = float(vb.get("image_norm_eps", 1e-5))
        n_kv = molmo.get("n_kv_heads")
        if margins[0] != margins[1] or size[0] != size[1] or eps != 1e-5 or n_kv not in (None, molmo["n_heads"]):
            raise CheckpointError(
                f"{source}: unsupported shape options (overlap_margins={margins}, image_default_input_size={size}, "
                f"image_norm_eps={eps}, n_kv_heads={n_kv}); this model needs equal margins, square crops, "
                "eps 1e-5 and as many key/value heads as heads"
            )
        embedding = int(molmo.get("embedding_size") or molmo["vocab_size"])
        vision = VisionConfig(
            crop_size=int(size[0]),
            patch_size=int(vb.get("image_patch_size", 14)),
            width=int(vb.get("image_emb_dim", 1024)),
            layers=int(vb.get("image_num_layers", 23)),
            heads=int(vb.get("image_num_heads", 16)),
            mlp=int(vb.get("image_mlp_dim", 4096)),
            feature_layers=tuple(int(i) for i in molmo.get("vit_layers", (-2, -9))),
            overlap_margin=int(margins[0]),
            layout="molmo",
        )
        connector = ConnectorConfig(
            pool_heads=int(vb.get("image_num_heads", 16)),
            pool_head_dim=int(vb.get("image_head_dim", 64)),
            projector_hidden=hidden // 2,
        )
        llm = LLMConfig(
            vocab_size=embedding + int(molmo.get("additional_vocab_size", 128)),
            output_vocab_size=embedding,
            d_model=d,
            layers=int(molmo["n_layers"]),
            heads=int(molmo["n_heads"]),
            experts=int(molmo["moe_num_experts"]),
            top_k=int(molmo["moe_top_k"]),
            expert_hidden=hidden // 2,
            rms_norm_eps=float(molmo.get("layer_norm_eps", 1e-5)),
            rope_theta=float(molmo.get("rope_theta", 10000.0)),
            max_positions=int(molmo.get("max_sequence_length", 4096)),
        )
        ceiling = int(molmo.get("max_crops", 12))
    except KeyError as e:
        raise CheckpointError(f"{source} lacks the field {e.args[0]!r}") from None
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{source} has a malformed field: {e}") from None
    tiers = dict(max_crops or MOLMO_MAX_CROPS)
    if set(tiers) != set(TIERS) or not all(1 <= int(n) <= ceiling for n in tiers.values()):
        raise CheckpointError(f"tiers must give each of {TIERS} a max-crops value in 1..{ceiling}, got {tiers}")
    cfg = VLMConfig(
        name,
        vision,
        connector,
        llm,
        _knob_values(llm.top_k, llm.layers, {t: int(tiers[t]) for t in TIERS}),
        always_start_with_space=bool(molmo.get("always_start_with_space", False)),
    )
    try:
        cfg.validate()
    except ValueError as e:
        raise CheckpointError(f"{source}: {e}") from None
    return cfg


class _Source:
    """Hands out source tensors by name, checks their shapes, and remembers which were used."""

    def __init__(self, state: dict[str, torch.Tensor]):
        self.state = {canonical(k): v for k, v in state.items()}
        self.original = {canonical(k): k for k in state}
        self.used: set[str] = set()

    def has(self, key: str) -> bool:
        return key in self.state

    def __call__(self, key: str, shape: tuple[int, ...]) -> torch.Tensor:
        if key not in self.state:
            raise CheckpointError(f"the checkpoint lacks {key}")
        t = self.state[key]
        if tuple(t.shape) != tuple(shape):
            raise CheckpointError(
                f"{self.original[key]} has shape {tuple(t.shape)}, but config.json's sizes need {tuple(shape)}"
            )
        self.used.add(key)
        return t


def convert_molmo_state_dict(state: dict[str, torch.Tensor], cfg: VLMConfig) -> dict[str, torch.Tensor]:
    """Source tensors (any device, `meta` included) -> `KnobVLM` state dict."""
    src = _Source(state)
    out: dict[str, torch.Tensor] = {}
    v, c, lm = cfg.vision, cfg.connector, cfg.llm
    vit, w, fw = VIT + "image_vit.", v.width, v.feature_width
    inner, hid = c.pool_heads * c.pool_head_dim, c.projector_hidden

    # Vision: Molmo embeds patches with a Linear over (dy, dx, channel)-ordered pixels; CLIP uses a conv.
    pe = src(vit + "patch_embedding.weight", (w, v.patch_size**2 * 3))
    out["vit.embeddings.patch_embedding.weight"] = pe.reshape(w, v.patch_size, v.patch_size, 3).permute(0, 3, 1, 2)
    out["vit.embeddings.class_embedding"] = src(vit + "class_embedding", (w,))
    out["vit.embeddings.position_embedding.weight"] = src(vit + "positional_embedding", (v.patches_per_side**2 + 1, w))
    for p in ("weight", "bias"):
        out[f"vit.pre_layrnorm.{p}"] = src(f"{vit}pre_ln.{p}", (w,))
    names = {
        "attention.wq": ("self_attn.q_proj", (w, w)),
        "attention.wk": ("self_attn.k_proj", (w, w)),
        "attention.wv": ("self_attn.v_proj", (w, w)),
        "attention.wo": ("self_attn.out_proj", (w, w)),
        "feed_forward.w1": ("mlp.fc1", (v.mlp, w)),
        "feed_forward.w2": ("mlp.fc2", (w, v.mlp)),
        "attention_norm": ("layer_norm1", (w,)),
        "ffn_norm": ("layer_norm2", (w,)),
    }
    for i in range(v.layers):
        s, d = f"{vit}transformer.resblocks.{i}.", f"vit.encoder.layers.{i}."
        for a, (b, shape) in names.items():
            out[f"{d}{b}.weight"] = src(f"{s}{a}.weight", shape)
            out[f"{d}{b}.bias"] = src(f"{s}{a}.bias", shape[:1])

    # Connector
    out["connector.pad_embed"] = src(VIT + "pad_embed", (2, fw))
    for n, shape in (("wq", (inner, fw)), ("wk", (inner, fw)), ("wv", (inner, fw)), ("wo", (inner, inner))):
        out[f"connector.pool.{n}.weight"] = src(f"{VIT}image_pooling_2d.{n}.weight", shape)
        out[f"connector.pool.{n}.bias"] = src(f"{VIT}image_pooling_2d.{n}.bias", (inner,))
    for n, shape in (("w1", (hid, inner)), ("w3", (hid, inner)), ("w2", (lm.d_model, hid))):
        out[f"connector.projector.{n}.weight"] = src(f"{VIT}image_projector.{n}.weight", shape)

    # LLM: the text embedding and Molmo's extra embeddings (image markers) form one table.
    dm, e, h = lm.d_model, lm.experts, lm.expert_hidden
    new = LLM + "wte.new_embedding"
    extra = src.state[new].shape[0] if src.has(new) else lm.vocab_size - lm.output_vocab_size
    out["llm.embed_tokens.weight"] = torch.cat(
        [src(LLM + "wte.embedding", (lm.vocab_size - extra, dm)), src(new, (extra, dm))]
    )
    out["llm.norm.weight"] = src(LLM + "ln_f.weight", (dm,))
    out["lm_head.weight"] = src("lm_head.weight", (lm.output_vocab_size, dm))
    for i in range(lm.layers):
        s, d = f"{LLM}blocks.{i}.", f"llm.layers.{i}."
        q, k, val = src(s + "attn.att_proj.weight", (3 * dm, dm)).split(dm, dim=0)
        out[d + "self_attn.q_proj.weight"], out[d + "self_attn.k_proj.weight"] = q, k
        out[d + "self_attn.v_proj.weight"] = val
        out[d + "self_attn.o_proj.weight"] = src(s + "attn.attn_out.weight", (dm, dm))
        out[d + "self_attn.q_norm.weight"] = src(s + "attn.q_norm.weight", (dm,))
        out[d + "self_attn.k_norm.weight"] = src(s + "attn.k_norm.weight", (dm,))
        out[d + "input_layernorm.weight"] = src(s + "attn.attn_norm.weight", (dm,))
        out[d + "post_attention_layernorm.weight"] = src(s + "mlp.ff_norm.weight", (dm,))
        if src.has(s + "mlp.router.layer.weight") or src.has(s + "mlp.experts.mlp.w1"):
            # megablocks: one router Linear; experts fused along rows, w2 stored transposed ([E*h, d]).
            out[d + "mlp.gate.weight"] = src(s + "mlp.router.layer.weight", (e, dm))
            w1, v1, w2 = (src(f"{s}mlp.experts.mlp.{n}", (e * h, dm)) for n in ("w1", "v1", "w2"))
            out[d + "mlp.experts.gate_up_proj"] = torch.cat([w1.view(e, h, dm), v1.view(e, h, dm)], dim=1)
            out[d + "mlp.experts.down_proj"] = w2.view(e, h, dm).transpose(1, 2)
        else:
            out[d + "mlp.gate.weight"] = src(s + "mlp.gate.weight", (e, dm))
            experts = [f"{s}mlp.experts.{x}." for x in range(e)]
            out[d + "mlp.experts.gate_up_proj"] = torch.stack(
                [torch.cat([src(x + "gate_proj.weight", (h, dm)), src(x + "up_proj.weight", (h, dm))]) for x in experts]
            )
            out[d + "mlp.experts.down_proj"] = torch.stack([src(x + "down_proj.weight", (dm, h)) for x in experts])

    unused = sorted(src.original[k] for k in set(src.state) - src.used)
    if unused:
        raise CheckpointError(
            f"{len(unused)} checkpoint tensors were not consumed (a key of unknown layout, or more layers/experts "
            f"than config.json gives): {unused[:5]}"
        )
    return out


def read_checkpoint(path: str | Path) -> dict[str, torch.Tensor]:
    """All tensors of a local checkpoint: shards listed in model.safetensors.index.json, else every
    *.safetensors (else *.bin) file of the directory, or one file."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = Path(path)
    if path.is_dir() and (path / INDEX).is_file():
        try:
            weight_map = json.loads((path / INDEX).read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{path / INDEX} is not a valid shard index: {e!r}") from None
        state: dict[str, torch.Tensor] = {}
        for shard in sorted(set(weight_map.values())):
            if not (path / shard).is_file():
                raise CheckpointError(f"{path / INDEX} lists the shard {shard}, which is missing from {path}")
            with safe_open(str(path / shard), framework="pt") as f:
                keys = set(f.keys())
                for key in sorted(k for k, s in weight_map.items() if s == shard):
                    if key not in keys:
                        raise CheckpointError(f"{path / INDEX} places {key} in {shard}, which lacks it")
                    state[key] = f.get_tensor(key)
        return state
    files = [path] if path.is_file() else sorted(path.glob("*.safetensors")) or sorted(path.glob("*.bin"))
    if not files:
        raise CheckpointError(f"no *.safetensors or *.bin weights in {path}")
    state = {}
    for f in files:
        part = load_file(str(f)) if f.suffix == ".safetensors" else torch.load(f, map_location="cpu", weights_only=True)
        state.update(part)
    return state


def convert_checkpoint(
    src: str | Path,
    out: str | Path,
    preset: str | None = None,
    dtype: torch.dtype = torch.bfloat16,
    max_crops: dict[str, int] | None = None,
) -> Path:
    """Convert a local MolmoE checkpoint directory (weights, config.json, tokenizer.json) into a model
    directory. `preset` takes the shapes from a preset instead (a checkpoint without config.json)."""
    src = Path(src)
    tokenizer = TextTokenizer.load(src / "tokenizer.json")
    if preset is not None:
        cfg = get_preset(preset)
    elif (src / "config.json").is_file():
        try:
            molmo = json.loads((src / "config.json").read_text())
        except json.JSONDecodeError as e:
            raise CheckpointError(f"{src / 'config.json'} is not valid JSON: {e}") from None
        cfg = config_from_molmo(molmo, Path(out).name or "molmoe", max_crops, str(src / "config.json"))
    else:
        raise CheckpointError(f"{src} has no config.json (give a preset for a checkpoint without one)")
    with torch.device("meta"):
        model = KnobVLM(cfg, tokenizer)
    state = convert_molmo_state_dict(read_checkpoint(src), cfg)
    check_state_dict(model, state, str(src))
    # no forced copies: a 7B checkpoint's source and converted tensors share memory where they can
    model.load_state_dict({k: t.to(dtype) for k, t in state.items()}, assign=True)
    _rebuild_buffers(model)
    return save_model(model, out)
