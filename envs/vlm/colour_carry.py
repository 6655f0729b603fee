"""Carrying the asked colour to the answer position: a training loss with a readout of its own.

Why: to answer "is there a small red star?" the answer position has to compare the colour it finds
in the image with the one the question names. Linear probes (`scripts/presence_probe.py`,
`reports/presence_probe_*_seed11.md`) decode the found colour there at 0.99 from layer 2 (run 21)
but the asked colour at only 0.28-0.38 after every layer (majority 0.11): one operand of the
comparison is missing. Guiding a head to the colour word (run 23) moved where it looks, not what
its values carry. Here a linear readout must name the asked colour from the answer position's
residual after each of `layers`; its gradient trains the value and output projections that carry
the word there. The readout is its own (the LM head's colour words already name the found colour,
`AttentionGuide(reads=...)`), training-only, and not shipped.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from envs.tasks.synthvqa import COLOURS, asked_object, asks_presence


def asked_colours(samples: list) -> np.ndarray:
    """[B] index into COLOURS of the colour each "is there a small <colour> <shape>?" asks; -1 elsewhere."""
    names = list(COLOURS)
    return np.array([names.index(asked_object(s.question)[0]) if asks_presence(s) else -1 for s in samples])


class ColourCarry(nn.Module):
    """The readout: a parameter-free RMS normalisation (the residual's scale grows with depth) and a
    linear map to the colours."""

    def __init__(self, d_model: int):
        super().__init__()
        self.readout = nn.Linear(d_model, len(COLOURS))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        h = h.float()
        return self.readout(h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6))


class CarryLoss:
    """An `on_layer` hook for one step: the cross-entropy of `carry`'s colour at each row's `query`
    position after each of `layers` that runs, against `asked` ([B], -1 for rows that ask no colour)."""

    def __init__(self, carry: ColourCarry, query: torch.Tensor, asked: np.ndarray, layers: tuple[int, ...]):
        if len(asked) != len(query):
            raise ValueError(f"{len(asked)} asked colours for {len(query)} rows")
        self.carry, self.layers = carry, set(layers)
        asked = torch.as_tensor(asked, device=query.device)
        self.rows = asked >= 0
        self.query, self.targets = query[self.rows], asked[self.rows]
        self.terms, self.hits = [], []

    def __call__(self, layer: int, h_in: torch.Tensor, h_out: torch.Tensor) -> None:
        if layer not in self.layers or not self.rows.any():
            return
        logits = self.carry(h_out[self.rows, self.query])
        self.terms.append(torch.nn.functional.cross_entropy(logits, self.targets))
        self.hits.append((logits.argmax(-1) == self.targets).float().mean().detach())

    def value(self) -> torch.Tensor:
        """Mean cross-entropy over the layers run (zero when none ran or no row asks a colour)."""
        return torch.stack(self.terms).mean() if self.terms else torch.zeros((), device=self.query.device)

    @property
    def accuracy(self) -> float:
        """Share of the asking rows whose read colour is the asked one, over the layers run."""
        return float(torch.stack(self.hits).mean()) if self.hits else float("nan")
