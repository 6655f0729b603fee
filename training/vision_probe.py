"""The vision probe: training-only heads that name what each vision token shows (the dense vision loss).

Every connector token gets a class (shape, letter, digit or nothing) and a colour from what the
scene drew where (`envs/tasks/dense_labels.py`); the probe's cross-entropy is the dense auxiliary
loss, which gives the LLM legible vision features to learn from. It can train the vision encoder
and connector alone (`--vision-steps`, cheap: no LLM) and is measured at each validation. Saved as
probe.pt beside each model a run writes, so a run from that model (`--init`) continues it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from envs.tasks.dense_labels import CLASSES, COLOUR_CLASSES, IGNORE, token_targets
from envs.vlm.model import Preprocessed, preprocess_requests
from envs.vlm.presets import TIERS
from training.checkpoints import continue_head

PROBE_FILE = "probe.pt"


def probe_targets(samples: list, crops: list, side: int) -> tuple[np.ndarray, np.ndarray]:
    """Class and colour targets of every vision token of `samples` (connector order, `side` x `side`
    tokens per crop), from what each scene drew where (`dense_labels.token_targets`)."""
    targets = [token_targets(s.objects, c, side) for s, c in zip(samples, crops, strict=True)]
    return np.concatenate([t[0] for t in targets]), np.concatenate([t[1] for t in targets])


class VisionProbe(nn.Module):
    """Training-only heads reading each connector token: object class and colour (not shipped)."""

    def __init__(self, d_model: int, none_weight: float = 0.2):
        super().__init__()
        self.norm = nn.LayerNorm(d_model, elementwise_affine=False)  # the LLM sees tokens after a norm too
        self.cls = nn.Linear(d_model, len(CLASSES))
        self.colour = nn.Linear(d_model, len(COLOUR_CLASSES))
        # most tokens show nothing: down-weight "none" so objects dominate the gradient
        self.register_buffer("cls_weight", torch.tensor([none_weight] + [1.0] * (len(CLASSES) - 1)))
        self.register_buffer("colour_weight", torch.tensor([none_weight] + [1.0] * (len(COLOUR_CLASSES) - 1)))

    def _logits_and_targets(self, image_tokens: torch.Tensor, targets: tuple[np.ndarray, np.ndarray]):
        cls, col = (torch.from_numpy(t).to(image_tokens.device) for t in targets)
        if len(cls) != image_tokens.shape[0] * image_tokens.shape[1]:
            raise ValueError(f"{len(cls)} token targets for {image_tokens.shape[0] * image_tokens.shape[1]} tokens")
        h = self.norm(image_tokens.reshape(-1, image_tokens.shape[-1]).float())
        return self.cls(h), cls, self.colour(h), col

    def loss(self, image_tokens: torch.Tensor, targets: tuple[np.ndarray, np.ndarray]) -> torch.Tensor:
        """Mean cross-entropy over legible tokens of both heads; `targets` from `probe_targets`."""
        cls_logits, cls, col_logits, col = self._logits_and_targets(image_tokens, targets)
        ce = nn.functional.cross_entropy
        return ce(cls_logits, cls, self.cls_weight, ignore_index=IGNORE) + ce(
            col_logits, col, self.colour_weight, ignore_index=IGNORE
        )

    @torch.no_grad()
    def accuracy(
        self, image_tokens: torch.Tensor, targets: tuple[np.ndarray, np.ndarray]
    ) -> dict[str, tuple[int, int]]:
        """(correct, asked) per target group: shape, letter, digit classes and object colour."""
        cls_logits, cls, col_logits, col = self._logits_and_targets(image_tokens, targets)
        right_cls, right_col = cls_logits.argmax(-1) == cls, col_logits.argmax(-1) == col
        out = {}
        for group in ("shape", "letter", "digit"):
            ids = [i for i, c in enumerate(CLASSES) if c.startswith(group + ":")]
            asked = torch.isin(cls, torch.tensor(ids, device=cls.device))
            out[group] = (int(right_cls[asked].sum()), int(asked.sum()))
        asked = col > 0
        out["colour"] = (int(right_col[asked].sum()), int(asked.sum()))
        return out


def vision_tokens(model, pre: Preprocessed) -> torch.Tensor:
    """Connector output of a preprocessed batch, without the LLM's embeddings."""
    return model.image_tokens(pre, model.encode_vision(pre.pixels()))


def prepare_with_targets(cfg, tokenizer, samples: list, tier: str, answers=None) -> tuple[Preprocessed, tuple]:
    """Crops and tokens of `samples` at `tier` with the probe's targets for their vision tokens (no weights)."""
    images, questions = [s.image for s in samples], [s.question for s in samples]
    pre = preprocess_requests(cfg, tokenizer, images, questions, tier, answers)
    return pre, probe_targets(samples, pre.crops, cfg.vision.tokens_per_side)


def probe_report(model, probe: VisionProbe, samples: list) -> dict[str, dict[str, float]]:
    """Probe accuracy per tier and group on `samples` (groups a tier is never asked about are left out)."""
    out = {}
    with torch.no_grad():
        for tier in TIERS:
            pre, targets = prepare_with_targets(model.cfg, model.tokenizer, samples, tier)
            counts = probe.accuracy(vision_tokens(model, pre), targets)
            out[tier] = {g: right / asked for g, (right, asked) in counts.items() if asked}
    return out


def load_probe(probe: VisionProbe, init: Path) -> None:
    """Continue the vision probe of the run that trained `init`: a fresh probe's loss is large and sends
    random gradients into the vision encoder until it has learned. Looks for `init/probe.pt` (saved
    beside each run's model), then the run's `checkpoint.pt` beside `init`."""
    if not continue_head(probe, "vision probe", init, "probe", PROBE_FILE):
        print(f"no vision probe beside {init}: it starts afresh")
