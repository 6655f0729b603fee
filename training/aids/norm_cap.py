"""The answer-norm cap: a penalty on answer positions whose residual grows far beyond the others'.

A model can park the answer position of questions it cannot yet answer in a huge, nearly constant
state: after the final norm the prediction is then the answer prior whatever the image or question,
and the gradient of anything attention adds is divided by that norm, so those questions stop moving.
Capping the residual RMS at those positions keeps them trainable (`diagnostics/answer_state.py`
shows the state per family).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from training.aids.base import LossTerm, Part


@dataclass
class NormCapOptions:
    norm_cap: float = 0.0  # > 0: penalise answer positions whose residual RMS exceeds this
    norm_weight: float = 0.1  # weight of that penalty


class AnswerNormPenalty:
    """An `on_layer` hook: mean squared relative excess of the residual RMS over `cap` at the
    positions that predict answer tokens, averaged over the layers run."""

    def __init__(self, prepared, cap: float):
        self.where = prepared.targets[:, 1:] != -100  # position t predicts token t + 1
        self.cap, self.terms, self.largest = cap, [], 0.0

    def __call__(self, layer: int, h_in: torch.Tensor, h_out: torch.Tensor) -> None:
        rms = h_out[:, :-1][self.where].float().norm(dim=-1) / math.sqrt(h_out.shape[-1])
        self.terms.append((torch.relu(rms - self.cap) / self.cap).pow(2).mean())
        self.largest = max(self.largest, float(rms.detach().max()))

    def value(self) -> torch.Tensor:
        return torch.stack(self.terms).mean()


class NormCap(LossTerm):
    """`--norm-cap C --norm-weight W`: W times `AnswerNormPenalty` with cap C."""

    options = NormCapOptions

    @classmethod
    def active(cls, args) -> bool:
        return args.norm_cap > 0

    @classmethod
    def check(cls, args, llm) -> None:
        if args.norm_cap < 0 or args.norm_weight < 0:
            raise ValueError("norm_cap and norm_weight must be >= 0 (norm_cap 0 turns the penalty off)")

    def hook(self, model, pre, prepared, targets) -> AnswerNormPenalty:
        return AnswerNormPenalty(prepared, self.args.norm_cap)

    def parts(self, hook: AnswerNormPenalty) -> list[Part]:
        return [Part("norm", "norm_penalty", hook.value(), self.args.norm_weight, {"answer_rms_max": hook.largest})]
