"""One command's work: a model and a dataset -> an assets directory the main job, evaluation and serving read.

`prepare_assets` checks the data (columns, ids, images, splits) before writing anything, takes a latency
profile for the device (the one given, one the model already has for it, or a fresh measurement),
splits the data into train / val / test by a seeded hash of each question id, builds each split's
outcome table (resumable shards, local or Ray), its Pareto plot and feature cache, writes `assets.json`
(envs/asset_manifest.py) last and a short `summary.md`.
"""

from __future__ import annotations

import json
import os
import re
import time
import warnings
from pathlib import Path

import numpy as np

from envs.asset_manifest import (
    check_profile,
    model_shapes,
    profile_entry,
    read_manifest,
    read_profile_file,
    table_entry,
    write_manifest,
)
from envs.assets import Assets
from envs.atomic import atomic_path, write_json, write_text
from envs.latency import LatencyModel, profile_latency
from envs.oracle import pareto_plot
from envs.outcomes import OutcomeTable, build_outcomes
from envs.tasks.data import Sample
from envs.tasks.sources import SPLITS, Columns, DataError, check_samples, load_data, split_samples
from envs.vlm.checkpoint import EMBEDDED, load_model, weights_digest
from envs.vlm.crops import to_rgb
from envs.vlm.evaluate import all_configs
from envs.vlm.presets import PRESETS


def device_label(meta: dict) -> str:
    """A profile's name from its device: "cpu", or "cuda-" and the GPU's name (e.g. "cuda-nvidia-h100")."""
    device = str(meta.get("device", "cpu"))
    if not device.startswith("cuda"):
        return "cpu"
    name = re.sub(r"[^a-z0-9]+", "-", str(meta.get("device_name") or "").lower()).strip("-")
    return f"cuda-{name}" if name else "cuda"


def measure_profile(vlm, device: str, repeats: int = 5, warmup: int = 2) -> dict:
    """A fresh latency profile of `vlm` (as scripts/profile_latency.py writes, without its live check)."""
    import torch

    profile = profile_latency(vlm, repeats, warmup, 3)
    latency = LatencyModel.from_dict(profile["model"])
    k, b = max(vlm.cfg.knobs.top_k), max(vlm.cfg.knobs.blocks)
    high = next(r for r in profile["stages"] if r["tier"] == "high" and r["image"] == 0)
    profile["reference_full_ms"] = latency.predict(high["crops"], high["prompt_tokens"], k, b, 1)["total"]
    name = torch.cuda.get_device_name(torch.device(device)) if device.startswith("cuda") else "cpu"
    profile["meta"] = {"preset": vlm.cfg.name, "device": device, "device_name": name,
                       "threads": torch.get_num_threads(), "torch": torch.__version__,
                       "date": time.strftime("%Y-%m-%d %H:%M"), "repeats": repeats, "warmup": warmup,
                       "path": "plain", "shapes": model_shapes(vlm.cfg)}  # fmt: skip
    return profile


def _write_json(path: Path, data) -> None:
    write_json(path, data, end="\n")


def _model_root(model: str) -> Path:
    return EMBEDDED / model if model in PRESETS else Path(model)


def take_profile(vlm, model: str, device: str, profile: str | Path | None, out: Path) -> tuple[str, Path]:
    """The profile for this device, copied (with the model's shapes) to `out/profiles/<name>.json`."""
    if profile is not None:
        data = read_profile_file(profile)
        source = str(profile)
    else:
        data, source = None, ""
        root = _model_root(model)
        manifest = read_manifest(root)
        for entry in manifest["profiles"].values():
            if device_label({"device": entry.get("device"), "device_name": entry.get("device_name")}) == \
                    device_label({"device": device, "device_name": _device_name(device)}):  # fmt: skip
                data, source = read_profile_file(root / entry["file"]), str(root / entry["file"])
                break
        if data is None:
            print(f"no latency profile for {device}: measuring one (keep the machine quiet meanwhile)")
            data, source = measure_profile(vlm, device), "measured"
    check_profile(data, vlm.cfg, source)
    data.setdefault("meta", {})
    data["meta"].setdefault("shapes", model_shapes(vlm.cfg))
    data["meta"]["source"] = os.path.basename(source) if source != "measured" else source
    name = device_label(data["meta"])
    path = out / "profiles" / f"{name}.json"
    _write_json(path, data)
    return name, path


def _device_name(device: str) -> str | None:
    if not device.startswith("cuda"):
        return None
    import torch

    return torch.cuda.get_device_name(torch.device(device)) if torch.cuda.is_available() else None


def write_split(samples: list[Sample], out: Path, split: str) -> Path:
    """`out/data/<split>.jsonl`, a manifest of the split (in-memory images saved under `out/data/images`);
    image paths are relative to the manifest."""
    folder = out / "data"
    (folder / "images").mkdir(parents=True, exist_ok=True)
    lines = []
    for s in samples:
        if isinstance(s.image, Path | str):
            image = os.path.relpath(Path(s.image).resolve(), folder.resolve())
        else:
            safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", s.id)
            image = f"images/{safe}.png"
            if not (folder / image).is_file():
                with atomic_path(folder / image) as tmp:
                    to_rgb(s.image).save(tmp, format="PNG")
        lines.append(json.dumps({"id": s.id, "image": image, "question": s.question, "answers": list(s.answers),
                                 "family": s.family}))  # fmt: skip
    path = folder / f"{split}.jsonl"
    text = "\n".join(lines) + "\n"
    if not path.is_file() or path.read_text() != text:
        write_text(path, text)
    return path


def summary(manifest: dict, out: Path) -> str:
    """A short markdown summary of an assets directory: profile, and per split its size and the full and
    cheapest configs' accuracy and predicted latency."""
    name = manifest["default_profile"]
    prof = manifest["profiles"][name]
    lines = [f"# assets: {out.name}", "",
             f"model `{manifest['model']['path']}` (weights {manifest['model']['weights']}); profile `{name}` "
             f"({prof['device_name'] or prof['device']}, {prof['date']}; full-config reference request "
             f"{prof['reference_full_ms']:.1f} ms)", "",
             "| split | requests | failed | full config: accuracy | latency ms | cheapest config: accuracy | "
             "latency ms |", "|---|---|---|---|---|---|---|"]  # fmt: skip
    for split, entry in manifest["tables"].items():
        t = OutcomeTable.load(out / entry["file"])
        v = t.valid()
        if not len(v.sample_ids):
            lines.append(f"| {split} | {len(t.sample_ids)} | {int((~t.ok).sum())} | - | - | - | - |")
            continue
        mean_latency = v.latency.mean(0)
        full, cheap = int(np.argmax(mean_latency)), int(np.argmin(mean_latency))
        lines.append(
            f"| {split} | {len(t.sample_ids)} | {int((~t.ok).sum())} | {v.score[:, full].mean():.3f} | "
            f"{mean_latency[full]:.1f} | {v.score[:, cheap].mean():.3f} | {mean_latency[cheap]:.1f} |"
        )
    return "\n".join(lines) + "\n"


def prepare_assets(model: str, data: str, out: str | Path, device: str = "cpu", profile: str | Path | None = None,
                   fractions: tuple[float, float, float] = (0.6, 0.2, 0.2), split_seed: int = 0,
                   executor: str = "local", ray_address: str | None = None, columns: Columns | None = None,
                   features: bool = True, shard_size: int = 50, batch_size: int = 32,
                   progress: bool = True) -> Path:  # fmt: skip
    """Build (or resume) the assets directory `out` for `model` (a preset name or a model directory) over
    the dataset DATA string `data` (envs/tasks/sources.py); returns `out`."""
    out = Path(out)
    if model not in PRESETS and not (Path(model) / "config.json").is_file():
        raise FileNotFoundError(f"--model {model!r}: neither a preset {list(PRESETS)} nor a model directory")
    samples = load_data(data, columns)  # everything about the data is checked before anything is written
    check_samples(samples)
    splits = split_samples(samples, fractions, split_seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        vlm = load_model(model, device=device)
    spec = model if model in PRESETS else str(Path(model).resolve())
    if profile is not None:  # a profile of another model's shapes is refused before anything is written
        check_profile(read_profile_file(profile), vlm.cfg, str(profile))
    out.mkdir(parents=True, exist_ok=True)
    profile_name, profile_file = take_profile(vlm, model, device, profile, out)
    profile_data = read_profile_file(profile_file)
    configs = all_configs(vlm)
    manifest = {"format": 1,
                "model": {"path": model if model in PRESETS else os.path.relpath(Path(model).resolve(), out.resolve()),
                          "weights": weights_digest(model), "shapes": model_shapes(vlm.cfg)},
                "default_profile": profile_name,
                "profiles": {profile_name: profile_entry(profile_file, out, profile_data)},
                "tables": {},
                "data": {"source": data, "fractions": list(fractions), "split_seed": split_seed,
                         "questions": len(samples)}}  # fmt: skip
    for split in SPLITS:
        if not splits[split]:
            continue
        manifest_path = write_split(splits[split], out, split)
        table_dir = out / "tables" / split
        dataset = {"kind": "manifest", "path": str(manifest_path.resolve())}
        build_outcomes(spec, dataset, table_dir, profile_data["model"], configs, shard_size, batch_size, executor,
                       ray_address, 0.0, device, progress)  # fmt: skip
        table = OutcomeTable.load(table_dir)
        if not table.ok.any():
            raise DataError(f"every request of the {split} split failed; see the reasons in {table_dir}/shards")
        table.save_npz(table_dir / "table.npz")
        pareto_plot(table.valid(), table_dir / "pareto.png", f"{Path(model).name}: {split}")
        manifest["tables"][split] = table_entry(table_dir / "table.npz", out, table.meta, profile_name,
                                                {"manifest": os.path.relpath(manifest_path, out)})  # fmt: skip
    write_manifest(out, manifest)
    if features:
        assets = Assets(out)
        for split in manifest["tables"]:
            assets.backend(split)  # computes and caches the split's observation features
    write_text(out / "summary.md", summary(manifest, out))
    return out


def describe_directory(root: str | Path) -> Path:
    """Write `root/assets.json` for a model directory of the older layout (its `latency_cpu.json` and
    `outcomes/<split>.npz`), with each file's provenance."""
    root = Path(root)
    manifest = read_manifest(root)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        vlm = load_model(str(root))
    manifest["model"] = {"path": ".", "weights": weights_digest(root), "shapes": model_shapes(vlm.cfg)}
    for name, entry in list(manifest["profiles"].items()):
        manifest["profiles"][name] = profile_entry(root / entry["file"], root, read_profile_file(root / entry["file"]))
    for split, entry in list(manifest["tables"].items()):
        meta = OutcomeTable.load(root / entry["file"]).meta
        manifest["tables"][split] = table_entry(root / entry["file"], root, meta, entry["profile"])
    return write_manifest(root, manifest)
