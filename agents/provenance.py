"""What a saved policy was trained with, recorded inside its zip: model, profile, tables, controller charge.

`attach` adds `knob_rl_assets.json` to a policy zip (Stable-Baselines3 ignores the extra file):

    {"model": {"path": "../my_model", "weights": "1f2e..."}, "assets": "../assets",
     "profile": {"name": "cuda-h100", "file": "profiles/cuda-h100.json", "latency": "5f0c...",
                 "device": "cuda", "threads": 1, "reference_full_ms": 41.2},
     "tables": {"train": {"file": "tables/train/table.npz", "content": "9a1e..."}},
     "controller_ms": 1.0, "guard_ms": 1.0}

The model's and the assets directory's paths are relative to the zip's folder (a preset's are its
name), profiles' and tables' relative to the assets directory, so a run directory moves with its assets
and no absolute path is stored. `model_of` resolves the model again and checks its weights.
"""

from __future__ import annotations

import json
import os
import zipfile
from pathlib import Path

from envs.asset_manifest import AssetsError, file_hash, threads_of
from envs.assets import assets_dir
from envs.vlm.checkpoint import weights_digest
from envs.vlm.presets import PRESETS

RECORD = "knob_rl_assets.json"


def _rel(path: str | Path, base: Path) -> str:
    return os.path.relpath(Path(path).resolve(), base.resolve())


def record(assets, policy_dir: Path, controller_ms: float, guard_ms: float | None) -> dict:
    """The record of a run's `Assets` (envs/assets.py), with paths relative to `policy_dir`."""
    preset = assets.model in PRESETS
    embedded = preset and assets.root == assets_dir(assets.model)  # a preset's own assets: kept by name
    tables = {}
    for split in ("train", "val", "test"):
        if assets.has_split(split):
            path = assets.table_path(split)
            tables[split] = {"file": _rel(path, assets.root), "content": file_hash(path)}
    return {"model": {"path": assets.model if preset else _rel(assets.model, policy_dir), "weights": assets.weights},
            "assets": assets.model if embedded else _rel(assets.root, policy_dir),
            "profile": {"name": assets.profile_name, "file": _rel(assets.profile_file, assets.root),
                        "latency": assets.latency_hash, "device": assets.profile_meta.get("device"),
                        "threads": threads_of(assets.profile_meta), "reference_full_ms": assets.full_ms},
            "budget_reference": assets.budget_reference,
            "tables": tables, "controller_ms": float(controller_ms),
            "guard_ms": None if guard_ms is None else float(guard_ms)}  # fmt: skip


def attach(zip_path: str | Path, rec: dict) -> None:
    """Add the record to a freshly saved policy zip."""
    with zipfile.ZipFile(zip_path, "a") as z:
        if RECORD in z.namelist():
            raise ValueError(f"{zip_path} already holds a {RECORD}")
        z.writestr(RECORD, json.dumps(rec, indent=1))


def read(zip_path: str | Path) -> dict | None:
    """A policy zip's record, or None for a policy saved without one."""
    with zipfile.ZipFile(zip_path) as z:
        if RECORD not in z.namelist():
            return None
        return json.loads(z.read(RECORD))


def resolve(zip_path: str | Path, rel: str) -> str:
    """A recorded path (relative to the zip's folder) as a path from here; a preset name stays a name."""
    if rel in PRESETS:
        return rel
    return os.path.relpath(Path(zip_path).resolve().parent / rel)


def in_assets(zip_path: str | Path, rec: dict, rel: str) -> Path:
    """A recorded profile or table file (relative to the recorded assets directory) as a path from here."""
    return assets_dir(resolve(zip_path, rec["assets"])) / rel


def model_of(zip_path: str | Path, rec: dict) -> str:
    """The recorded model, found again beside the zip and checked to hold the same weights."""
    spec = resolve(zip_path, rec["model"]["path"])
    if spec not in PRESETS and not Path(spec).is_dir():
        raise FileNotFoundError(f"{zip_path} was trained on the model at {spec}, which is not there (the path is "
                                "kept relative to the policy's folder: move them together)")  # fmt: skip
    found = weights_digest(spec)
    if found != rec["model"]["weights"]:
        raise AssetsError(f"{zip_path} was trained on weights {rec['model']['weights']}; {spec} now holds {found}")
    return spec
