"""Knob-elastic training of a preset on SynthVQA, then its block ranking.

Every batch samples a config: a tier, a router top-k, and a random subset of layers 3..L-1 of a
size from the preset's blocks list (LayerDrop-style), so every one of the 75 configs stays usable
whatever ranking picks the layers later. With probability `p_full` the batch uses the full config
instead, which anchors the best config's accuracy (the "sandwich" idea of slimmable networks).
The first `full_steps` train the full config only (progressive shrinking, as in Once-for-All):
with random small configs from the start, the model took far longer to start using the image.
A dense auxiliary loss (`envs/tasks/dense_labels.py`) tells every vision token what it shows;
the first `vision_steps` train the vision encoder and connector on it alone, which is cheap
(no LLM) and gives the LLM legible features to learn from.
Read top to bottom: args, setup/resume, loop, ranking, save.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

from envs.tasks.dense_labels import CLASSES, COLOUR_CLASSES, IGNORE, token_targets
from envs.tasks.dense_scenes import make_dense_sample
from envs.tasks.synthvqa import FAMILIES, PAIR_MODES, PRESENCE_LOOKS, SPLIT_SEEDS, SynthVQA, complement, make_sample
from envs.vlm.attention_guide import (
    AttentionGuide,
    answer_positions,
    asked_colour_positions,
    colour_reads,
    guide_masks,
    match_positions,
    presence_rows,
)
from envs.vlm.checkpoint import build_model, load_dir, save_model
from envs.vlm.colour_carry import CarryLoss, ColourCarry, asked_colours
from envs.vlm.evaluate import Config, accuracy_table, sweep
from envs.vlm.model import Preprocessed, preprocess_requests
from envs.vlm.presets import FIRST_KNOBBED_LAYER, TIERS, get_preset
from envs.vlm.ranking import compute_ranking

WARMUP_SCENES = ("task", "dense")
CARRY_LR_SCALE = 20.0  # the asked-colour readout's learning rate, in units of the model's
COMPLEMENT_PAIRS = ("none", *PAIR_MODES)  # see synthvqa.complement
DENSE_AUX_OFFSET = 10_000_000  # dense-scene indices of joint steps, apart from the warm-up's


@dataclass
class TrainArgs:
    out: Path = Path("runs/tiny_vlm")
    preset: str = "tiny"
    steps: int = 3000
    stop_at: int = 0  # > 0: end (rank, save) after this many steps; the lr schedule still spans `steps`
    max_minutes: float = 0.0  # > 0: end (checkpoint, rank, save) once training has run this long (a lent GPU's time)
    batch_size: int = 32
    lr: float = 2e-3
    min_lr: float = 1e-4
    warmup: int = 100
    weight_decay: float = 0.05
    grad_clip: float = 1.0
    p_full: float = 0.3
    full_steps: int = 500  # progressive shrinking: the first steps train the full config only
    aux_weight: float = 1.0  # weight of the dense vision-token loss (0 turns it off)
    vision_steps: int = 0  # first steps train vision encoder + connector on the dense loss only
    warmup_scenes: str = "task"  # what the vision steps see: "task" scenes or packed "dense" scenes
    dense_aux_batch: int = 0  # dense scenes added to each joint step's vision loss (keeps rare classes alive)
    probe_warmup: int = 0  # the first steps train the probe on detached vision tokens (for a probe started afresh)
    workers: int = 0  # > 0: processes that render and crop the next steps' scenes while this one trains (GPU)
    complement_pairs: str = "none"  # none | hard | easy | attribute | recolour: see synthvqa.complement
    norm_cap: float = 0.0  # > 0: penalise answer positions whose residual RMS exceeds this (see AnswerNormPenalty)
    norm_weight: float = 0.1
    attn_weight: float = 0.0  # > 0: guide where the answer position looks (see envs/vlm/attention_guide.py)
    attn_layers: tuple[int, ...] = (2,)  # layers whose `attn_head` is guided (0-2 run in every config)
    attn_head: int = 1
    attn_families: tuple[str, ...] = FAMILIES  # the families whose rows the guide points
    attn_presence: str = "match"  # presence rows look at the asked object, or "shape": all of its shape
    read_weight: float = 0.0  # > 0: read the looked-at colours at the guided layers (AttentionGuide, presence)
    early_weight: float = 0.0  # > 0: presence answers read at the guided layers too (AttentionGuide)
    ask_weight: float = 0.0  # > 0: guide `ask_head` of `ask_layers` to the presence question's colour word
    ask_layers: tuple[int, ...] = (1,)
    ask_head: int = 0
    match_weight: float = 0.0  # > 0: guide `match_head` of `match_layers` to the colour word on "yes", <bos> on "no"
    match_layers: tuple[int, ...] = (3,)
    match_head: int = 0
    carry_weight: float = 0.0  # > 0: a readout of its own names the asked colour at the answer position (colour_carry)
    carry_layers: tuple[int, ...] = (1, 2)  # after these layers
    boost_layers: tuple[int, ...] = ()  # these layers' MoE MLPs train at lr * boost_scale (see `param_groups`)
    boost_scale: float = 1.0
    tier_weights: tuple[float, float, float] = (1.0, 1.0, 1.0)  # low, medium, high
    family_weights: tuple[float, ...] = (1.0,) * len(FAMILIES)  # task mix, in FAMILIES order; equal: cycle
    seed: int = 0
    val_every: int = 250
    val_n: int = 250
    probe_n: int = 50  # validation images the vision probe's accuracy is measured on
    ckpt_every: int = 50
    ranking: str = "adalora"
    ranking_n: int = 256
    ship: Path | None = None  # also write the final model directory here
    init: Path | None = None  # start from this model directory's weights (e.g. to continue training)
    reinit_vision: bool = False  # with init: keep its LLM, start ViT and connector afresh
    device: str = "cpu"
    ship_dtype: str = "float16"

    def check(self) -> None:
        """ValueError for choices `train` cannot run with (train_vlm.py turns it into a usage error)."""
        if self.complement_pairs not in COMPLEMENT_PAIRS:
            raise ValueError(f"complement_pairs must be one of {COMPLEMENT_PAIRS}, got {self.complement_pairs!r}")
        if self.max_minutes < 0 or self.probe_warmup < 0 or self.workers < 0:
            raise ValueError("max_minutes, probe_warmup and workers must be >= 0")
        if not 0 <= self.stop_at <= self.steps:
            raise ValueError(f"stop_at must lie in 0..steps ({self.steps}), got {self.stop_at}")
        if self.warmup_scenes not in WARMUP_SCENES:
            raise ValueError(f"warmup_scenes must be one of {WARMUP_SCENES}, got {self.warmup_scenes!r}")
        llm = get_preset(self.preset).llm
        for name in ("attn", "ask", "match"):  # three guided heads, one rule
            weight, layers, head = (getattr(self, f"{name}_{part}") for part in ("weight", "layers", "head"))
            if weight < 0 or not layers or not 0 <= head < llm.heads:
                raise ValueError(
                    f"{name}_weight must be >= 0, {name}_layers non-empty and {name}_head in 0..{llm.heads - 1}"
                )
            if any(not 0 <= i < llm.layers for i in layers):
                raise ValueError(f"{name}_layers must lie in 0..{llm.layers - 1}, got {layers}")
        if not self.attn_families or any(f not in FAMILIES for f in self.attn_families):
            raise ValueError(f"attn_families must name some of {FAMILIES}, got {self.attn_families}")
        if self.attn_presence not in PRESENCE_LOOKS or self.read_weight < 0:
            raise ValueError(f"attn_presence must be one of {PRESENCE_LOOKS} and read_weight >= 0")
        if self.early_weight < 0:
            raise ValueError("early_weight must be >= 0")
        if self.carry_weight < 0 or not self.carry_layers or any(not 0 <= i < llm.layers for i in self.carry_layers):
            raise ValueError(f"carry_weight must be >= 0 and carry_layers non-empty in 0..{llm.layers - 1}")
        if self.boost_scale <= 0 or any(not 0 <= i < llm.layers for i in self.boost_layers):
            raise ValueError(f"boost_scale must be > 0 and boost_layers in 0..{llm.layers - 1}")
        family_mix(self.family_weights)


def sample_knobs(rng: np.random.Generator, cfg, args: TrainArgs, step: int = 0) -> tuple[str, int, list[int]]:
    n_layers = cfg.llm.layers
    w = np.array(args.tier_weights, dtype=np.float64)
    tier = TIERS[int(rng.choice(3, p=w / w.sum()))]
    if step < args.full_steps or rng.random() < args.p_full:
        return tier, cfg.llm.top_k, list(range(n_layers))
    top_k = int(rng.choice(cfg.knobs.top_k))
    blocks = int(rng.choice(cfg.knobs.blocks))
    kept = sorted(rng.choice(np.arange(FIRST_KNOBBED_LAYER, n_layers), size=blocks, replace=False).tolist())
    return tier, top_k, list(range(FIRST_KNOBBED_LAYER)) + kept


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


class AnswerNormPenalty:
    """An `on_layer` hook: mean squared relative excess of the residual RMS over `cap` at the
    positions that predict answer tokens, averaged over the layers run.

    Why: the model had parked the answer position of the questions it could not yet answer
    (presence, glyph, sum) in a huge constant state (RMS 130-360 against 20-45 for colour and count):
    after the final norm the prediction is the answer prior whatever the image or question, and the
    gradient of anything attention adds is divided by that norm, so those families never moved.
    """

    def __init__(self, prepared, cap: float):
        self.where = prepared.targets[:, 1:] != -100  # position t predicts token t + 1
        self.cap, self.terms, self.largest = cap, [], 0.0

    def __call__(self, layer: int, h_in: torch.Tensor, h_out: torch.Tensor) -> None:
        rms = h_out[:, :-1][self.where].float().norm(dim=-1) / math.sqrt(h_out.shape[-1])
        self.terms.append((torch.relu(rms - self.cap) / self.cap).pow(2).mean())
        self.largest = max(self.largest, float(rms.detach().max()))

    def value(self) -> torch.Tensor:
        return torch.stack(self.terms).mean()


def hooks(*each):
    """One `on_layer` hook calling every one of `each` that is not None (None if none is)."""
    live = [h for h in each if h is not None]
    if not live:
        return None

    def each_hook(layer: int, h_in: torch.Tensor, h_out: torch.Tensor) -> None:
        for hook in live:
            hook(layer, h_in, h_out)

    return each_hook


def family_mix(weights: tuple[float, ...]):
    """A `make(seed, index)` drawing each sample's family with these weights (FAMILIES order).

    Equal weights keep `make_sample`'s cycle (a balanced batch, as every split has). Unequal ones
    spend more of the batch on families still being learned: a glyph question is only answerable
    at the high tier, so a balanced batch holds about two useful ones.
    """
    w = np.asarray(weights, dtype=np.float64)
    if w.shape != (len(FAMILIES),) or (w < 0).any() or w.sum() <= 0:
        raise ValueError(
            f"family_weights needs {len(FAMILIES)} non-negative weights ({', '.join(FAMILIES)}), got {weights}"
        )
    if np.all(w == w[0]):
        return make_sample

    def make(seed: int, index: int):
        family = FAMILIES[int(np.random.default_rng([seed, index, 77]).choice(len(w), p=w / w.sum()))]
        return make_sample(seed, index, family)

    return make


def task_batch(make, seed: int, step: int, size: int, pairs: str = "none") -> list:
    """`size` samples of step `step`; with `pairs` other than "none" (a `synthvqa.complement` mode),
    each complementable sample is followed by its complement."""
    batch, i = [], 0
    while len(batch) < size:
        sample = make(seed, step * size + i)
        batch.append(sample)
        i += 1
        other = complement(sample, pairs) if pairs != "none" and len(batch) < size else None
        if other is not None:
            batch.append(other)
    return batch


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


@dataclass
class StepInputs:
    """The host's part of one training step: its knobs, scenes, crops, tokens and vision-token targets."""

    tier: str
    top_k: int
    layers: list[int]
    pre: Preprocessed
    targets: tuple[np.ndarray, np.ndarray]
    dense_pre: Preprocessed | None  # the dense scenes of a joint step's vision loss
    dense_targets: tuple[np.ndarray, np.ndarray] | None
    guide_masks: list | None = None  # the asked objects' vision tokens (attention guide), per sample
    colour_reads: np.ndarray | None = None  # the looked-at objects' colours (AttentionGuide's read)
    early_rows: np.ndarray | None = None  # the rows whose answer is also read at the guided layers
    ask_positions: torch.Tensor | None = None  # the presence questions' colour words (the ask guide)
    match_positions: torch.Tensor | None = None  # colour word on "yes", <bos> on "no" (the match guide)
    asked_colours: np.ndarray | None = None  # the colour each presence question asks (the carry loss)


class StepMaker(Dataset):
    """Step `i`'s inputs, a pure function of (args, i), so a resumed run replays exactly. Rendering and
    cropping a batch of 32 and 4 dense scenes takes 0.13 s at the high tier on one core here
    (`benchmarks/train_inputs.py`); `--workers` makes them in a `DataLoader` over step indices, off
    the critical path of a GPU step (0.47 s in stage 11)."""

    def __init__(self, args: TrainArgs, cfg, tokenizer):
        self.args, self.cfg, self.tokenizer = args, cfg, tokenizer
        self.task_sample = family_mix(args.family_weights)

    def __len__(self) -> int:
        return self.args.steps

    def __getitem__(self, step: int) -> StepInputs:
        args, seed = self.args, SPLIT_SEEDS["train"]
        rng = np.random.default_rng([args.seed, step])  # knobs depend on the step only: resumes replay exactly
        tier, top_k, layers = sample_knobs(rng, self.cfg, args, step)
        warm_up = step < args.vision_steps
        make = make_dense_sample if warm_up and args.warmup_scenes == "dense" else self.task_sample
        batch = task_batch(make, seed, step, args.batch_size, "none" if warm_up else args.complement_pairs)
        pre, targets = prepare_with_targets(
            self.cfg, self.tokenizer, batch, tier, None if warm_up else [s.answer for s in batch]
        )
        dense_pre = dense_targets = None
        if not warm_up and args.dense_aux_batch > 0:
            # task scenes show one small letter per glyph question: without these the letter features fade
            first = DENSE_AUX_OFFSET + step * args.dense_aux_batch
            dense_pre, dense_targets = prepare_with_targets(
                self.cfg,
                self.tokenizer,
                [make_dense_sample(seed, first + i) for i in range(args.dense_aux_batch)],
                tier,
            )
        masks = reads = None
        side = self.cfg.vision.tokens_per_side
        if not warm_up and args.attn_weight > 0:
            masks = guide_masks(batch, pre.crops, side, args.attn_families, args.attn_presence)
        early = ask = match = None
        needs_rows = not warm_up and (args.early_weight > 0 or args.match_weight > 0)
        checkable = presence_rows(batch, pre.crops, side) if needs_rows else None  # once for both users
        if not warm_up and args.read_weight > 0:
            reads = colour_reads(batch, pre.crops, side)
        if not warm_up and args.early_weight > 0:
            early = checkable
        if reads is not None or early is not None:
            masks = masks or [None] * len(batch)  # reads alone: no attention target
        length = max(len(t) for t in pre.token_ids)
        if not warm_up and args.ask_weight > 0:
            ask = asked_colour_positions(batch, pre, self.tokenizer, length)
        if not warm_up and args.match_weight > 0:
            match = match_positions(batch, pre, self.tokenizer, length, checkable)
        carry = asked_colours(batch) if not warm_up and args.carry_weight > 0 else None
        return StepInputs(
            tier, top_k, layers, pre, targets, dense_pre, dense_targets, masks, reads, early, ask, match, carry
        )


def _as_made(item):
    return item


def step_inputs(maker: StepMaker, start: int, end: int, workers: int):
    """Inputs of steps start..end-1 in order: made here, or by `workers` processes a few steps ahead."""
    if workers == 0:
        return (maker[step] for step in range(start, end))
    loader = DataLoader(
        maker, batch_size=None, sampler=range(start, end), num_workers=workers, collate_fn=_as_made, prefetch_factor=4
    )
    return iter(loader)


def lr_at(step: int, args: TrainArgs) -> float:
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    frac = (step - args.warmup) / max(1, args.steps - args.warmup)
    return args.min_lr + 0.5 * (args.lr - args.min_lr) * (1 + math.cos(math.pi * min(frac, 1.0)))


def validation_configs(model) -> list[Config]:
    k, b = model.cfg.knobs, model.cfg.knobs
    return [
        Config(t, top, blk)
        for t in TIERS
        for top, blk in ((max(k.top_k), max(b.blocks)), (min(k.top_k), min(b.blocks)))
    ]


def save_checkpoint(path: Path, model, probe, opt, step: int, carry: ColourCarry | None = None) -> None:
    """Atomic: a kill at any moment leaves the previous checkpoint intact."""
    tmp = path.with_suffix(".tmp")
    state = {"model": model.state_dict(), "probe": probe.state_dict(), "opt": opt.state_dict(), "step": step}
    torch.save(state | ({} if carry is None else {"carry": carry.state_dict()}), tmp)
    os.replace(tmp, path)


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


def load_probe(probe: VisionProbe, init: Path) -> None:
    """Continue the vision probe of the run that trained `init`: a fresh probe's loss (about 14, against
    under 1 trained) sends large, random gradients into the vision encoder for the first hundred steps.
    Looks for `init/probe.pt` (saved beside each run's model), then the run's `checkpoint.pt` beside `init`."""
    if not continue_head(probe, "vision probe", init, "probe", PROBE_FILE):
        print(f"no vision probe beside {init}: it starts afresh")


def param_groups(model, probe: VisionProbe, args: TrainArgs) -> list[dict]:
    """AdamW groups: decayed matrices, undecayed norms/biases/embeddings, the probe, and the MoE MLPs of
    `boost_layers` at `boost_scale` times the rate. Why boost: a presence check is an equality of two
    colours, which an MLP computes; with both in layer 2's input the early answer stayed at ln 2 for
    1100 steps at lr 2.5e-4 (run 25) and fell to 0.2-0.3 with that MLP at 10 times the rate (run 26)."""
    boosted = tuple(f"llm.layers.{i}.mlp." for i in args.boost_layers)
    groups = {(False, True): [], (False, False): [], (True, True): [], (True, False): []}
    for name, p in model.named_parameters():
        groups[(name.startswith(boosted), p.ndim >= 2 and "embed" not in name)].append(p)  # () matches none
    out = [
        {"params": params, "weight_decay": args.weight_decay if decay else 0.0}
        | ({"lr_scale": args.boost_scale} if boost else {})
        for (boost, decay), params in groups.items()
        if params or not boost  # the two plain groups always, so old checkpoints' optimiser states still load
    ]
    return out + [{"params": list(probe.parameters()), "weight_decay": 0.0}]


def train(args: TrainArgs) -> Path:
    args.check()
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "args.json").write_text(json.dumps(dataclasses.asdict(args), default=str, indent=1))
    model = build_model(args.preset, seed=args.seed)
    if args.init:
        init = load_dir(args.init)
        if init.cfg.to_dict() != model.cfg.to_dict():
            raise ValueError(f"{args.init} is a {init.cfg.name} model with other shapes than preset {args.preset}")
        keep = {
            k: v
            for k, v in init.state_dict().items()
            if not (args.reinit_vision and k.startswith(("vit.", "connector.")))
        }
        model.load_state_dict(keep, strict=not args.reinit_vision)
    model = model.to(args.device).train()
    probe = VisionProbe(model.cfg.llm.d_model).to(args.device)
    carry = ColourCarry(model.cfg.llm.d_model).to(args.device) if args.carry_weight > 0 else None  # training-only
    if args.init and not args.reinit_vision:
        load_probe(probe, args.init)
    if carry is not None and args.init:  # where the run that trained `init` carried the asked colour too
        continue_head(carry, "asked-colour readout", args.init, "carry")
    opt = torch.optim.AdamW(param_groups(model, probe, args), lr=args.lr, betas=(0.9, 0.95))
    if carry is not None:
        # a fresh readout at the model's fine-tuning rate needs thousands of steps to grow (run 25's first
        # 250 steps: 0.12 -> 0.35), and until it has, its gradient teaches the model little
        opt.add_param_group({"params": list(carry.parameters()), "weight_decay": 0.0, "lr_scale": CARRY_LR_SCALE})
    ckpt = args.out / "checkpoint.pt"
    start = 0
    if ckpt.exists():
        state = torch.load(ckpt, map_location=args.device, weights_only=True)
        model.load_state_dict(state["model"])
        probe.load_state_dict(state["probe"])
        if (carry is not None) != ("carry" in state):  # the optimiser's groups would not match either
            raise ValueError(
                f"{ckpt} was written with other --carry-weight options: resume with those or use a new --out"
            )
        if carry is not None:
            carry.load_state_dict(state["carry"])
        opt.load_state_dict(state["opt"])
        start = state["step"]
        print(f"resumed from {ckpt} at step {start}")
    writer = SummaryWriter(str(args.out / "tb"))
    val = list(SynthVQA(SPLIT_SEEDS["val"], args.val_n))
    t0 = time.time()
    end = args.stop_at or args.steps
    bar = tqdm(range(start, end), initial=start, total=end, desc="train")
    inputs = step_inputs(StepMaker(args, model.cfg, model.tokenizer), start, end, args.workers)
    for step, step_in in zip(bar, inputs, strict=True):
        tier, top_k, layers, pre = step_in.tier, step_in.top_k, step_in.layers, step_in.pre
        warm_up = step < args.vision_steps
        for g in opt.param_groups:
            g["lr"] = lr_at(step, args) * g.get("lr_scale", 1.0)
        prepared = model.connect(pre, model.encode_vision(pre.pixels()))
        # a fresh probe's loss is large and random: while it learns, its gradients stay out of the ViT
        probe_only = (lambda t: t.detach()) if step < args.probe_warmup else (lambda t: t)
        aux = probe.loss(probe_only(prepared.image_tokens), step_in.targets) if args.aux_weight > 0 else torch.zeros(())
        if step_in.dense_pre is not None:
            aux = aux + probe.loss(probe_only(vision_tokens(model, step_in.dense_pre)), step_in.dense_targets)
        if warm_up:
            loss, shown = aux, {}  # the LLM is not run: vision warm-up
        else:
            norm = AnswerNormPenalty(prepared, args.norm_cap) if args.norm_cap > 0 else None
            guide = None
            if step_in.guide_masks is not None:
                guide = AttentionGuide(
                    model,
                    pre,
                    prepared,
                    step_in.guide_masks,
                    args.attn_layers,
                    args.attn_head,
                    step_in.colour_reads,
                    step_in.early_rows,
                )
            ask, match = (
                None if where is None else AttentionGuide(model, pre, prepared, None, layers_, head, positions=where)
                for where, layers_, head in (
                    (step_in.ask_positions, args.ask_layers, args.ask_head),
                    (step_in.match_positions, args.match_layers, args.match_head),
                )
            )
            carried = None
            if step_in.asked_colours is not None:
                carried = CarryLoss(carry, answer_positions(prepared.targets), step_in.asked_colours, args.carry_layers)
            answer = model.answer_loss(prepared, layers, top_k, on_layer=hooks(norm, guide, ask, match, carried))
            loss, shown = answer + args.aux_weight * aux, {"answer": answer.item()}
            terms = []  # (name shown, TensorBoard tag, loss term, weight, more scalars); none where nothing ran
            if guide is not None and guide.terms:
                terms.append(
                    ("attn", "attention_guide", guide.value(), args.attn_weight, {"attention_mass": guide.mass})
                )
            if guide is not None and guide.read_terms:
                more = {"colour_read_accuracy": guide.read_accuracy}
                terms.append(("read", "colour_read", guide.read_value(), args.read_weight, more))
            if guide is not None and guide.early_terms:
                terms.append(("early", "early_answer", guide.early_value(), args.early_weight, {}))
            for name, g, weight in (("ask", ask, args.ask_weight), ("match", match, args.match_weight)):
                if g is not None and g.terms:
                    terms.append((name, f"{name}_guide", g.value(), weight, {f"{name}_mass": g.mass}))
            if carried is not None and carried.terms:
                more = {"carry_accuracy": carried.accuracy}
                terms.append(("carry", "colour_carry", carried.value(), args.carry_weight, more))
            for name, tag, term, weight, more in terms:
                loss = loss + weight * term
                shown[name] = term.item()
                writer.add_scalar(f"train/{tag}", shown[name], step)
                for key, value in more.items():
                    writer.add_scalar(f"train/{key}", value, step)
            writer.add_scalar("train/loss", shown["answer"], step)
            if norm is not None:
                penalty = norm.value()
                loss = loss + args.norm_weight * penalty
                shown["norm"] = penalty.item()
                writer.add_scalar("train/norm_penalty", shown["norm"], step)
                writer.add_scalar("train/answer_rms_max", norm.largest, step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        opt.step()
        shown["aux"] = aux.item()
        bar.set_postfix({k: f"{v:.3f}" for k, v in shown.items()} | {"tier": tier, "k": top_k, "d": len(layers)})
        writer.add_scalar("train/aux_loss", shown["aux"], step)
        writer.add_scalar("train/grad_norm", float(gnorm), step)
        writer.add_scalar("train/lr", lr_at(step, args), step)
        writer.add_scalar("train/depth", len(layers), step)
        if (step + 1) % args.ckpt_every == 0 or step + 1 == end:
            save_checkpoint(ckpt, model, probe, opt, step + 1, carry)
        if (step + 1) % args.val_every == 0 or step + 1 == end:
            model.eval()
            for t, groups in probe_report(model, probe, val[: args.probe_n]).items():
                for group, acc in groups.items():
                    writer.add_scalar(f"probe/{t}/{group}", acc, step + 1)
                tqdm.write(f"step {step + 1} probe {t}: " + " ".join(f"{g} {a:.2f}" for g, a in groups.items()))
            if not warm_up:  # answers only once the LLM trains
                configs = validation_configs(model)
                _, em, _ = sweep(model, val, configs, progress=False)
                for row in accuracy_table([s.family for s in val], configs, em):
                    tag = f"{row['tier']}_k{row['top_k']}_b{row['blocks']}"
                    writer.add_scalar(f"val/{tag}", row["accuracy"], step + 1)
                    for fam, acc in row["by_family"].items():
                        writer.add_scalar(f"val_family/{tag}/{fam}", acc, step + 1)
                    tqdm.write(f"step {step + 1} {tag}: {row['accuracy']:.3f} {json.dumps(row['by_family'])}")
            model.train()
        if args.max_minutes > 0 and time.time() - t0 > 60 * args.max_minutes:
            save_checkpoint(ckpt, model, probe, opt, step + 1, carry)
            end = step + 1
            tqdm.write(f"stopped at step {end} of {args.steps}: --max-minutes {args.max_minutes} reached")
            break
    writer.add_scalar("train/minutes", (time.time() - t0) / 60, end)
    writer.close()

    model.eval()
    calib = [(s.image, s.question, s.answer) for s in SynthVQA(SPLIT_SEEDS["calibration"], args.ranking_n)]
    model.ranking = compute_ranking(model, args.ranking, calib, tier="high")
    print(f"block ranking ({model.ranking.method}): {model.ranking.order}")
    out = save_model(model, args.out / "model", dtype=getattr(torch, args.ship_dtype))
    torch.save(probe.state_dict(), out / PROBE_FILE)  # training-only (22 KB), read by a later --init
    if args.ship:
        save_model(model, args.ship, dtype=getattr(torch, args.ship_dtype))
        torch.save(probe.state_dict(), args.ship / PROBE_FILE)  # a stage from the shipped model continues it
    return out
