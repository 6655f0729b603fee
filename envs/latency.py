"""The project's one latency definition, measured live.

request latency = controller overhead + preprocessing + vision encoder + connector + LLM prefill
                  + decode of every generated token after the first.
Timers wrap whole stages from the outside and synchronise CUDA, so no layer escapes timing.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass

import numpy as np
import torch

PARTS = ("controller", "preprocess", "vision", "connector", "prefill", "decode")


class StageTimer:
    """Accumulates wall time per named stage, in milliseconds."""

    def __init__(self, device: torch.device | str = "cpu"):
        self.cuda = torch.device(device).type == "cuda"
        self.ms = dict.fromkeys(PARTS, 0.0)

    def _sync(self):
        if self.cuda:
            torch.cuda.synchronize()

    @contextlib.contextmanager
    def stage(self, name: str):
        if name not in self.ms:
            raise ValueError(f"unknown latency part {name!r}; parts are {PARTS}")
        self._sync()
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self._sync()
            self.ms[name] += (time.perf_counter() - t0) * 1e3


@dataclass
class TimedAnswer:
    generation: object
    vision_tokens: int
    prompt_tokens: int
    crops: int
    parts_ms: dict[str, float]
    total_ms: float  # measured end to end around all stages, not the sum of parts


def timed_answer(
    model,
    image,
    question: str,
    tier: str,
    top_k: int,
    blocks: int,
    max_new_tokens: int | None = None,
    ignore_eos: bool = False,
) -> TimedAnswer:
    """Run one request through every stage with timers around each; knobs checked first."""
    model.check_knobs(tier, top_k, blocks)
    timer = StageTimer(model.device)
    timer._sync()
    t0 = time.perf_counter()
    with timer.stage("preprocess"):
        pre = model.preprocess([image], [question], tier)
    with torch.no_grad():
        with timer.stage("vision"):
            features = model.encode_vision(torch.from_numpy(np.concatenate([c.pixels for c in pre.crops])))
        with timer.stage("connector"):
            prepared = model.connect(pre, features)
        with timer.stage("prefill"):
            state = model.prefix(prepared)
    gen = model.generate(state, model.layers_for(blocks), top_k, max_new_tokens, timer=timer, ignore_eos=ignore_eos)
    gen.blocks = blocks
    timer._sync()
    total = (time.perf_counter() - t0) * 1e3
    return TimedAnswer(
        gen, prepared.vision_tokens[0], prepared.prompt_tokens[0], prepared.n_crops[0], dict(timer.ms), total
    )
