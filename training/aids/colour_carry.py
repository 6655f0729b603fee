"""Carrying the asked colour to the answer position: a training loss with a readout of its own.

To answer "is there a small red star?" the answer position has to compare the colour it finds in the
image with the one the question names. Linear probes (`diagnostics/presence_probe.py`) can show the
found colour there while the asked colour is missing: one operand of the comparison is absent, and
guiding a head to the colour word moves where it looks, not what its values carry. Here a linear
readout must name the asked colour from the answer position's residual after each of `layers`; its
gradient trains the value and output projections that carry the word there. The readout is its own
(the LM head's colour words already name the found colour, `AttentionGuide(reads=...)`),
training-only, and not shipped.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from envs.tasks.synthvqa import COLOURS, asked_object, asks_presence
from training.aids.attention_guide import answer_positions
from training.aids.base import LossTerm, Part

# A fresh readout at the model's fine-tuning rate grows too slowly to teach the model anything for
# thousands of steps: it trains at this multiple of the model's learning rate.
CARRY_LR_SCALE = 20.0


@dataclass
class ColourCarryOptions:
    carry_weight: float = 0.0  # > 0: a readout of its own names the asked colour at the answer position
    carry_layers: tuple[int, ...] = (1, 2)  # after these layers


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


class AskedColourCarry(LossTerm):
    """`--carry-weight W --carry-layers L...`: W times `CarryLoss` of a `ColourCarry` readout, which is
    checkpointed as "carry" and continued from the run that trained `--init`."""

    options = ColourCarryOptions
    head_key, head_name, head_lr_scale, weight_flag = "carry", "asked-colour readout", CARRY_LR_SCALE, "carry-weight"

    def __init__(self, args, model) -> None:
        super().__init__(args, model)
        self.head = ColourCarry(model.cfg.llm.d_model).to(args.device)

    @classmethod
    def active(cls, args) -> bool:
        return args.carry_weight > 0

    @classmethod
    def check(cls, args, llm) -> None:
        if args.carry_weight < 0 or not args.carry_layers or any(not 0 <= i < llm.layers for i in args.carry_layers):
            raise ValueError(f"carry_weight must be >= 0 and carry_layers non-empty in 0..{llm.layers - 1}")

    @classmethod
    def targets(cls, args, samples: list, pre, tokenizer, tokens_per_side: int) -> np.ndarray:
        return asked_colours(samples)

    def hook(self, model, pre, prepared, targets) -> CarryLoss:
        return CarryLoss(self.head, answer_positions(prepared.targets), targets, self.args.carry_layers)

    def parts(self, loss: CarryLoss) -> list[Part]:
        if not loss.terms:
            return []
        return [Part("carry", "colour_carry", loss.value(), self.args.carry_weight, {"carry_accuracy": loss.accuracy})]
