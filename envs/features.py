"""What a controller observes about a request, computed the same way live and for replay caches.

- prompt: the mean input embedding of the question's tokens (known before any vision work).
- tokens (per tier): a fixed-size summary of the LLM input after the connector: 16 vision slots
  (the patch-token embeddings, image features included, averaged over crops position by position)
  and up to 16 question-token embeddings, with a mask. The stage-2 controller runs the VLM's own
  frozen layers 0-2 over these 32 tokens plus a budget token.
- global_view: the mean of the global crop's projected vision tokens (single-stage controllers).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from envs.vlm.presets import TIERS

N_TEXT = 16


@dataclass
class RequestFeatures:
    prompt: np.ndarray  # [d]
    tokens: dict[str, np.ndarray]  # tier -> [n_vision + N_TEXT, d]
    token_mask: dict[str, np.ndarray]  # tier -> [n_vision + N_TEXT]
    global_view: np.ndarray  # [d]


def prompt_embedding(model, question: str) -> np.ndarray:
    """Mean input embedding of the prompt's tokens: what stage 1 knows before any vision work."""
    ids = torch.tensor(model.tokenizer.prompt_ids(question), device=model.device)
    with torch.no_grad():
        return model.llm.embed_tokens(ids).float().mean(0).cpu().numpy()


def summarise(model, prepared, pre) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """From a prepared batch: prompt [B, d], tokens [B, T, d], mask [B, T], global view [B, d]."""
    emb = prepared.embeds.float()
    b, t, d = emb.shape
    per_crop = model.cfg.vision.tokens_per_side**2
    prompt = np.zeros((b, d), np.float32)
    tokens = np.zeros((b, per_crop + N_TEXT, d), np.float32)
    mask = np.zeros((b, per_crop + N_TEXT), np.float32)
    glob = np.zeros((b, d), np.float32)
    for i in range(b):
        offset = t - len(pre.token_ids[i])
        patches = emb[i, [offset + p for p in pre.patch_positions[i]]].view(-1, per_crop, d).cpu()
        end = t - pre.answer_lengths[i]
        text = emb[i, end - pre.text_lengths[i] : end].cpu()
        tokens[i, :per_crop] = patches.mean(0).numpy()
        keep = text[-N_TEXT:]
        tokens[i, per_crop + N_TEXT - len(keep) :] = keep.numpy()
        mask[i, :per_crop] = 1
        mask[i, per_crop + N_TEXT - len(keep) :] = 1
        prompt[i] = text.mean(0).numpy()
        glob[i] = patches[0].mean(0).numpy()
    return prompt, tokens, mask, glob


def request_features(model, image, question: str) -> RequestFeatures:
    """Features of one request at every tier (what a live environment computes)."""
    return batch_features(model, [image], [question])[0]


def batch_features(model, images: list, questions: list[str]) -> list[RequestFeatures]:
    out = [RequestFeatures(None, {}, {}, None) for _ in images]
    with torch.no_grad():
        for tier in TIERS:
            pre = model.preprocess(images, questions, tier)
            prepared = model.connect(pre, model.encode_vision(pre.pixels()))
            prompt, tokens, mask, glob = summarise(model, prepared, pre)
            for i, f in enumerate(out):
                f.tokens[tier], f.token_mask[tier] = tokens[i], mask[i]
                if tier == TIERS[0]:
                    f.prompt, f.global_view = prompt[i], glob[i]
    return out


@dataclass
class FeatureCache:
    """Features of every sample of an outcome table, stacked for replay."""

    prompt: np.ndarray  # [n, d]
    tokens: np.ndarray  # [n, 3, T, d]
    token_mask: np.ndarray  # [n, 3, T]
    global_view: np.ndarray  # [n, d]

    @classmethod
    def build(cls, model, samples: list, batch_size: int = 64, progress: bool = True) -> FeatureCache:
        feats: list[RequestFeatures] = []
        for i in tqdm(range(0, len(samples), batch_size), desc="features", disable=not progress, leave=False):
            chunk = samples[i : i + batch_size]
            feats += batch_features(model, [s.image for s in chunk], [s.question for s in chunk])
        return cls(
            np.stack([f.prompt for f in feats]),
            np.stack([[f.tokens[t] for t in TIERS] for f in feats]),
            np.stack([[f.token_mask[t] for t in TIERS] for f in feats]),
            np.stack([f.global_view for f in feats]),
        )

    def save(self, path: Path) -> None:
        np.savez_compressed(path, prompt=self.prompt, tokens=self.tokens, token_mask=self.token_mask,
                            global_view=self.global_view)  # fmt: skip

    @classmethod
    def load(cls, path: Path) -> FeatureCache:
        z = np.load(path)
        return cls(z["prompt"], z["tokens"], z["token_mask"], z["global_view"])


def cache_key(model, table_meta: dict) -> str:
    """Changes whenever the model weights or the table's dataset change."""
    h = hashlib.sha1(json.dumps(table_meta.get("dataset"), sort_keys=True).encode())
    for v in model.state_dict().values():
        h.update(v.detach().float().sum().numpy().tobytes())
    return h.hexdigest()[:16]
