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

from envs.knobs import KnobSpace

PARTS = ("controller", "preprocess", "vision", "connector", "prefill", "decode")


PROFILE_QUESTION = "which letter is in the top left corner?"  # the reference request's question


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


def median_ms(fn, device: torch.device | str = "cpu", repeats: int = 10, warmup: int = 3) -> float:
    """Median wall time of `fn()` over `repeats` calls after `warmup` untimed ones, synchronising a GPU
    around each call so the time covers its kernels (the benchmarks' one timing loop)."""
    timer = StageTimer(device)
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        timer._sync()
        t0 = time.perf_counter()
        fn()
        timer._sync()
        times.append((time.perf_counter() - t0) * 1e3)
    return float(np.median(times))


def timed_prefix(model, image, question: str, tier: str, timer: StageTimer, run_prefix: bool = True):
    """Stage 1 of a request under `timer`: preprocess, vision, connector, and layers 0-2 (in "prefill")."""
    with timer.stage("preprocess"):
        pre = model.preprocess([image], [question], tier)
    with torch.no_grad():
        with timer.stage("vision"):
            features = model.encode_vision(pre.pixels())
        with timer.stage("connector"):
            prepared = model.connect(pre, features)
        if not run_prefix:
            return pre, prepared, None
        with timer.stage("prefill"):
            return pre, prepared, model.prefix(prepared)


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
    _, prepared, state = timed_prefix(model, image, question, tier, timer)
    gen = model.generate(state, model.layers_for(blocks), top_k, max_new_tokens, timer=timer, ignore_eos=ignore_eos)
    gen.blocks = blocks
    timer._sync()
    total = (time.perf_counter() - t0) * 1e3
    return TimedAnswer(
        gen, prepared.vision_tokens[0], prepared.prompt_tokens[0], prepared.n_crops[0], dict(timer.ms), total
    )


# ---------------------------------------------------------------------------------------------- profiles


def _fit_line(x: list[float], y: list[float]) -> tuple[float, float]:
    """Least-squares a + b*x; a constant when x does not vary."""
    x_arr, y_arr = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if np.ptp(x_arr) == 0:
        return float(np.median(y_arr)), 0.0
    b, a = np.polyfit(x_arr, y_arr, 1)
    return float(a), float(b)


def _stats(values: list[float]) -> dict[str, float]:
    return {"median_ms": float(np.median(values)), "p90_ms": float(np.percentile(values, 90))}


def full_tier_image(crop_size: int = 64) -> np.ndarray:
    """A noise image whose tiers reach 1 / 5 / 13 views at max-crops 0 / 4 / 12 (3 / 7 / 13 at a
    Molmo-layout model's 2 / 6 / 12): 1008 x 1344 px at a 336 px crop (MolmoE-1B's high tier then has
    its largest prompt). Sizes scale with the crop size."""
    h, w = 1008 * crop_size // 336, 1344 * crop_size // 336
    return (np.random.default_rng(0).random((h, w, 3)) * 255).astype(np.uint8)


def profile_images(crop_size: int = 64) -> list[np.ndarray]:
    """Noise images of several sizes and aspect ratios, so tiers yield several crop counts.

    Sizes scale with the crop size (the tiny preset's 64 px is the unit): a 336 px preset gets
    images up to 1260 px, so its high tier reaches its 12 crops as real photographs do.
    """
    rng = np.random.default_rng(0)
    sizes = [
        (round(h * crop_size / 64), round(w * crop_size / 64))
        for h, w in ((160, 160), (100, 220), (240, 120), (64, 64))
    ]
    return [(rng.random((h, w, 3)) * 255).astype(np.uint8) for h, w in sizes]


def profile_latency(model, repeats: int = 5, warmup: int = 2, new_tokens: int = 3, progress: bool = True) -> dict:
    """Measure every stage of the latency definition; return a profile (raw medians + fitted model)."""
    from tqdm import tqdm

    question = PROFILE_QUESTION
    knobs = model.cfg.knob_lists()
    images = profile_images(model.cfg.vision.crop_size)
    stage_rows, config_rows = [], []
    steps = [(t, i) for t in knobs["tier"] for i in range(len(images))]
    for tier, i in tqdm(steps, desc="profile", disable=not progress):
        runs = {p: [] for p in ("preprocess", "vision", "connector", "prefix")}
        for r in range(warmup + repeats):
            timer = StageTimer(model.device)
            _, prepared, state = timed_prefix(model, images[i], question, tier, timer)
            if r >= warmup:
                for p in ("preprocess", "vision", "connector"):
                    runs[p].append(timer.ms[p])
                runs["prefix"].append(timer.ms["prefill"])
        crops, tokens = prepared.n_crops[0], prepared.prompt_tokens[0]
        stage_rows.append({"tier": tier, "image": i, "crops": crops, "prompt_tokens": tokens,
                           **{p: _stats(v) for p, v in runs.items()}})  # fmt: skip
        if i != 0:
            continue  # knob-dependent stages are measured on the first image at every tier
        for k in knobs["top_k"]:
            for b in knobs["blocks"]:
                rest, per_token = [], []
                for r in range(warmup + repeats):
                    timer = StageTimer(model.device)
                    gen = model.generate(state, model.layers_for(b), k, new_tokens, timer=timer, ignore_eos=True)
                    if r >= warmup:
                        rest.append(timer.ms["prefill"])
                        per_token.append(timer.ms["decode"] / max(1, gen.decode_steps[0]))
                config_rows.append({"tier": tier, "top_k": k, "blocks": b, "prompt_tokens": tokens,
                                    "prefill_rest": _stats(rest), "decode_per_token": _stats(per_token)})  # fmt: skip
    profile = {"stages": stage_rows, "configs": config_rows}
    profile["model"] = LatencyModel.fit(profile).to_dict()
    return profile


@dataclass
class LatencyModel:
    """Predicts a request's latency parts from its shapes and knobs (fitted to a profile).

    preprocess, vision, connector: a + b * crops. Layers 0-2: a + b * prompt tokens. Layers 3.. and
    the first token: per (top_k, blocks), a + b * prompt tokens. Decode: per (top_k, blocks), a
    median per-token cost times the number of decode steps (tokens fed back after the first).
    """

    per_crop: dict[str, tuple[float, float]]
    prefix: tuple[float, float]
    prefill_rest: dict[str, tuple[float, float]]  # "k|b" -> (a, b)
    decode_per_token: dict[str, float]  # "k|b" -> ms

    @classmethod
    def fit(cls, profile: dict) -> LatencyModel:
        st = profile["stages"]
        crops = [r["crops"] for r in st]
        per_crop = {p: _fit_line(crops, [r[p]["median_ms"] for r in st]) for p in ("preprocess", "vision", "connector")}
        prefix = _fit_line([r["prompt_tokens"] for r in st], [r["prefix"]["median_ms"] for r in st])
        groups: dict[str, list[dict]] = {}
        for r in profile["configs"]:
            groups.setdefault(f"{r['top_k']}|{r['blocks']}", []).append(r)
        rest = {kb: _fit_line([r["prompt_tokens"] for r in g], [r["prefill_rest"]["median_ms"] for r in g])
                for kb, g in groups.items()}  # fmt: skip
        decode = {kb: float(np.median([r["decode_per_token"]["median_ms"] for r in g])) for kb, g in groups.items()}
        return cls(per_crop, prefix, rest, decode)

    def to_dict(self) -> dict:
        return {"per_crop": self.per_crop, "prefix": self.prefix, "prefill_rest": self.prefill_rest,
                "decode_per_token": self.decode_per_token}  # fmt: skip

    @classmethod
    def from_dict(cls, d: dict) -> LatencyModel:
        return cls({k: tuple(v) for k, v in d["per_crop"].items()}, tuple(d["prefix"]),
                   {k: tuple(v) for k, v in d["prefill_rest"].items()}, dict(d["decode_per_token"]))  # fmt: skip

    def predict(self, crops: int, prompt_tokens: int, top_k: int, blocks: int, decode_steps: int,
                controller_ms: float = 0.0) -> dict[str, float]:  # fmt: skip
        kb = f"{top_k}|{blocks}"
        if kb not in self.prefill_rest:
            raise ValueError(f"the latency profile has no config top_k={top_k}, blocks={blocks}")
        parts = {p: max(0.0, a + b * crops) for p, (a, b) in self.per_crop.items()}
        a0, b0 = self.prefix
        a1, b1 = self.prefill_rest[kb]
        parts["prefill"] = max(0.0, a0 + b0 * prompt_tokens) + max(0.0, a1 + b1 * prompt_tokens)
        parts["decode"] = self.decode_per_token[kb] * decode_steps
        parts["controller"] = controller_ms
        parts["total"] = sum(parts[p] for p in PARTS)
        return parts


class ConfigLatency:
    """Predicted latency of every config of a knob space (in `KnobSpace.config_index` order) from a
    request's shapes, vectorised.

    What a controller can know before any vision work: the crops and prompt tokens each tier would
    give (`KnobVLM.request_shapes`), through the latency model, with `decode_steps` tokens fed back
    (the answer's length is unknown beforehand; SynthVQA's one-word answers take one).
    """

    def __init__(self, model: LatencyModel, knobs: KnobSpace | dict, decode_steps: int = 1):
        space = KnobSpace.of(knobs)
        kbs = [f"{k}|{b}" for k in space.top_k for b in space.blocks]
        missing = [kb for kb in kbs if kb not in model.prefill_rest]
        if missing:
            raise ValueError(f"the latency profile has no configs top_k|blocks = {missing}")
        n_tiers = space.n_tier
        self.tier = np.repeat(np.arange(n_tiers), len(kbs))
        self.rest = np.array([model.prefill_rest[kb] for kb in kbs] * n_tiers)  # [c, 2]
        self.decode = np.array([model.decode_per_token[kb] for kb in kbs] * n_tiers) * decode_steps
        self.per_crop, self.prefix = np.array(list(model.per_crop.values())), np.array(model.prefix)  # [3, 2], [2]

    def __call__(self, crops, prompt_tokens) -> np.ndarray:
        """crops, prompt_tokens: [..., tiers] -> predicted total latency (ms) [..., configs], float64."""
        c = np.asarray(crops, dtype=np.float64)[..., self.tier, None]
        t = np.asarray(prompt_tokens, dtype=np.float64)[..., self.tier]
        vision = np.maximum(0.0, self.per_crop[:, 0] + self.per_crop[:, 1] * c).sum(-1)
        prefill = np.maximum(0.0, self.prefix[0] + self.prefix[1] * t)
        prefill = prefill + np.maximum(0.0, self.rest[:, 0] + self.rest[:, 1] * t)
        return vision + prefill + self.decode
