"""Guides to the question's side of a presence check: where its colour word is, and whether it matches.

"is there a small red star?" compares the colour found in the image with the one the question names.
The ask guide (`--ask-*`) points a head of the answer position at the question's colour word, the
other operand of that comparison. The match guide (`--match-*`) points a head at the colour word
where the answer is "yes" and at <bos> where it is "no": to do that the head's query-key product has
to test the two colours for equality. Both are `AttentionGuide`s given positions instead of objects.
"""

from __future__ import annotations

from dataclasses import dataclass

from training.aids.attention_guide import (
    AttentionGuide,
    asked_colour_positions,
    check_guided_head,
    match_positions,
    presence_rows,
)
from training.aids.base import LossTerm, Part


@dataclass
class QuestionGuideOptions:
    ask_weight: float = 0.0  # > 0: guide `ask_head` of `ask_layers` to the presence question's colour word
    ask_layers: tuple[int, ...] = (1,)  # layers whose `ask_head` is guided
    ask_head: int = 0  # the guided head of each of those layers
    match_weight: float = 0.0  # > 0: guide `match_head` of `match_layers` to the colour word on "yes", <bos> on "no"
    match_layers: tuple[int, ...] = (3,)  # layers whose `match_head` is guided
    match_head: int = 0  # the guided head of each of those layers


class _PositionGuide(LossTerm):
    """A head of `<name>_layers` guided to positions given per batch, at weight `<name>_weight`."""

    options = QuestionGuideOptions
    name = ""

    @classmethod
    def active(cls, args) -> bool:
        return getattr(args, f"{cls.name}_weight") > 0

    @classmethod
    def check(cls, args, llm) -> None:
        check_guided_head(args, cls.name, llm)

    def hook(self, model, pre, prepared, targets) -> AttentionGuide:
        layers, head = getattr(self.args, f"{self.name}_layers"), getattr(self.args, f"{self.name}_head")
        return AttentionGuide(model, pre, prepared, None, layers, head, positions=targets)

    def parts(self, guide: AttentionGuide) -> list[Part]:
        if not guide.terms:
            return []
        weight = getattr(self.args, f"{self.name}_weight")
        return [Part(self.name, f"{self.name}_guide", guide.value(), weight, {f"{self.name}_mass": guide.mass})]


class AskGuide(_PositionGuide):
    """`--ask-*`: look at the presence question's colour word (`asked_colour_positions`)."""

    name = "ask"

    @classmethod
    def targets(cls, args, samples: list, pre, tokenizer, tokens_per_side: int):
        return asked_colour_positions(samples, pre, tokenizer, max(len(t) for t in pre.token_ids))


class MatchGuide(_PositionGuide):
    """`--match-*`: look at the colour word on "yes", at <bos> on "no" (`match_positions`)."""

    name = "match"

    @classmethod
    def targets(cls, args, samples: list, pre, tokenizer, tokens_per_side: int):
        rows = presence_rows(samples, pre.crops, tokens_per_side)
        return match_positions(samples, pre, tokenizer, max(len(t) for t in pre.token_ids), rows)
