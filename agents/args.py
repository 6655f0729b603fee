"""The main job's arguments: one dataclass, each field a flag of scripts/train_ppo.py."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from agents.imitation import ORACLES
from envs.assets import BUDGET_REFERENCES

VARIANTS = {"two_stage": ("budget", "prompt", "router"), "single_stage": ("mlp", "transformer")}
ENCODERS = ("vlm", "light")


HELP = {  # --help of the fields without their own metadata help
    "policy": "the controller: two_stage (tier from the budget, then top_k and blocks) or single_stage",
    "variant": "two_stage: budget | prompt | router (what stage 1 reads); single_stage: mlp | transformer",
    "encoder": "single_stage's global view: vlm (the VLM's own encoder) or light (a distilled one)",
    "model": "a preset name (its embedded assets) or a model directory (see --assets for your own data)",
    "out": "the run directory (default runs/ppo_POLICY_VARIANT[_quick])",
    "quick": "a smoke run: fewer episodes and steps, the first 200 validation and 400 test requests",
    "train_budgets": "the budget distribution of training episodes (uniform, log_uniform, tight, loose, bimodal, "
    "trace:FILE)",
    "eval_budgets": "comma-separated budget distributions the test split is evaluated under",
    "penalty": "the reward's penalty for a violated budget: indicator or relative",
    "penalty_weight": "the penalty's weight",
    "oracle": "behaviour cloning's labels: expected (scores over similar requests) or sample (the request's own)",
    "oracle_shrink": "expected scores moved this far from each config's overall mean (1: pure k-NN)",
    "bc_episodes": "oracle demonstrations for behaviour cloning",
    "bc_epochs": "behaviour-cloning epochs",
    "ppo_steps": "MaskablePPO fine-tuning steps",
    "select_every": "PPO steps between validation checks (0: keep the last parameters)",
    "select_episodes": "validation episodes per budget distribution and check",
    "select_alpha": "chance that some check without a real gain replaces the behaviour-cloned start",
    "n_envs": "parallel training environments",
    "eval_episodes": "test episodes per budget distribution",
    "learning_rate": "MaskablePPO's learning rate",
    "n_steps": "rollout steps per environment and update",
    "batch_size": "MaskablePPO's minibatch size",
    "n_epochs": "MaskablePPO's epochs per update",
    "gamma": "discount (1: an episode is one request, one or two decisions)",
    "ent_coef": "MaskablePPO's entropy bonus",
    "guard": "the budget guard (envs/guard.py) serves requests no config fits once the controller has run",
    "repair": "with the guard: replace a chosen config that does not fit by the best one that does",
    "seed": "the run's seed",
    "budget_reference": "budget fractions (tight, loose, ...) are of the profile's reference request at the full "
    "config (profile), or of the train split's median full-config latency (data)",
}


@dataclass
class Args:
    policy: str = "two_stage"
    variant: str | None = None  # two_stage: budget | prompt | router; single_stage: mlp | transformer
    encoder: str = "vlm"  # single_stage's global view: the VLM's own encoder, or a distilled light one
    model: str = "tiny"  # a preset name (its embedded assets) or a model directory
    assets: Path | None = field(default=None, metadata={"help": (
        "an assets directory (scripts/prepare_assets.py --out): its model, latency profile and outcome tables; "
        "replaces --model")})  # fmt: skip
    profile: str | None = field(default=None, metadata={"help": (
        "the latency profile: a file, or a name the assets' manifest gives (cpu, cuda-...); default the "
        "manifest's default profile")})  # fmt: skip
    tables: Path | None = field(
        default=None,
        metadata={
            "help": (
                "a directory of outcome tables (build_outcomes' layout: SPLIT/table.npz) instead of the assets' own"
            )
        },
    )
    allow_mismatch: bool = field(
        default=False,
        metadata={
            "help": ("warn about, rather than refuse, tables answered by other weights or timed with another profile")
        },
    )
    threads: int | None = field(
        default=None,
        metadata={
            "help": (
                "torch CPU threads (default 1, or $KNOB_RL_THREADS): one holds up when other processes load the cores"
            )
        },
    )
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
    budget_reference: str = "profile"

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
        if self.budget_reference not in BUDGET_REFERENCES:
            raise ValueError(f"unknown budget reference {self.budget_reference!r}; choose one of {BUDGET_REFERENCES}")
        if self.encoder not in ENCODERS:
            raise ValueError(f"unknown global-view encoder {self.encoder!r}; choose one of {ENCODERS}")
        for name in ("controller_ms", "guard_ms"):
            value = getattr(self, name)
            if value is not None and not value >= 0.0:
                raise ValueError(f"{name} must be >= 0 ms, got {value}")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"threads must be at least 1, got {self.threads}")
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
