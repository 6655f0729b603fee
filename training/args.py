"""The arguments of a VLM training run: the trainer's own, plus the options of every training aid.

One flat dataclass, so each field is a flag of `scripts/train_vlm.py` (`--batch-size` for
`batch_size`) and a key of the args.json a run writes; a recipe file or an args.json read back with
`TrainArgs.from_dict` gives the same run. The aids' fields come from their option dataclasses
(`training/aids/`), one base class each.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path

from envs.tasks.synthvqa import FAMILIES, PAIR_MODES
from envs.vlm.presets import get_preset
from training.aids import AIDS
from training.aids.attention_guide import AttentionGuideOptions
from training.aids.colour_carry import ColourCarryOptions
from training.aids.norm_cap import NormCapOptions
from training.aids.question_guides import QuestionGuideOptions
from training.batches import family_mix

WARMUP_SCENES = ("task", "dense")
COMPLEMENT_PAIRS = ("none", *PAIR_MODES)  # see synthvqa.complement


@dataclass
class CoreArgs:
    out: Path = Path("runs/tiny_vlm")  # the run folder: args.json, checkpoint.pt, tb/ and model/
    preset: str = "tiny"  # the model shapes (envs/vlm/presets.py)
    steps: int = 3000  # length of the learning-rate schedule, and of the run unless stop_at ends it sooner
    stop_at: int = 0  # > 0: end (rank, save) after this many steps; the lr schedule still spans `steps`
    max_minutes: float = 0.0  # > 0: end (checkpoint, rank, save) once training has run this long (a lent GPU's time)
    batch_size: int = 32  # SynthVQA questions per step
    lr: float = 2e-3  # peak learning rate (AdamW), after `warmup` linear steps
    min_lr: float = 1e-4  # where the cosine schedule ends
    warmup: int = 100  # steps of linear learning-rate warm-up
    weight_decay: float = 0.05  # AdamW decay of the weight matrices (not norms, biases, embeddings)
    grad_clip: float = 1.0  # gradient norm clip
    p_full: float = 0.3  # share of batches that run the full config (anchors the best config's accuracy)
    full_steps: int = 500  # progressive shrinking: the first steps train the full config only
    aux_weight: float = 1.0  # weight of the dense vision-token loss (0 turns it off)
    vision_steps: int = 0  # first steps train vision encoder + connector on the dense loss only
    warmup_scenes: str = field(default="task", metadata={"choices": WARMUP_SCENES})  # what the vision steps see
    dense_aux_batch: int = 0  # dense scenes added to each joint step's vision loss (keeps rare classes alive)
    probe_warmup: int = 0  # the first steps train the probe on detached vision tokens (for a probe started afresh)
    workers: int = 0  # > 0: processes that render and crop the next steps' scenes while this one trains (GPU)
    complement_pairs: str = "none"  # none | hard | easy | attribute | recolour: see synthvqa.complement
    boost_layers: tuple[int, ...] = ()  # these layers' MoE MLPs train at lr * boost_scale (see `param_groups`)
    boost_scale: float = 1.0  # learning-rate multiple of the boosted layers
    tier_weights: tuple[float, float, float] = field(  # how often each tier is drawn (low, medium, high)
        default=(1.0, 1.0, 1.0), metadata={"metavar": ("LOW", "MED", "HIGH")}
    )
    family_weights: tuple[float, ...] = field(  # task mix, in FAMILIES order; equal: cycle
        default=(1.0,) * len(FAMILIES), metadata={"nargs": len(FAMILIES), "metavar": tuple(f.upper() for f in FAMILIES)}
    )
    seed: int = 0  # model init and knob draws (each step's draw depends on seed and step only)
    val_every: int = 250  # steps between validations (probe accuracy, accuracy of six configs)
    val_n: int = 250  # validation questions
    probe_n: int = 50  # validation images the vision probe's accuracy is measured on
    ckpt_every: int = 50  # steps between checkpoints (the run resumes from the last)
    ranking: str = "adalora"  # block-ranking method run after training (envs/vlm/ranking.py)
    ranking_n: int = 256  # calibration questions of the block ranking
    ship: Path | None = None  # also write the final model directory here
    init: Path | None = None  # start from this model directory's weights (e.g. to continue training)
    reinit_vision: bool = False  # with init: keep its LLM, start ViT and connector afresh
    fresh_probe: bool = False  # with init: start the vision probe afresh even where that run saved one
    device: str = "cpu"  # torch device of the training (cpu, cuda)
    ship_dtype: str = "float16"  # dtype of the saved model weights


@dataclass
class TrainArgs(ColourCarryOptions, QuestionGuideOptions, AttentionGuideOptions, NormCapOptions, CoreArgs):
    """Every option of a training run (the core's first, then each aid's)."""

    def check(self) -> None:
        """ValueError for choices `train` cannot run with (train_vlm.py turns it into a usage error)."""
        if self.steps <= 0 or self.batch_size <= 0:
            raise ValueError("steps and batch_size must be positive")
        if self.complement_pairs not in COMPLEMENT_PAIRS:
            raise ValueError(f"complement_pairs must be one of {COMPLEMENT_PAIRS}, got {self.complement_pairs!r}")
        if self.max_minutes < 0 or self.probe_warmup < 0 or self.workers < 0:
            raise ValueError("max_minutes, probe_warmup and workers must be >= 0")
        if not 0 <= self.stop_at <= self.steps:
            raise ValueError(f"stop_at must lie in 0..steps ({self.steps}), got {self.stop_at}")
        if self.warmup_scenes not in WARMUP_SCENES:
            raise ValueError(f"warmup_scenes must be one of {WARMUP_SCENES}, got {self.warmup_scenes!r}")
        if (self.vision_steps > 0 or self.dense_aux_batch > 0) and self.aux_weight <= 0:
            raise ValueError(
                "vision_steps and dense_aux_batch train on the dense vision loss: they need aux_weight > 0"
            )
        if self.dense_aux_batch < 0 or self.probe_n < 1:
            raise ValueError("dense_aux_batch must be >= 0 and probe_n >= 1")
        if (self.reinit_vision or self.fresh_probe) and self.init is None:
            raise ValueError("reinit_vision and fresh_probe change how a run starts from init: give init")
        llm = get_preset(self.preset).llm
        if self.boost_scale <= 0 or any(not 0 <= i < llm.layers for i in self.boost_layers):
            raise ValueError(f"boost_scale must be > 0 and boost_layers in 0..{llm.layers - 1}")
        for aid in AIDS:
            aid.check(self, llm)
        family_mix(self.family_weights)

    @classmethod
    def from_dict(cls, values: dict) -> TrainArgs:
        """Args from JSON-like values (a recipe, or a run's args.json): lists become tuples, strings paths."""
        hints = typing.get_type_hints(cls)
        unknown = set(values) - set(hints)
        if unknown:
            raise ValueError(f"unknown training options: {', '.join(sorted(unknown))}")
        return cls(**{name: _as_type(hints[name], value) for name, value in values.items()})

    def to_dict(self) -> dict:
        """JSON-ready values (what a run writes to args.json)."""
        return {k: str(v) if isinstance(v, Path) else v for k, v in dataclasses.asdict(self).items()}


def _as_type(hint, value):
    """`value` as the field type `hint` says (float for a float field given an int, a tuple for a list...)."""
    if value is None:
        return None
    args = typing.get_args(hint)
    if hint is Path or Path in args:
        return Path(value)
    if typing.get_origin(hint) is tuple:
        return tuple(args[0](v) for v in value)
    if hint is bool:
        if not isinstance(value, bool):
            raise ValueError(f"expected true or false, got {value!r}")
        return value
    if hint is int and float(value) != int(value):
        raise ValueError(f"expected an integer, got {value!r}")
    return hint(value)
