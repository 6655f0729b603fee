"""A model's assets for the environments: the VLM, its latency profile and its outcome tables.

An assets directory (the embedded one of a preset name, a model directory, or a folder that
scripts/prepare_assets.py wrote) names its model, latency profiles and outcome tables in `assets.json`
(envs/asset_manifest.py; an older directory's `latency_cpu.json` and `outcomes/{train,val,test}.npz`
read as such a manifest). `Assets` loads the model and one profile, refuses tables of other weights or
timed with another profile, and turns a split into a replay backend the first time it is asked for;
`load_assets` caches that per model, so many environments of one model share one load.
"""

from __future__ import annotations

import functools
import os
import warnings
from pathlib import Path

import numpy as np

from envs.asset_manifest import (
    SPLITS,
    AssetsError,
    check_profile,
    check_table,
    latency_hash,
    read_manifest,
    read_profile_file,
    resolve_profile,
)
from envs.knob_env import LiveBackend, make_env, replay_backend
from envs.latency import LatencyModel
from envs.outcomes import OutcomeTable, dataset_samples
from envs.vlm.checkpoint import EMBEDDED, load_model, weights_digest
from envs.vlm.evaluate import Config
from envs.vlm.presets import PRESETS

QUICK_REQUESTS = {"val": 200, "test": 400}  # `quick`: the first requests of the held-out splits
BUDGET_REFERENCES = ("profile", "data")  # what budget fractions (tight, loose, ...) are fractions of


def assets_dir(model: str | Path) -> Path:
    """The directory of a model's assets: the embedded one for a preset name, else `model` itself."""
    return EMBEDDED / str(model) if str(model) in PRESETS else Path(model)


def profile_path(model: str | Path, profile: str | Path | None = None) -> Path:
    """A latency profile's file: `profile` itself if it is a file, else a profile the model's manifest names
    (or `<profile>.json` in its directory); by default the manifest's default profile (`latency_cpu.json`)."""
    root = assets_dir(model)
    return resolve_profile(root, read_manifest(root), profile)[1]


def model_spec(root: Path, manifest: dict, given: str | Path) -> str:
    """What `load_model` reads for an assets directory: `given` itself when the manifest's model is the
    directory ("."), a preset name, or the manifest's relative path resolved against the directory."""
    path = str(manifest["model"].get("path", "."))
    if path == ".":
        return str(given)
    if path in PRESETS:
        return path
    return os.path.normpath(root / path)


def table_file(tables: Path, split: str) -> Path:
    """A split's packed table under a --tables directory: build_outcomes' `<split>/table.npz`, or `<split>.npz`."""
    nested = tables / split / "table.npz"
    return nested if nested.is_file() or not (tables / f"{split}.npz").is_file() else tables / f"{split}.npz"


def read_profile(path: Path) -> tuple[LatencyModel, float]:
    """The latency model of a profile file and its full config's reference latency (ms)."""
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; see README (profile_latency)")
    profile = read_profile_file(path)
    return LatencyModel.from_dict(profile["model"]), float(profile["reference_full_ms"])


class Assets:
    """The VLM, its latency profile and outcome tables, and environments over them.

    `train`, `val` and `test` are the splits as replay backends (`val` is None where the model has no
    validation table), built on first access: features of a split are computed once and cached on disk.
    """

    def __init__(self, model: str | Path = "tiny", quick: bool = False, profile: str | Path | None = None,
                 tables: str | Path | None = None, allow_mismatch: bool = False,
                 budget_reference: str = "profile"):  # fmt: skip
        """`model`: a preset name (its embedded assets), a model directory or an assets directory. `quick`: only
        the first 200 validation and 400 test requests. `profile`: the latency profile, a file or a name the
        manifest gives (default: its `default_profile`). `tables`: a directory of outcome tables
        (`<split>/table.npz` as build_outcomes writes them, or `<split>.npz`) instead of the manifest's.
        `allow_mismatch`: warn about, rather than refuse, tables of other weights or another profile.
        `budget_reference`: budget fractions are of the profile's reference request at the full config
        ("profile"), or of the median full-config latency of the train split's requests ("data": for data
        whose images or questions differ from the reference request's)."""
        if budget_reference not in BUDGET_REFERENCES:
            raise ValueError(f"unknown budget reference {budget_reference!r}; choose one of {BUDGET_REFERENCES}")
        self.root, self.quick, self.allow_mismatch = assets_dir(model), quick, allow_mismatch
        if not self.root.is_dir():
            raise FileNotFoundError(f"unknown model {str(model)!r}: neither a preset {list(PRESETS)} nor a directory")
        self.manifest = read_manifest(self.root)
        self.tables = None if tables is None else Path(tables)
        if self.tables is not None and not self.tables.is_dir():
            raise FileNotFoundError(f"tables directory not found: {self.tables}")
        for split in ("train", "test"):
            if not self.table_path(split).is_file():
                raise FileNotFoundError(f"{self.table_path(split)} is missing; see README (build_outcomes)")
        self.model = model_spec(self.root, self.manifest, model)
        self.weights = weights_digest(self.model)
        recorded = self.manifest["model"].get("weights")
        if recorded not in (None, self.weights):
            message = (f"{self.root}: the model's weights ({self.weights}) are not those its assets were prepared "
                       f"for ({recorded}); prepare them again (scripts/prepare_assets.py)")  # fmt: skip
            if not allow_mismatch:
                raise AssetsError(message)
            warnings.warn(message, stacklevel=2)
        self.profile_name, self.profile_file = resolve_profile(self.root, self.manifest, profile)
        profile_data = read_profile_file(self.profile_file)
        self.latency_model = LatencyModel.from_dict(profile_data["model"])
        self.full_ms = float(profile_data["reference_full_ms"])
        self.profile_meta, self.latency_hash = profile_data.get("meta", {}), latency_hash(profile_data["model"])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            self.vlm = load_model(self.model)
        check_profile(profile_data, self.vlm.cfg, str(self.profile_file))
        self.budget_reference = budget_reference
        if budget_reference == "data":
            self.full_ms = self.data_full_ms()
        # the global crop's vision work: what a single-stage controller pays before it decides
        self.global_ms = sum(a + b for a, b in self.latency_model.per_crop.values())
        self.reuse_low = True  # the low tier reuses the VLM's own global-crop features

    def data_full_ms(self) -> float:
        """The median latency of the train split's requests at the full config (the largest knobs), as the
        profile in use predicts it from each request's shapes."""
        table = OutcomeTable.load(self.table_path("train"))
        self.check_table("train", table)  # its latencies are the profile's
        table = table.valid()
        knobs = self.vlm.cfg.knob_lists()
        full = Config(knobs["tier"][-1], max(knobs["top_k"]), max(knobs["blocks"]))
        if full not in table.configs or not len(table.sample_ids):
            raise ValueError(f"{self.table_path('train')} has no answered request at the full config {full}")
        return float(np.median(table.latency[:, table.configs.index(full)]))

    def table_path(self, split: str) -> Path:
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; choose one of {SPLITS}")
        if self.tables is not None:
            return table_file(self.tables, split)
        entry = self.manifest["tables"].get(split)
        return self.root / (entry["file"] if entry else f"outcomes/{split}.npz")

    def check_table(self, split: str, table: OutcomeTable | None = None) -> dict:
        """The split's table meta (of `table`, the split's table already loaded, if given), refused (or
        warned about) if of other weights or another profile."""
        path = self.table_path(split)
        meta = (table if table is not None else OutcomeTable.load(path)).meta
        check_table(meta, str(path), self.weights, self.latency_hash, self.profile_name, self.allow_mismatch)
        return meta

    def has_split(self, split: str) -> bool:
        return self.table_path(split).is_file()

    def first(self, split: str) -> int | None:
        """How many of a split's requests this run reads (None: all)."""
        return QUICK_REQUESTS.get(split) if self.quick else None

    def replay(self, split: str):
        """A replay backend over one split's outcome table (built anew; see `train`, `val`, `test`)."""
        if not self.has_split(split):
            raise FileNotFoundError(f"{self.table_path(split)} is missing; see README (build_outcomes)")
        self.check_table(split)
        return replay_backend(self.vlm, self.table_path(split), self.latency_model, first=self.first(split))

    def live(self, split: str, measure: bool = False) -> LiveBackend:
        """A live backend over one split's requests: the VLM runs each episode (`measure`: its latency
        measured end to end rather than predicted by the profile)."""
        if not self.has_split(split):
            raise FileNotFoundError(f"{self.table_path(split)} is missing; see README (build_outcomes)")
        meta = OutcomeTable.load(self.table_path(split)).meta["dataset"]
        entry = self.manifest["tables"].get(split, {}) if self.tables is None else {}
        if meta.get("kind") == "manifest" and not Path(meta["path"]).is_file() and "manifest" in entry:
            meta = {**meta, "path": str(self.root / entry["manifest"])}  # an assets directory that moved
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


def load_assets(model: str | Path = "tiny", quick: bool = False, profile: str | Path | None = None,
                tables: str | Path | None = None, allow_mismatch: bool = False,
                budget_reference: str = "profile") -> Assets:  # fmt: skip
    """`Assets(model, quick, profile, tables, allow_mismatch, budget_reference)`, loaded once per process:
    environments of one model share it. Treat the result as read-only (a run that changes features, e.g. for
    a light encoder, builds its own `Assets`)."""
    return _cached_assets(str(model), bool(quick), None if profile is None else str(profile),
                          None if tables is None else str(tables), bool(allow_mismatch), budget_reference)  # fmt: skip


@functools.lru_cache(maxsize=8)
def _cached_assets(model: str, quick: bool, profile: str | None, tables: str | None, allow: bool,
                   reference: str) -> Assets:  # fmt: skip
    return Assets(model, quick, profile, tables, allow, reference)


load_assets.cache_clear = _cached_assets.cache_clear
