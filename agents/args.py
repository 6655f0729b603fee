"""The main job's arguments: one dataclass, each field a flag of scripts/train_ppo.py."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from agents.imitation import ORACLES

VARIANTS = {"two_stage": ("budget", "prompt", "router"), "single_stage": ("mlp", "transformer")}
ENCODERS = ("vlm", "light")


@dataclass
class Args:
    policy: str = "two_stage"
    variant: str | None = None  # two_stage: budget | prompt | router; single_stage: mlp | transformer
    encoder: str = "vlm"  # single_stage's global view: the VLM's own encoder, or a distilled light one
    model: str = "tiny"  # a preset name (its embedded assets) or a model directory
    out: Path = Path("runs/ppo")
    quick: bool = False  # a smoke run: fewer episodes and steps, the first validation and test requests
    train_budgets: str = "log_uniform"
    eval_budgets: str = "uniform,log_uniform,tight,loose,bimodal"
    penalty: str = "indicator"
    penalty_weight: float = 1.0
    oracle: str = "expected"  # behaviour cloning's labels: expected scores over similar requests, or "sample"
    oracle_shrink: float = 0.5  # expected scores moved this far from each config's overall mean (1: pure k-NN)
    bc_episodes: int = 3000
    bc_epochs: int = 15
    ppo_steps: int = 65536
    select_every: int = 8192  # PPO steps between validation checks (0: keep the last parameters)
    select_episodes: int = 2000  # validation episodes per budget distribution and check
    select_alpha: float = 0.05  # chance that some check without a real gain replaces the BC start
    n_envs: int = 8
    eval_episodes: int = 2000  # per budget distribution
    # MaskablePPO: an episode is one request (one or two decisions), so no discounting
    learning_rate: float = 1e-4
    n_steps: int = 256  # rollout steps per environment and update
    batch_size: int = 256
    n_epochs: int = 4
    gamma: float = 1.0
    ent_coef: float = 0.003
    guard: bool = True  # the budget guard (envs/guard.py) serves requests no config fits after the controller
    repair: bool = True  # and (with the guard) serves a config that fits where the policy's does not
    controller_ms: float | None = field(default=None, metadata={"help": (
        "charge this controller time (ms) per request instead of measuring it on the serving path: two runs of "
        "one seed then write identical numbers (a light encoder's own time stays measured)")})  # fmt: skip
    guard_ms: float | None = field(default=None, metadata={
        "help": "with --controller-ms: the budget guard's charged time (ms); default --controller-ms"})  # fmt: skip
    seed: int = 0

    def __post_init__(self):
        if self.policy not in VARIANTS:
            raise ValueError(f"unknown policy {self.policy!r}; choose one of {list(VARIANTS)}")
        self.variant = self.variant or VARIANTS[self.policy][0]
        if self.variant not in VARIANTS[self.policy]:
            raise ValueError(f"unknown {self.policy} variant {self.variant!r}; choose one of {VARIANTS[self.policy]}")
        if self.oracle not in ORACLES:
            raise ValueError(f"unknown oracle {self.oracle!r}; choose one of {ORACLES}")
        if not 0.0 < self.select_alpha < 1.0:
            raise ValueError(f"select_alpha must lie in (0, 1), got {self.select_alpha}")
        if not 0.0 <= self.oracle_shrink <= 1.0:
            raise ValueError(f"oracle shrink must lie in [0, 1], got {self.oracle_shrink}")
        if self.encoder not in ENCODERS:
            raise ValueError(f"unknown global-view encoder {self.encoder!r}; choose one of {ENCODERS}")
        for name in ("controller_ms", "guard_ms"):
            value = getattr(self, name)
            if value is not None and not value >= 0.0:
                raise ValueError(f"{name} must be >= 0 ms, got {value}")
        if self.guard_ms is not None and self.controller_ms is None:
            raise ValueError("guard_ms pins the guard's time only beside a pinned controller_ms")
        if self.quick:
            self.bc_episodes, self.bc_epochs, self.ppo_steps, self.eval_episodes = 600, 6, 1024, 150
            self.select_every, self.select_episodes = 512, 100

    @property
    def pinned(self) -> bool:
        """True when the charged controller and guard times are given rather than measured."""
        return self.controller_ms is not None

    def charged_guard_ms(self) -> float | None:
        """The budget guard's pinned time: `guard_ms`, or `controller_ms` (the guard's work is part of the
        controller's, so this never undercharges); None when measured."""
        return self.guard_ms if self.guard_ms is not None else self.controller_ms
