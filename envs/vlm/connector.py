"""Molmo's connector: pad embeddings, 2x2 attention pooling, SwiGLU projector into the LLM width."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from envs.vlm.presets import VLMConfig


class AttentionPool2x2(nn.Module):
    """Pools each 2x2 window of patch features with attention; the window mean is the query."""

    def __init__(self, in_dim: int, heads: int, head_dim: int):
        super().__init__()
        self.heads, self.head_dim = heads, head_dim
        self.wq = nn.Linear(in_dim, heads * head_dim)
        self.wk = nn.Linear(in_dim, heads * head_dim)
        self.wv = nn.Linear(in_dim, heads * head_dim)
        self.wo = nn.Linear(heads * head_dim, heads * head_dim)

    def forward(self, windows: torch.Tensor) -> torch.Tensor:
        """windows [n, 4, C] -> [n, heads*head_dim]"""
        n = windows.shape[0]
        q = self.wq(windows.mean(dim=1, keepdim=True)).view(n, 1, self.heads, self.head_dim).transpose(1, 2)
        k = self.wk(windows).view(n, 4, self.heads, self.head_dim).transpose(1, 2)
        v = self.wv(windows).view(n, 4, self.heads, self.head_dim).transpose(1, 2)
        out = F.scaled_dot_product_attention(q, k, v)  # [n, heads, 1, head_dim]
        return self.wo(out.reshape(n, self.heads * self.head_dim))


class SwiGLUProjector(nn.Module):
    def __init__(self, in_dim: int, hidden: int, out_dim: int):
        super().__init__()
        self.w1 = nn.Linear(in_dim, hidden, bias=False)  # gate
        self.w3 = nn.Linear(in_dim, hidden, bias=False)  # up
        self.w2 = nn.Linear(hidden, out_dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class MolmoConnector(nn.Module):
    def __init__(self, cfg: VLMConfig):
        super().__init__()
        v, c = cfg.vision, cfg.connector
        # Row 0 is added to patches that are all padding, row 1 to patches that are partly padding.
        self.pad_embed = nn.Parameter(torch.zeros(2, v.feature_width))
        self.pool = AttentionPool2x2(v.feature_width, c.pool_heads, c.pool_head_dim)
        self.projector = SwiGLUProjector(c.pool_heads * c.pool_head_dim, c.projector_hidden, cfg.llm.d_model)

    def forward(self, features: torch.Tensor, patch_mask: torch.Tensor) -> torch.Tensor:
        """features [n, P*P, C], patch_mask [n, P, P] -> pooled tokens [n, (P/2)^2, d_model]"""
        n, _, c = features.shape
        p = patch_mask.shape[-1]
        mask = patch_mask.reshape(n, p * p, 1).to(features.dtype)
        # Molmo's rule: 0 is all padding, any other value below 1 (a fraction, or Molmo's -1 rows) partial.
        all_pad = (mask == 0).to(features.dtype)
        partial_pad = ((mask < 1) & (mask != 0)).to(features.dtype)
        features = features + all_pad * self.pad_embed[0] + partial_pad * self.pad_embed[1]
        # [n, P, P, C] -> windows of 2x2 in row-major order of the pooled grid
        grid = features.view(n, p // 2, 2, p // 2, 2, c).permute(0, 1, 3, 2, 4, 5)
        windows = grid.reshape(n * (p // 2) ** 2, 4, c)
        pooled = self.pool(windows)
        return self.projector(pooled).view(n, (p // 2) ** 2, -1)
