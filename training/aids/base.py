"""The one interface every training aid implements: an optional extra loss of the VLM trainer.

An aid contributes options (a dataclass merged into `TrainArgs`, so each option is a flag of
`scripts/train_vlm.py` and a key of a run's args.json), host-side targets made with each batch (in
the step maker, possibly in worker processes), an `on_layer` hook that watches the LLM's layers
during the answer loss, and the weighted losses and logged scalars read off that hook afterwards.
An aid may also own training-only weights (`head`): they are optimised, checkpointed under
`head_key` and continued from the run that trained `--init`, but never shipped with the model.
The trainer core loops over the active aids; adding one touches no line of it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

OnLayer = Callable[[int, torch.Tensor, torch.Tensor], None]  # (layer index, its input, its output)


@dataclass
class Part:
    """One weighted loss of a step: `name` in the progress bar, `train/<tag>` in TensorBoard, and more
    scalars to log beside it (`train/<key>`)."""

    name: str
    tag: str
    value: torch.Tensor
    weight: float
    scalars: dict[str, float] = field(default_factory=dict)


class LossTerm:
    """An optional extra loss. Subclasses set `options` and implement `active`, `check`, `hook` and
    `parts`; `targets` and the head attributes when they need them.

    Class level (no model needed, runs in data workers): `active(args)`, `check(args, llm)` and
    `targets(args, samples, pre, tokenizer, tokens_per_side)`. Instance level (one per run, built
    after the model): `hook(model, pre, prepared, targets)` for each LLM step and `parts(hook)`.
    """

    options: ClassVar[type]  # the dataclass of this aid's fields in TrainArgs
    head_key: ClassVar[str | None] = None  # checkpoint entry of `head`, if the aid has weights of its own
    head_name: ClassVar[str] = ""  # how the log names the head when it is continued from --init
    head_lr_scale: ClassVar[float] = 1.0  # the head's learning rate in units of the model's
    weight_flag: ClassVar[str] = ""  # the flag that turns the aid on, named in resume errors

    def __init__(self, args, model) -> None:
        self.args = args
        self.head: nn.Module | None = None

    @classmethod
    def active(cls, args) -> bool:
        """Whether this run uses the aid (usually: its weight is positive)."""
        raise NotImplementedError

    @classmethod
    def check(cls, args, llm) -> None:
        """ValueError for option values the aid cannot run with (`llm`: the preset's LLM shapes)."""

    @classmethod
    def targets(cls, args, samples: list, pre, tokenizer, tokens_per_side: int) -> Any:
        """What the aid needs to know about a batch, from the samples and their crops and tokens."""
        return None

    def hook(self, model, pre, prepared, targets) -> OnLayer | None:
        """The `on_layer` hook collecting this step's terms (None: nothing to collect this step)."""
        raise NotImplementedError

    def parts(self, hook) -> list[Part]:
        """The weighted losses the hook collected; empty where nothing ran (e.g. its layers were dropped)."""
        raise NotImplementedError
