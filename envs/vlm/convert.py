"""Map a MolmoE checkpoint in the Hugging Face remote-code key layout into `KnobVLM`.

Source keys (`model.transformer.*`, `model.vision_backbone.*`, `lm_head.weight`) are renamed,
split (fused q/k/v) or stacked (per-expert MLPs into `OlmoeExperts`' 3-D tensors). Every source
key must be consumed and every model tensor produced, or the conversion fails naming them.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from envs.vlm.checkpoint import _rebuild_buffers, check_state_dict, save_model
from envs.vlm.errors import CheckpointError
from envs.vlm.model import KnobVLM
from envs.vlm.presets import VLMConfig, get_preset
from envs.vlm.tokenizer import TextTokenizer

LLM, VIT = "model.transformer.", "model.vision_backbone."

# Spellings seen in Molmo checkpoints -> the canonical names used below.
ALIASES = [
    (re.compile(r"^(model\.transformer\.blocks\.\d+\.)(att_proj|attn_out|q_norm|k_norm)\."), r"\1attn.\2."),
    (re.compile(r"^(model\.transformer\.blocks\.\d+\.)ffn\."), r"\1mlp."),
    (re.compile(r"^model\.transformer\.ff_out\.weight$"), "lm_head.weight"),
]


def canonical(key: str) -> str:
    for pattern, repl in ALIASES:
        key = pattern.sub(repl, key)
    return key


class _Source:
    """Hands out source tensors by name and remembers which were used."""

    def __init__(self, state: dict[str, torch.Tensor]):
        self.state = {canonical(k): v for k, v in state.items()}
        self.used: set[str] = set()

    def __call__(self, key: str) -> torch.Tensor:
        if key not in self.state:
            raise CheckpointError(f"the checkpoint lacks {key}")
        self.used.add(key)
        return self.state[key]


def convert_molmo_state_dict(state: dict[str, torch.Tensor], cfg: VLMConfig) -> dict[str, torch.Tensor]:
    src = _Source(state)
    out: dict[str, torch.Tensor] = {}
    v, lm = cfg.vision, cfg.llm
    vit = VIT + "image_vit."

    # Vision: Molmo embeds patches with a Linear over (dy, dx, channel)-ordered pixels; CLIP uses a conv.
    w = src(vit + "patch_embedding.weight")
    out["vit.embeddings.patch_embedding.weight"] = w.reshape(v.width, v.patch_size, v.patch_size, 3).permute(0, 3, 1, 2)
    out["vit.embeddings.class_embedding"] = src(vit + "class_embedding")
    out["vit.embeddings.position_embedding.weight"] = src(vit + "positional_embedding")
    for p in ("weight", "bias"):
        out[f"vit.pre_layrnorm.{p}"] = src(f"{vit}pre_ln.{p}")
    for i in range(v.layers):
        s, d = f"{vit}transformer.resblocks.{i}.", f"vit.encoder.layers.{i}."
        names = {
            "attention.wq": "self_attn.q_proj",
            "attention.wk": "self_attn.k_proj",
            "attention.wv": "self_attn.v_proj",
            "attention.wo": "self_attn.out_proj",
            "feed_forward.w1": "mlp.fc1",
            "feed_forward.w2": "mlp.fc2",
            "attention_norm": "layer_norm1",
            "ffn_norm": "layer_norm2",
        }
        for a, b in names.items():
            for p in ("weight", "bias"):
                out[f"{d}{b}.{p}"] = src(f"{s}{a}.{p}")

    # Connector
    out["connector.pad_embed"] = src(VIT + "pad_embed")
    for n in ("wq", "wk", "wv", "wo"):
        for p in ("weight", "bias"):
            out[f"connector.pool.{n}.{p}"] = src(f"{VIT}image_pooling_2d.{n}.{p}")
    for n in ("w1", "w2", "w3"):
        out[f"connector.projector.{n}.weight"] = src(f"{VIT}image_projector.{n}.weight")

    # LLM: the text embedding and Molmo's extra embeddings (image markers) form one table.
    out["llm.embed_tokens.weight"] = torch.cat([src(LLM + "wte.embedding"), src(LLM + "wte.new_embedding")])
    out["llm.norm.weight"] = src(LLM + "ln_f.weight")
    out["lm_head.weight"] = src("lm_head.weight")
    for i in range(lm.layers):
        s, d = f"{LLM}blocks.{i}.", f"llm.layers.{i}."
        q, k, val = src(s + "attn.att_proj.weight").split(lm.d_model, dim=0)
        out[d + "self_attn.q_proj.weight"], out[d + "self_attn.k_proj.weight"] = q, k
        out[d + "self_attn.v_proj.weight"] = val
        out[d + "self_attn.o_proj.weight"] = src(s + "attn.attn_out.weight")
        out[d + "self_attn.q_norm.weight"] = src(s + "attn.q_norm.weight")
        out[d + "self_attn.k_norm.weight"] = src(s + "attn.k_norm.weight")
        out[d + "input_layernorm.weight"] = src(s + "attn_norm.weight")
        out[d + "post_attention_layernorm.weight"] = src(s + "ff_norm.weight")
        out[d + "mlp.gate.weight"] = src(s + "mlp.gate.weight")
        experts = [f"{s}mlp.experts.{e}." for e in range(lm.experts)]
        out[d + "mlp.experts.gate_up_proj"] = torch.stack(
            [torch.cat([src(e + "gate_proj.weight"), src(e + "up_proj.weight")]) for e in experts]
        )
        out[d + "mlp.experts.down_proj"] = torch.stack([src(e + "down_proj.weight") for e in experts])

    unused = sorted(set(src.state) - src.used)
    if unused:
        raise CheckpointError(f"{len(unused)} checkpoint tensors were not consumed, e.g. {unused[:3]}")
    return out


def read_checkpoint(path: str | Path) -> dict[str, torch.Tensor]:
    """All tensors of a local checkpoint directory (*.safetensors, else *.bin) or file."""
    from safetensors.torch import load_file

    path = Path(path)
    files = [path] if path.is_file() else sorted(path.glob("*.safetensors")) or sorted(path.glob("*.bin"))
    if not files:
        raise CheckpointError(f"no *.safetensors or *.bin weights in {path}")
    state: dict[str, torch.Tensor] = {}
    for f in files:
        part = load_file(str(f)) if f.suffix == ".safetensors" else torch.load(f, map_location="cpu", weights_only=True)
        state.update(part)
    return state


def convert_checkpoint(
    src: str | Path, out: str | Path, preset: str = "molmoe-1b", dtype: torch.dtype = torch.bfloat16
) -> Path:
    """Convert a local MolmoE checkpoint directory (weights + tokenizer.json) into a model directory."""
    cfg = get_preset(preset)
    tokenizer = TextTokenizer.load(Path(src) / "tokenizer.json")
    with torch.device("meta"):
        model = KnobVLM(cfg, tokenizer)
    state = convert_molmo_state_dict(read_checkpoint(src), cfg)
    check_state_dict(model, state, str(src))
    model.load_state_dict({k: t.to(dtype, copy=True) for k, t in state.items()}, assign=True)
    _rebuild_buffers(model)
    return save_model(model, out)
