"""What a controller observes about a request, computed the same way live and for replay caches.

- prompt: the mean input embedding of the question's tokens (known before any vision work).
- kv (per tier): the keys and values that layers 0-2 cached for the request's prompt during the
  prefix, which the two-stage flow runs once before stage 2 anyway, at a fixed number of positions:
  the global view's patch tokens and the last (up to) `N_TEXT` question tokens, which have attended
  to every crop. The stage-2 controller runs a budget token through the VLM's own layers 0-2
  against these cached entries, so nothing of the prompt is recomputed; `position` is the budget
  token's rotary position (the prompt length). A fixed-size subset keeps replay observations small.
- global_view: the mean of the global crop's projected vision tokens (single-stage controllers).
"""

from __future__ import annotations

import hashlib
import json
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from envs.atomic import atomic_path
from envs.vlm.presets import FIRST_KNOBBED_LAYER, TIERS
from envs.vlm.staged import KVCache

N_TEXT = 16
FORMAT = "prefix-kv-v3"  # part of the cache key: caches of another layout are rebuilt, never misread


def kv_shape(cfg) -> tuple[int, ...]:
    """[layers 0-2, key/value, heads, positions, head_dim] of one request's stage-2 observation."""
    lm = cfg.llm
    return (FIRST_KNOBBED_LAYER, 2, lm.heads, cfg.vision.tokens_per_side**2 + N_TEXT, lm.d_model // lm.heads)


@dataclass
class RequestFeatures:
    prompt: np.ndarray  # [d]
    kv: dict[str, np.ndarray]  # tier -> kv_shape
    kv_mask: dict[str, np.ndarray]  # tier -> [positions]
    position: dict[str, int]  # tier -> rotary position of the budget token (= prompt length)
    global_view: np.ndarray  # [d]
    crops: dict[str, int]  # tier -> views the VLM encodes (with `position`, the request's shapes)


def prompt_embedding(model, question: str) -> np.ndarray:
    """Mean input embedding of the prompt's tokens: what stage 1 knows before any vision work."""
    ids = torch.tensor(model.tokenizer.prompt_ids(question, model.cfg.always_start_with_space), device=model.device)
    with torch.no_grad():
        return model.llm.embed_tokens(ids).float().mean(0).cpu().numpy()


def _summary_positions(model, pre, t: int, i: int) -> tuple[list[int], list[int]]:
    """Request i's global-view patch positions and its question-token positions in a batch of length t."""
    per_crop = model.cfg.vision.tokens_per_side**2
    offset, end = t - len(pre.token_ids[i]), t - pre.answer_lengths[i]
    return [offset + p for p in pre.patch_positions[i][:per_crop]], list(range(end - pre.text_lengths[i], end))


def summarise(model, prepared, pre) -> tuple[np.ndarray, np.ndarray]:
    """From a prepared batch: prompt embedding [B, d] and global view [B, d]."""
    emb = prepared.embeds.float()
    b, t, d = emb.shape
    prompt, glob = np.zeros((b, d), np.float32), np.zeros((b, d), np.float32)
    for i in range(b):
        view, text = _summary_positions(model, pre, t, i)
        prompt[i] = emb[i, text].mean(0).cpu().numpy()
        glob[i] = emb[i, view].mean(0).cpu().numpy()
    return prompt, glob


def stage2_positions(model, pre, t: int, i: int) -> list[int]:
    """The prompt positions of request i (batch length t) whose keys/values stage 2 observes."""
    view, text = _summary_positions(model, pre, t, i)
    return view + text[-N_TEXT:]


def stage2_sees(model, pre, t: int) -> torch.Tensor:
    """[B, t] bool: the positions a budget token riding in the prefix pass attends to (`KnobVLM.prefix`),
    the same ones the replay observation holds, so served and replayed decisions agree."""
    sees = torch.zeros(len(pre.token_ids), t, dtype=torch.bool)
    for i in range(len(pre.token_ids)):
        sees[i, stage2_positions(model, pre, t, i)] = True
    return sees


def _layer_kv(state, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Cached keys and values [B, H, T, hd] of a prefix state, plain or fast path, over its T positions."""
    if isinstance(state.cache, KVCache):
        return state.cache.layers[layer]
    t, length = state.hidden.shape[1], state.bucket_key[1]
    return state.cache.keys[layer][:, :, length - t : length], state.cache.values[layer][:, :, length - t : length]


def prefix_kv(model, state, pre) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Stage-2 observation from a prefix state: kv [B, *kv_shape], mask [B, positions], position [B]."""
    shape = kv_shape(model.cfg)
    b, t = state.hidden.shape[:2]
    kv = np.zeros((b, *shape), np.float32)
    mask = np.zeros((b, shape[3]), np.float32)
    layers = [_layer_kv(state, i) for i in range(FIRST_KNOBBED_LAYER)]
    for i in range(b):
        view, text = _summary_positions(model, pre, t, i)
        text = text[-N_TEXT:]
        slots = list(range(len(view))) + list(range(shape[3] - len(text), shape[3]))
        positions = view + text
        for layer, (k, v) in enumerate(layers):
            kv[i, layer, 0][:, slots] = k[i][:, positions].float().cpu().numpy()
            kv[i, layer, 1][:, slots] = v[i][:, positions].float().cpu().numpy()
        mask[i, slots] = 1
    position = np.array([len(s) - n for s, n in zip(pre.token_ids, pre.answer_lengths, strict=True)], np.int64)
    return kv, mask, position


def request_features(model, image, question: str) -> RequestFeatures:
    """Features of one request at every tier (what a live environment computes)."""
    return batch_features(model, [image], [question])[0]


def batch_features(model, images: list, questions: list[str]) -> list[RequestFeatures]:
    out = [RequestFeatures(None, {}, {}, {}, None, {}) for _ in images]
    with torch.no_grad():
        for tier in TIERS:
            pre = model.preprocess(images, questions, tier)
            prepared = model.connect(pre, model.encode_vision(pre.pixels()))
            kv, mask, position = prefix_kv(model, model.prefix(prepared), pre)
            for i, f in enumerate(out):
                f.kv[tier], f.kv_mask[tier], f.position[tier] = kv[i], mask[i], int(position[i])
                f.crops[tier] = prepared.n_crops[i]
            if tier == TIERS[0]:  # prompt and global view are the same at every tier
                for f, prompt, glob in zip(out, *summarise(model, prepared, pre), strict=True):
                    f.prompt, f.global_view = prompt, glob
    return out


@dataclass
class FeatureCache:
    """Features of every sample of an outcome table, stacked for replay."""

    prompt: np.ndarray  # [n, d]
    kv: np.ndarray  # [n, tiers, *kv_shape]
    kv_mask: np.ndarray  # [n, tiers, positions]
    position: np.ndarray  # [n, tiers]
    global_view: np.ndarray  # [n, d]
    crops: np.ndarray  # [n, tiers]

    @classmethod
    def build(cls, model, samples: list, batch_size: int = 64, progress: bool = True) -> FeatureCache:
        feats: list[RequestFeatures] = []
        for i in tqdm(range(0, len(samples), batch_size), desc="features", disable=not progress, leave=False):
            chunk = samples[i : i + batch_size]
            feats += batch_features(model, [s.image for s in chunk], [s.question for s in chunk])
        return cls(
            np.stack([f.prompt for f in feats]),
            np.stack([[f.kv[t] for t in TIERS] for f in feats]),
            np.stack([[f.kv_mask[t] for t in TIERS] for f in feats]),
            np.array([[f.position[t] for t in TIERS] for f in feats], np.int64),
            np.stack([f.global_view for f in feats]),
            np.array([[f.crops[t] for t in TIERS] for f in feats], np.int64),
        )

    def save(self, path: Path) -> None:
        """Written atomically: a run killed mid-write leaves no cache (or the old one), never a torn one."""
        with atomic_path(path) as tmp:
            np.savez(tmp, prompt=self.prompt, kv=self.kv, kv_mask=self.kv_mask, position=self.position,
                     global_view=self.global_view, crops=self.crops)  # fmt: skip

    @classmethod
    def load(cls, path: Path) -> FeatureCache:
        """A cache file; a torn or foreign file is a CorruptCacheError naming it."""
        try:
            with np.load(path) as z:
                arrays = [np.asarray(z[k]) for k in ("prompt", "kv", "kv_mask", "position", "global_view", "crops")]
        except (zipfile.BadZipFile, EOFError, KeyError, ValueError, OSError) as e:
            raise CorruptCacheError(
                f"feature cache {path} is torn or not a feature cache ({type(e).__name__}: {e}); delete it "
                "and it is rebuilt"
            ) from None
        return cls(*arrays)


class CorruptCacheError(ValueError):
    """A cache file that cannot be read whole (a torn write, another program's file)."""


def cache_key(model, table_meta: dict) -> str:
    """Changes whenever the model weights or the table's dataset change. Hashes the weights' bytes, so
    the key does not depend on the number of threads (a float sum of each tensor would)."""
    h = hashlib.sha1(FORMAT.encode() + json.dumps(table_meta.get("dataset"), sort_keys=True).encode())
    for v in model.state_dict().values():
        h.update(v.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]
