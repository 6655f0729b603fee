"""The knob space: which (tier, top_k, blocks) values a controller may choose, and how configs are numbered.

A model's preset is the source of truth (`VLMConfig.knob_lists()`); everything that needs the number of
tiers, top-k values or block counts (action spaces, masks, observation widths, network heads, outcome
tables) reads it from a `KnobSpace` instead of assuming sizes. Configs are numbered tier-major, then
top_k, then blocks: the order of `envs.vlm.evaluate.all_configs`, outcome tables' columns and
`envs.latency.ConfigLatency`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from envs.vlm.evaluate import Config


@dataclass(frozen=True)
class KnobSpace:
    """The values of each knob, in the order actions index them."""

    tier: tuple[str, ...]
    top_k: tuple[int, ...]
    blocks: tuple[int, ...]

    def __post_init__(self):
        for name in ("tier", "top_k", "blocks"):
            values = tuple(getattr(self, name))
            if not values or len(set(values)) != len(values):
                raise ValueError(f"knob {name!r} needs at least one value and no repeats, got {list(values)}")
            object.__setattr__(self, name, values)

    @classmethod
    def from_lists(cls, knob_lists: Mapping[str, Sequence]) -> KnobSpace:
        """From `{"tier": [...], "top_k": [...], "blocks": [...]}` (`VLMConfig.knob_lists()`)."""
        return cls(tuple(knob_lists["tier"]), tuple(knob_lists["top_k"]), tuple(knob_lists["blocks"]))

    @classmethod
    def from_config(cls, cfg) -> KnobSpace:
        """The knob space of a model's preset (a `VLMConfig`)."""
        return cls.from_lists(cfg.knob_lists())

    @classmethod
    def of(cls, knobs: KnobSpace | Mapping[str, Sequence]) -> KnobSpace:
        """`knobs` itself if it is a knob space, else the space of those knob lists."""
        return knobs if isinstance(knobs, KnobSpace) else cls.from_lists(knobs)

    def to_lists(self) -> dict[str, list]:
        """JSON-friendly knob lists, the inverse of `from_lists`."""
        return {"tier": list(self.tier), "top_k": list(self.top_k), "blocks": list(self.blocks)}

    @property
    def n_tier(self) -> int:
        return len(self.tier)

    @property
    def n_top_k(self) -> int:
        return len(self.top_k)

    @property
    def n_blocks(self) -> int:
        return len(self.blocks)

    @property
    def per_tier(self) -> int:
        """Configs of one tier: top_k x blocks."""
        return self.n_top_k * self.n_blocks

    @property
    def n_configs(self) -> int:
        return self.n_tier * self.per_tier

    @property
    def nvec(self) -> tuple[int, int, int]:
        """The `MultiDiscrete` sizes of an action (tier, top_k, blocks)."""
        return self.n_tier, self.n_top_k, self.n_blocks

    @property
    def n_logits(self) -> int:
        """Length of a flat logit (or mask) vector over the three knobs: sum(nvec)."""
        return sum(self.nvec)

    def split(self, flat: np.ndarray) -> list[np.ndarray]:
        """A flat [..., n_logits] vector (logits, masks) -> its tier, top_k and blocks parts."""
        return np.split(np.asarray(flat), [self.n_tier, self.n_tier + self.n_top_k], axis=-1)

    def config_index(self, tier: int, k: int, b: int) -> int:
        """The flat index of the config with knob indices (tier, top_k, blocks)."""
        if not (0 <= tier < self.n_tier and 0 <= k < self.n_top_k and 0 <= b < self.n_blocks):
            raise IndexError(f"knob indices {(tier, k, b)} lie outside the space's sizes {self.nvec}")
        return (tier * self.n_top_k + k) * self.n_blocks + b

    def config_knobs(self, index: int) -> tuple[int, int, int]:
        """The inverse of `config_index`: (tier, top_k, blocks) indices."""
        if not 0 <= index < self.n_configs:
            raise IndexError(f"config index {index} is outside 0..{self.n_configs - 1}")
        tier, rest = divmod(int(index), self.per_tier)
        return tier, rest // self.n_blocks, rest % self.n_blocks

    def tier_configs(self, tier: int) -> slice:
        """The config indices of one tier (`config_index(tier, ., .)`)."""
        return slice(tier * self.per_tier, (tier + 1) * self.per_tier)

    def config(self, index: int) -> Config:
        """The knob values of config `index`."""
        tier, k, b = self.config_knobs(index)
        return Config(self.tier[tier], self.top_k[k], self.blocks[b])

    def configs(self) -> list[Config]:
        """Every config, in index order (`envs.vlm.evaluate.all_configs` of a model with this space)."""
        return [self.config(i) for i in range(self.n_configs)]
