"""A light global-view encoder for single-stage controllers, distilled from the VLM's own.

The VLM's encoder (ViT + connector on the global crop) costs a vision pass before the decision;
its features are reused when the chosen tier is low. The light encoder is a small CNN trained to
regress those features (MSE after the same LayerNorm the controller applies), so the controller
can decide sooner; its features are not reusable by the VLM, so every tier pays its cost.
"""

from __future__ import annotations

import time

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from envs.vlm.crops import make_crops


class LightEncoder(nn.Module):
    """A small CNN from the global crop's pixels [B, 3, S, S] to features of the VLM's width [B, d_model]."""

    def __init__(self, d_model: int, width: int = 32):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(3, width, 4, stride=4), nn.GELU(),
            nn.Conv2d(width, 2 * width, 2, stride=2), nn.GELU(),
            nn.Conv2d(2 * width, 2 * width, 2, stride=2), nn.GELU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2 * width, d_model),
        )  # fmt: skip

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.net(pixels)


def global_pixels(vlm, samples: list) -> np.ndarray:
    """The global crop of each sample, normalised as the VLM sees it: [n, 3, S, S]."""
    return np.stack([make_crops(s.image, 0, vlm.cfg.vision).pixels[0] for s in samples])


def distill(vlm, pixels: np.ndarray, targets: np.ndarray, epochs: int = 30, lr: float = 3e-3, seed: int = 0):
    """Fit a LightEncoder to the VLM's global-view features; returns it and the final relative error."""
    torch.manual_seed(seed)
    enc = LightEncoder(vlm.cfg.llm.d_model)
    norm = nn.LayerNorm(targets.shape[1], elementwise_affine=False)
    x, y = torch.as_tensor(pixels), norm(torch.as_tensor(targets))
    opt = torch.optim.Adam(enc.parameters(), lr=lr)
    rng = np.random.default_rng(seed)
    for _ in tqdm(range(epochs), desc="distil light encoder", leave=False):
        for idx in np.array_split(rng.permutation(len(x)), max(1, len(x) // 64)):
            loss = nn.functional.mse_loss(enc(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    with torch.no_grad():
        err = float(((enc(x) - y) ** 2).mean() / (y**2).mean())
    return enc.eval(), err


def encode(enc: LightEncoder, pixels: np.ndarray) -> np.ndarray:
    """Features of global crops (`global_pixels`), without gradients: [n, d_model]."""
    with torch.no_grad():
        return enc(torch.as_tensor(pixels)).numpy()


def overhead_ms(enc: LightEncoder, pixels: np.ndarray, repeats: int = 30) -> float:
    """Median time to encode one global crop (batch 1)."""
    x = torch.as_tensor(pixels[:1])
    times = []
    with torch.no_grad():
        for i in range(repeats + 3):
            t0 = time.perf_counter()
            enc(x)
            if i >= 3:
                times.append((time.perf_counter() - t0) * 1e3)
    return float(np.median(times))
