"""Guided attention: a training loss on where the answer position looks.

Why: stage 15 names the colour of a small shape at 0.92 (high tier) yet rejects only a third of the
presence scenes whose small star has another colour than the one asked (`reports/errors_stage15_seed9.md`):
the vision tokens carry shape and colour, but the answer position does not read the asked object's.
More presence questions and minimal image pairs did not change that. Here one attention head of
the answer position (by default at layer 2, which every config runs) is told which vision tokens show the objects the
question is about (`synthvqa.asked_objects`), or, where the scene has none, the first token (a null
target): the loss is -log of the attention mass there, as supervised-attention VQA models train
attention maps toward where people looked. For presence the target is the small object of the
asked colour *and* shape: a head whose score adds a colour match to a shape match can put its mass
on a token that matches both and on the null token otherwise, so what it reads is the answer.

`answer_attention` recomputes that head's softmax from the layer's input with the layer's own
weights (norm, q/k projections and norms, rotary), so the loss sees the probabilities `run_layer`
used, and nothing in the served forward changes. Measured (README, runs 18 and 19): the head learns
to look at the named objects (0.8-1.0 of its mass for colour, glyph, count and sum), but for presence
it trades finding the object for rejecting its look-alikes, and presence accuracy stayed where it was.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from envs.tasks.dense_labels import object_token_mask
from envs.tasks.synthvqa import asked_objects
from envs.vlm.model import Prepared, Preprocessed
from envs.vlm.staged import rotate_half


def answer_positions(targets: torch.Tensor) -> torch.Tensor:
    """Index [B] of the position that predicts each row's first answer token (targets: [B, T], -100 off answers)."""
    predicts = targets[:, 1:] != -100  # position t predicts token t + 1
    if not predicts.any(dim=1).all():
        raise ValueError("every row needs a teacher-forced answer")
    return predicts.int().argmax(dim=1)


def answer_attention(layer: nn.Module, h_in: torch.Tensor, position_embeddings, valid, query: torch.Tensor):
    """Attention probabilities [B, heads, T] of position `query[b]` of each row in `layer` (an
    `OlmoeDecoderLayer`) given its input `h_in` [B, T, d]: `OlmoeAttention`'s arithmetic for one query."""
    attn = layer.self_attn
    b, t, _ = h_in.shape
    rows = torch.arange(b, device=h_in.device)
    x = layer.input_layernorm(h_in)
    q, k = attn.q_norm(attn.q_proj(x[rows, query])), attn.k_norm(attn.k_proj(x))
    if attn.config.clip_qkv is not None:
        q, k = (
            q.clamp(-attn.config.clip_qkv, attn.config.clip_qkv),
            k.clamp(-attn.config.clip_qkv, attn.config.clip_qkv),
        )
    q = q.view(b, -1, attn.head_dim)  # [B, H, hd]
    k = k.view(b, t, -1, attn.head_dim).transpose(1, 2)  # [B, H, T, hd]
    cos, sin = position_embeddings  # [B, T, hd]
    q = q * cos[rows, query][:, None] + rotate_half(q) * sin[rows, query][:, None]
    k = k * cos[:, None] + rotate_half(k) * sin[:, None]
    scores = torch.einsum("bhd,bhtd->bht", q, k).float() * attn.scaling
    seen = valid & (torch.arange(t, device=h_in.device)[None] <= query[:, None])
    return torch.softmax(scores.masked_fill(~seen[:, None], float("-inf")), dim=-1)


def guide_masks(samples: list, crops: list, tokens_per_side: int) -> list[np.ndarray | None]:
    """Per sample, a bool mask over its vision tokens (connector order) of its asked objects; all False
    where the scene has none (look at the null token); None where they are too small for these crops
    (nothing to say: the answer cannot be read at this tier)."""
    out = []
    for sample, c in zip(samples, crops, strict=True):
        objects = asked_objects(sample)
        mask = object_token_mask(objects, c, tokens_per_side)
        out.append(mask if mask.any() or not objects else None)
    return out


def target_positions(pre: Preprocessed, token_masks: list[np.ndarray | None], length: int) -> torch.Tensor:
    """Bool [B, length]: the sequence positions (left-padded to `length`) of the vision tokens each row's
    mask marks (connector order = `pre.patch_positions` order); the first token for an all-False mask;
    nothing for None."""
    out = torch.zeros(len(pre.token_ids), length, dtype=torch.bool)
    for i, (seq, patches, mask) in enumerate(zip(pre.token_ids, pre.patch_positions, token_masks, strict=True)):
        if mask is None:
            continue
        if len(mask) != len(patches):
            raise ValueError(f"row {i}: a mask over {len(mask)} vision tokens for {len(patches)} patch positions")
        offset = length - len(seq)
        if mask.any():
            out[i, np.asarray(patches, dtype=np.int64)[mask] + offset] = True
        else:
            out[i, offset] = True  # <bos>: the null target
    return out


class AttentionGuide:
    """An `on_layer` hook: -log of the attention mass that `head` of the answer position puts on the
    asked objects' vision tokens (or the null token, see `guide_masks`), averaged over the rows with
    a target and over the `layers` run. Rows whose objects are too small for the tier add nothing.
    """

    def __init__(self, model, pre: Preprocessed, prepared: Prepared, token_masks, layers: tuple[int, ...], head: int):
        if not 0 <= head < model.cfg.llm.heads:
            raise ValueError(f"head must lie in 0..{model.cfg.llm.heads - 1}, got {head}")
        self.model, self.layers, self.head, self.valid = model, set(layers), head, prepared.valid
        self.query = answer_positions(prepared.targets)
        targets = target_positions(pre, token_masks, prepared.valid.shape[1]).to(prepared.valid.device)
        self.rows = targets.any(dim=1)
        self.targets = targets[self.rows]
        positions = model._positions(prepared.valid)
        self.position_embeddings = model.llm.rotary_emb(prepared.embeds, positions)
        self.terms, self.row_masses = [], []  # per guided layer run: loss, mass of each row with a target

    def __call__(self, layer: int, h_in: torch.Tensor, h_out: torch.Tensor) -> None:
        if layer not in self.layers or not self.rows.any():
            return
        probs = answer_attention(self.model.llm.layers[layer], h_in, self.position_embeddings, self.valid, self.query)
        mass = (probs[self.rows, self.head] * self.targets).sum(-1)
        self.terms.append(-torch.log(mass.clamp_min(1e-6)).mean())
        self.row_masses.append(mass.detach())

    def value(self) -> torch.Tensor:
        return torch.stack(self.terms).mean() if self.terms else torch.zeros((), device=self.valid.device)

    @property
    def mass(self) -> float:
        """Mean attention mass on the targets at the guided layers (what the loss pushes toward 1)."""
        return float(torch.stack(self.row_masses).mean()) if self.row_masses else float("nan")
