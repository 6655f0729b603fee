"""A model's assets for the environments: the VLM, its latency profile and its outcome tables.

A model directory (the embedded one of a preset name, or any path) holds the weights, a latency
profile (`latency_cpu.json`: the latency model and the full config's reference latency) and
`outcomes/{train,val,test}.npz`. `Assets` loads the model and profile, and turns a split into a
replay backend the first time it is asked for; `load_assets` caches that per model, so many
environments of one model share one load.
"""

from __future__ import annotations

import functools
import json
import warnings
from pathlib import Path

from envs.knob_env import LiveBackend, make_env, replay_backend
from envs.latency import LatencyModel
from envs.outcomes import OutcomeTable, dataset_samples
from envs.vlm.checkpoint import EMBEDDED, load_model
from envs.vlm.presets import PRESETS

PROFILE = "latency_cpu.json"
SPLITS = ("train", "val", "test")
QUICK_REQUESTS = {"val": 200, "test": 400}  # `quick`: the first requests of the held-out splits


def assets_dir(model: str | Path) -> Path:
    """The directory of a model's assets: the embedded one for a preset name, else `model` itself."""
    return EMBEDDED / str(model) if str(model) in PRESETS else Path(model)


def profile_path(model: str | Path, profile: str | Path | None = None) -> Path:
    """A latency profile's file: `profile` itself if it is a file, else `<profile>.json` (or `<profile>`, if it
    ends in .json) in the model's directory; by default the model's `latency_cpu.json`."""
    if profile is None:
        return assets_dir(model) / PROFILE
    if Path(profile).is_file():
        return Path(profile)
    name = str(profile) if str(profile).endswith(".json") else f"{profile}.json"
    return assets_dir(model) / name


def read_profile(path: Path) -> tuple[LatencyModel, float]:
    """The latency model of a profile file and its full config's reference latency (ms)."""
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; see README (profile_latency)")
    profile = json.loads(path.read_text())
    return LatencyModel.from_dict(profile["model"]), float(profile["reference_full_ms"])


class Assets:
    """The VLM, its latency profile and outcome tables, and environments over them.

    `train`, `val` and `test` are the splits as replay backends (`val` is None where the model has no
    validation table), built on first access: features of a split are computed once and cached on disk.
    """

    def __init__(self, model: str | Path = "tiny", quick: bool = False, profile: str | Path | None = None):
        """`model`: a preset name (its embedded assets) or a model directory. `quick`: only the first 200
        validation and 400 test requests. `profile`: the latency profile, a path or a name in the model's
        directory (default `latency_cpu.json`)."""
        self.root, self.quick = assets_dir(model), quick
        if not self.root.is_dir():
            raise FileNotFoundError(f"unknown model {str(model)!r}: neither a preset {list(PRESETS)} nor a directory")
        for split in ("train", "test"):
            if not self.table_path(split).is_file():
                raise FileNotFoundError(f"{self.table_path(split)} is missing; see README (build_outcomes)")
        self.latency_model, self.full_ms = read_profile(profile_path(model, profile))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            self.vlm = load_model(str(model))
        # the global crop's vision work: what a single-stage controller pays before it decides
        self.global_ms = sum(a + b for a, b in self.latency_model.per_crop.values())
        self.reuse_low = True  # the low tier reuses the VLM's own global-crop features

    def table_path(self, split: str) -> Path:
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; choose one of {SPLITS}")
        return self.root / "outcomes" / f"{split}.npz"

    def has_split(self, split: str) -> bool:
        return self.table_path(split).is_file()

    def first(self, split: str) -> int | None:
        """How many of a split's requests this run reads (None: all)."""
        return QUICK_REQUESTS.get(split) if self.quick else None

    def replay(self, split: str):
        """A replay backend over one split's outcome table (built anew; see `train`, `val`, `test`)."""
        if not self.has_split(split):
            raise FileNotFoundError(f"{self.table_path(split)} is missing; see README (build_outcomes)")
        return replay_backend(self.vlm, self.table_path(split), self.latency_model, first=self.first(split))

    def live(self, split: str, measure: bool = False) -> LiveBackend:
        """A live backend over one split's requests: the VLM runs each episode (`measure`: its latency
        measured end to end rather than predicted by the profile)."""
        if not self.has_split(split):
            raise FileNotFoundError(f"{self.table_path(split)} is missing; see README (build_outcomes)")
        meta = OutcomeTable.load(self.table_path(split)).meta["dataset"]
        return LiveBackend(self.vlm, dataset_samples(meta, 0, self.first(split)), self.latency_model, measure)

    @functools.cached_property
    def train(self):
        return self.replay("train")

    @functools.cached_property
    def val(self):
        return self.replay("val") if self.has_split("val") else None

    @functools.cached_property
    def test(self):
        return self.replay("test")

    def backend(self, split: str):
        """The cached replay backend of a split."""
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; choose one of {SPLITS}")
        backend = getattr(self, split)
        if backend is None:
            raise FileNotFoundError(f"{self.table_path(split)} is missing; see README (build_outcomes)")
        return backend

    def env(self, kind, backend, budgets, penalty, controller_ms=0.0, guard=None, skip_guarded=False):
        """A `kind` ("two_stage" or "single_stage") environment over `backend`, shaped for this model."""
        return make_env(kind, backend, budgets, self.full_ms, self.vlm.cfg, penalty, controller_ms,
                        self.global_ms, self.reuse_low, guard, skip_guarded)  # fmt: skip


def load_assets(model: str | Path = "tiny", quick: bool = False, profile: str | Path | None = None) -> Assets:
    """`Assets(model, quick, profile)`, loaded once per process: environments of one model share it. Treat the
    result as read-only (a run that changes features, e.g. for a light encoder, builds its own `Assets`)."""
    return _cached_assets(str(model), bool(quick), None if profile is None else str(profile))


@functools.lru_cache(maxsize=8)
def _cached_assets(model: str, quick: bool, profile: str | None) -> Assets:
    return Assets(model, quick, profile)


load_assets.cache_clear = _cached_assets.cache_clear
