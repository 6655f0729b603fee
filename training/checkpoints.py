"""A run's checkpoint (resumable, written atomically) and the training-only heads continued from --init."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from envs.atomic import atomic_path


def save_checkpoint(path: Path, model, probe, opt, step: int, heads: dict[str, nn.Module] | None = None) -> None:
    """Model, probe, optimiser, step and the aids' heads (entry per key). Atomic: a kill at any moment
    leaves the previous checkpoint intact."""
    state = {"model": model.state_dict(), "probe": probe.state_dict(), "opt": opt.state_dict(), "step": step}
    with atomic_path(path) as tmp:
        torch.save(state | {key: head.state_dict() for key, head in (heads or {}).items()}, tmp)


def continue_head(head: nn.Module, name: str, init: Path, key: str, file: str | None = None) -> bool:
    """Load a training-only head (`name` in the log) of the run that trained `init`: `init/file` (saved
    beside the model) if given and there, else entry `key` of the run's `checkpoint.pt`. False if neither."""
    beside_model = [(init / file, None)] if file else []
    for path, entry in [*beside_model, (init.parent / "checkpoint.pt", key)]:
        if not path.is_file():
            continue
        state = torch.load(path, map_location="cpu", weights_only=True)
        if entry is None or entry in state:
            head.load_state_dict(state[entry] if entry else state)
            print(f"{name} continued from {path}")
            return True
    return False
