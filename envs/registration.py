"""The environments' Gymnasium ids, built from keyword arguments alone.

    import gymnasium as gym
    import envs  # registers the ids

    env = gym.make("KnobRL/TwoStage-v0")  # the embedded tiny model's train split, replayed
    env = gym.make("KnobRL/SingleStage-v0", split="val", budgets="tight", penalty="relative")

`make_knob_env` is what both ids call; it is also usable directly.
"""

from __future__ import annotations

from pathlib import Path

import gymnasium as gym

from envs.assets import load_assets
from envs.budgets import BudgetDistribution, Penalty, parse_distribution
from envs.guard import BudgetGuard

ENV_IDS = {"two_stage": "KnobRL/TwoStage-v0", "single_stage": "KnobRL/SingleStage-v0"}
BACKENDS = ("replay", "live")


def make_knob_env(
    kind: str = "two_stage",
    *,
    model: str | Path = "tiny",
    split: str = "train",
    budgets: str | BudgetDistribution = "log_uniform",
    penalty: str | Penalty = "indicator",
    backend: str = "replay",
    profile: str | Path | None = None,
    controller_ms: float = 0.0,
    guard: BudgetGuard | None = None,
    skip_guarded: bool = False,
    measure: bool = False,
    quick: bool = False,
    tables: str | Path | None = None,
    allow_mismatch: bool = False,
):
    """A knob environment over one split of a model's requests.

    `kind`: "two_stage" or "single_stage". `model`: a preset name (its embedded assets), a model
    directory or an assets directory (scripts/prepare_assets.py's). `split`: "train", "val" or "test".
    `budgets`: a budget distribution or its spec
    ("uniform", "log_uniform", "tight", "loose", "bimodal", "trace:FILE"). `penalty`: a `Penalty` or its
    kind ("indicator", "relative"). `backend`: "replay" (the recorded outcome table: fast) or "live"
    (the VLM runs each episode; `measure`: its latency measured rather than predicted). `profile`: the
    latency profile, a file or a name its `assets.json` gives (default: its default profile, `cpu` for the
    embedded model). `tables`: a directory of outcome tables (`SPLIT/table.npz`) instead of the model's;
    tables of other weights or timed with another profile are refused unless `allow_mismatch`.
    `controller_ms`: time charged per request for the controller; `guard`, `skip_guarded`: the budget
    guard (envs/guard.py). `quick`: only the first validation and test requests. The model and its
    replayed splits are loaded once per process (`load_assets`).
    """
    if kind not in ENV_IDS:
        raise ValueError(f"unknown environment kind {kind!r}; choose one of {list(ENV_IDS)}")
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of {BACKENDS}")
    budgets = parse_distribution(budgets) if isinstance(budgets, str) else budgets
    if not isinstance(budgets, BudgetDistribution):
        raise TypeError(f"budgets must be a spec string or a BudgetDistribution, not {type(budgets).__name__}")
    penalty = Penalty(penalty) if isinstance(penalty, str) else penalty
    if not isinstance(penalty, Penalty):
        raise TypeError(f"penalty must be a kind ({'indicator'!r}, {'relative'!r}) or a Penalty, not {penalty!r}")
    assets = load_assets(model, quick, profile, tables, allow_mismatch)
    source = assets.backend(split) if backend == "replay" else assets.live(split, measure)
    return assets.env(kind, source, budgets, penalty, controller_ms, guard, skip_guarded)


def make_two_stage(**kwargs):
    """`KnobRL/TwoStage-v0`: `make_knob_env("two_stage", **kwargs)`."""
    return make_knob_env("two_stage", **kwargs)


def make_single_stage(**kwargs):
    """`KnobRL/SingleStage-v0`: `make_knob_env("single_stage", **kwargs)`."""
    return make_knob_env("single_stage", **kwargs)


def register_envs() -> None:
    """Register the ids with Gymnasium (once; `import envs` does it)."""
    for kind, entry_point in (("two_stage", make_two_stage), ("single_stage", make_single_stage)):
        if ENV_IDS[kind] not in gym.registry:
            gym.register(ENV_IDS[kind], entry_point=entry_point)
