"""Training aids: optional extra losses of the VLM trainer, each behind `LossTerm`.

`AIDS` is the order the trainer builds, runs and sums them in.
"""

from training.aids.attention_guide import AttentionGuide, GuidedAttention
from training.aids.base import LossTerm, OnLayer, Part
from training.aids.colour_carry import AskedColourCarry, ColourCarry
from training.aids.norm_cap import AnswerNormPenalty, NormCap
from training.aids.question_guides import AskGuide, MatchGuide

AIDS: tuple[type[LossTerm], ...] = (GuidedAttention, AskGuide, MatchGuide, AskedColourCarry, NormCap)


def active_aids(args) -> list[type[LossTerm]]:
    """The aids `args` turns on, in `AIDS` order."""
    return [aid for aid in AIDS if aid.active(args)]


__all__ = [
    "AIDS",
    "AnswerNormPenalty",
    "AskGuide",
    "AskedColourCarry",
    "AttentionGuide",
    "ColourCarry",
    "GuidedAttention",
    "LossTerm",
    "MatchGuide",
    "NormCap",
    "OnLayer",
    "Part",
    "active_aids",
]
