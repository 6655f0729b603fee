"""A model directory's assets as data: `assets.json` names its latency profiles and outcome tables.

    {"format": 1,
     "model": {"path": ".", "weights": "bc1400662797ce56", "shapes": {...}},
     "default_profile": "cpu",
     "profiles": {"cpu": {"file": "latency_cpu.json", "device": "cpu", "device_name": "x86_64 (2 threads)",
                          "date": "2026-11-27 13:19", "shapes": {...}, "latency": "5f0c..."}},
     "tables": {"train": {"file": "outcomes/train.npz", "dataset": {...}, "content": "9a1e...",
                          "weights": "bc1400662797ce56", "profile": "cpu", "latency": "5f0c...", "requests": 600}}}

Paths are relative to the manifest's folder (`model.path` may also be a preset name), so a folder of
assets moves as one. A table records the hash of the latency model it was timed with (`latency`) and of
the weights that answered it (`weights`): `check_table` refuses a table used with another profile or
other weights. A directory without `assets.json` but with `latency_cpu.json` and
`outcomes/{train,val,test}.npz` (the older layout) reads as the manifest those files imply.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import warnings
from pathlib import Path

from envs.atomic import write_json

MANIFEST = "assets.json"
FORMAT = 1
LEGACY_PROFILE = "latency_cpu.json"
SPLITS = ("train", "val", "test")


class AssetsError(ValueError):
    """Assets that do not belong together (a table of other weights or another profile) or a bad manifest."""


def digest(data: bytes) -> str:
    return hashlib.sha1(data).hexdigest()[:16]


def file_hash(path: str | Path) -> str:
    """A short content hash of a file."""
    return digest(Path(path).read_bytes())


def latency_hash(latency_model: dict) -> str:
    """A short hash of a fitted latency model (a profile's `model`, a table's `latency_model`)."""
    return digest(json.dumps(latency_model, sort_keys=True).encode())


def model_shapes(cfg) -> dict:
    """What a latency profile depends on: the model's layer shapes and knob values."""
    lm, vis = cfg.llm, cfg.vision
    return {"preset": cfg.name, "d_model": lm.d_model, "layers": lm.layers, "heads": lm.heads,
            "experts": lm.experts, "expert_hidden": lm.expert_hidden, "vision_width": vis.width,
            "vision_layers": vis.layers, "crop_size": vis.crop_size, "patch_size": vis.patch_size,
            "knobs": cfg.knob_lists()}  # fmt: skip


def threads_of(meta: dict) -> int | None:
    """The CPU threads a profile was measured with (its `threads`, or the count in its device name)."""
    if meta.get("threads"):
        return int(meta["threads"])
    m = re.search(r"\((\d+) threads\)", str(meta.get("device_name", "")))
    return int(m.group(1)) if m else None


def read_profile_file(path: str | Path) -> dict:
    """A profile file written by scripts/profile_latency.py (or prepare_assets), checked for its fitted model."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"latency profile not found: {path}")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise AssetsError(f"{path} is not JSON: {e}") from None
    if not isinstance(data, dict) or "model" not in data or "reference_full_ms" not in data:
        raise AssetsError(f"{path} is not a latency profile (no 'model' and 'reference_full_ms'); "
                          "make one with scripts/profile_latency.py")  # fmt: skip
    return data


def check_profile(profile: dict, cfg, source: str) -> None:
    """Refuse a profile measured on a model of other shapes or other knob values than `cfg`."""
    meta = profile.get("meta", {})
    want = model_shapes(cfg)
    shapes = meta.get("shapes")
    if shapes is not None:
        diff = sorted(k for k in want if json.dumps(shapes.get(k)) != json.dumps(want[k]))
        if diff:
            raise AssetsError(
                f"{source} was measured on a model of other shapes ({', '.join(diff)} differ: "
                f"{ {k: shapes.get(k) for k in diff} } vs this model's { {k: want[k] for k in diff} })"
            )
    elif meta.get("preset") not in (None, cfg.name):
        raise AssetsError(f"{source} was measured on preset {meta['preset']!r}, this model is {cfg.name!r}")
    knobs = cfg.knob_lists()
    need = {f"{k}|{b}" for k in knobs["top_k"] for b in knobs["blocks"]}
    missing = sorted(need - set(profile["model"].get("prefill_rest", {})))
    if missing:
        raise AssetsError(f"{source} has no latency for top_k|blocks {missing[:5]}: measured on another model")


def profile_entry(path: Path, root: Path, profile: dict) -> dict:
    """A manifest's record of one profile file."""
    meta = profile.get("meta", {})
    return {"file": os.path.relpath(path, root), "device": meta.get("device", "unknown"),
            "device_name": meta.get("device_name"), "date": meta.get("date"), "threads": threads_of(meta),
            "shapes": meta.get("shapes"), "reference_full_ms": profile["reference_full_ms"],
            "latency": latency_hash(profile["model"])}  # fmt: skip


def table_entry(path: Path, root: Path, meta: dict, profile_name: str, extra: dict | None = None) -> dict:
    """A manifest's record of one packed outcome table (`meta`: the table's own meta)."""
    return {"file": os.path.relpath(path, root), "dataset": meta["dataset"], "content": file_hash(path),
            "weights": meta.get("weights"), "profile": profile_name, "latency": latency_hash(meta["latency_model"]),
            "requests": meta["n"], **(extra or {})}  # fmt: skip


def legacy_manifest(root: Path) -> dict:
    """The manifest an older model directory implies: `latency_cpu.json` as "cpu", `outcomes/<split>.npz`."""
    manifest = {"format": FORMAT, "model": {"path": "."}, "profiles": {}, "tables": {}}
    if (root / LEGACY_PROFILE).is_file():
        manifest["profiles"]["cpu"] = {"file": LEGACY_PROFILE, "device": "cpu"}
        manifest["default_profile"] = "cpu"
    for split in SPLITS:
        if (root / "outcomes" / f"{split}.npz").is_file():
            manifest["tables"][split] = {"file": f"outcomes/{split}.npz", "profile": "cpu"}
    return manifest


def read_manifest(root: str | Path) -> dict:
    """`root/assets.json`, or the manifest an older layout implies."""
    root = Path(root)
    path = root / MANIFEST
    if not path.is_file():
        return legacy_manifest(root)
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise AssetsError(f"{path} is not JSON: {e}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise AssetsError(f"{path} is not an assets manifest of format {FORMAT}")
    for key in ("model", "profiles", "tables"):
        if not isinstance(manifest.get(key), dict):
            raise AssetsError(f"{path} has no {key!r} object")
    return manifest


def write_manifest(root: str | Path, manifest: dict) -> Path:
    """Write `root/assets.json` whole (a temporary file renamed into place)."""
    return write_json(Path(root) / MANIFEST, manifest, end="\n")


def resolve_profile(root: Path, manifest: dict, profile: str | Path | None) -> tuple[str, Path]:
    """The name and file of a profile: `profile` a file, a name in the manifest, or `<name>.json` in `root`;
    by default the manifest's `default_profile` (else the one the train table was timed with)."""
    if profile is None:
        name = manifest.get("default_profile") or manifest["tables"].get("train", {}).get("profile")
        if name is None or name not in manifest["profiles"]:
            raise FileNotFoundError(f"{root} names no latency profile ({MANIFEST}: profiles); "
                                    "see docs/own_model_and_data.md")  # fmt: skip
        return name, root / manifest["profiles"][name]["file"]
    if Path(profile).is_file():
        return Path(profile).stem, Path(profile)
    if str(profile) in manifest["profiles"]:
        return str(profile), root / manifest["profiles"][str(profile)]["file"]
    name = str(profile) if str(profile).endswith(".json") else f"{profile}.json"
    if (root / name).is_file():
        return Path(name).stem, root / name
    raise FileNotFoundError(f"{root / name} is missing: no latency profile {str(profile)!r} (give a file, or one "
                            f"of the profiles {root} names: {sorted(manifest['profiles'])})")  # fmt: skip


def check_table(meta: dict, source: str, weights: str, latency: str, profile_name: str,
                allow_mismatch: bool = False) -> None:  # fmt: skip
    """Refuse (or with `allow_mismatch`, warn about) a table answered by other weights or timed with
    another latency model than the profile in use."""
    problems = []
    if meta.get("weights") not in (None, weights):
        problems.append(f"it was answered by other weights ({meta['weights']}, the model's are {weights})")
    if "latency_model" in meta and latency_hash(meta["latency_model"]) != latency:
        problems.append(f"it was timed with another latency profile than {profile_name!r}; retime it with "
                        f"scripts/build_outcomes.py --retime or pass the profile it was built with")  # fmt: skip
    if not problems:
        return
    message = f"outcome table {source}: " + "; ".join(problems)
    if not allow_mismatch:
        raise AssetsError(message + " (--allow-mismatch uses it anyway)")
    warnings.warn(message, stacklevel=3)
