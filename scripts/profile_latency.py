"""Profile every stage of the latency definition for every config, fit a latency model, check it live.

    python scripts/profile_latency.py --model tiny --device cpu --out envs/vlm/weights/tiny/latency_cpu.json
    python scripts/profile_latency.py --preset molmoe-1b --device cuda --dtype bfloat16 --fast --out profiles/h100.json

Latency depends on shapes, not weights, so `--preset` profiles a randomly initialised model. The
file records device, library versions and date, the raw medians and p90s, the fitted latency model
and its error (MAPE) against live end-to-end requests on held-out SynthVQA samples.

`--fast` profiles the plain path and then the static-shape fast path (envs/vlm/fast.py; CUDA graphs
on a GPU, `--compile` adds torch.compile of each layer) in one run. The file's top level is then the
fast path's profile, which the environments use; the plain one sits under "plain", and "speedup"
compares the two per stage.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import transformers

from envs.atomic import write_json
from envs.latency import LatencyModel, profile_latency, timed_answer
from envs.tasks.synthvqa import SPLIT_SEEDS, SynthVQA
from envs.threads import add_threads_flag, use_threads
from envs.vlm.checkpoint import build_model, load_model
from envs.vlm.errors import CheckpointError


def device_name(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    return f"{platform.processor() or platform.machine()} ({torch.get_num_threads()} threads)"


def live_error(model, latency_model: LatencyModel, n: int, seed: int = 0) -> dict:
    """MAPE of predicted vs measured end-to-end latency on held-out samples with random configs.

    On the graph-captured fast path each request runs once untimed first: the profile's medians are of
    replays, and a first call that captures graphs measures the capture, not the request."""
    rng = np.random.default_rng(seed)
    knobs = model.cfg.knob_lists()
    errors: dict[str, list[float]] = {"total": [], "vision": [], "prefill": [], "decode": []}
    for s in SynthVQA(SPLIT_SEEDS["val"], n):
        tier = knobs["tier"][rng.integers(len(knobs["tier"]))]
        k, b = int(rng.choice(knobs["top_k"])), int(rng.choice(knobs["blocks"]))
        if model.fast is not None and model.fast.graphs:
            # a shape's first request captures its graphs (a one-off a server pays at start-up, not per request)
            timed_answer(model, s.image, s.question, tier, k, b)
        live = timed_answer(model, s.image, s.question, tier, k, b)
        pred = latency_model.predict(live.crops, live.prompt_tokens, k, b, live.generation.decode_steps[0])
        measured = {**live.parts_ms, "total": live.total_ms}
        for part in errors:
            if measured[part] > 0:
                errors[part].append(abs(pred[part] - measured[part]) / measured[part])
    return {f"mape_{p}": float(np.mean(v)) for p, v in errors.items() if v} | {"n": n}


def profile_path(model, args) -> dict:
    """The profile of whichever path the model serves from now, with its reference request and live check."""
    profile = profile_latency(model, args.repeats, args.warmup, args.new_tokens)
    latency_model = LatencyModel.from_dict(profile["model"])
    k, b = max(model.cfg.knobs.top_k), max(model.cfg.knobs.blocks)
    high = [r for r in profile["stages"] if r["tier"] == "high" and r["image"] == 0][0]
    profile["reference_full_ms"] = latency_model.predict(high["crops"], high["prompt_tokens"], k, b, 1)["total"]
    if args.mape_n:
        profile["live_check"] = live_error(model, latency_model, args.mape_n)
    return profile


def speedups(plain: dict, fast: dict) -> dict[str, float]:
    """Median over the profile's rows of plain / fast time, per stage and per knob-dependent part."""
    out = {}
    for part in ("vision", "connector", "prefix"):
        out[part] = float(np.median([p[part]["median_ms"] / max(f[part]["median_ms"], 1e-9)
                                     for p, f in zip(plain["stages"], fast["stages"], strict=True)]))  # fmt: skip
    for part in ("prefill_rest", "decode_per_token"):
        out[part] = float(np.median([p[part]["median_ms"] / max(f[part]["median_ms"], 1e-9)
                                     for p, f in zip(plain["configs"], fast["configs"], strict=True)]))  # fmt: skip
    out["reference_full"] = plain["reference_full_ms"] / fast["reference_full_ms"]
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = ap.add_mutually_exclusive_group()
    src.add_argument("--model", help="tiny or a model directory")
    src.add_argument("--preset", help="profile a randomly initialised preset (e.g. molmoe-1b)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--new-tokens", type=int, default=3)
    ap.add_argument("--mape-n", type=int, default=60, help="held-out live requests to check the model (0 = skip)")
    ap.add_argument("--fast", action="store_true", help="profile the plain and the fast path in one run")
    ap.add_argument("--compile", action="store_true", help="with --fast: torch.compile each decoder layer")
    ap.add_argument("--bucket", type=int, default=64, help="with --fast: prompt lengths round up to this")
    ap.add_argument("--out", type=Path, required=True)
    add_threads_flag(ap)
    args = ap.parse_args(argv)
    use_threads(args.threads)
    if args.compile and not args.fast:
        ap.error("--compile applies to the fast path: add --fast")
    if args.bucket < 1:
        ap.error("--bucket must be at least 1 token")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        ap.error("--device cuda asked for, but torch sees no CUDA device")
    dtype = getattr(torch, args.dtype)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if args.preset:
                model = build_model(args.preset, device=args.device, dtype=dtype)
            else:
                model = load_model(args.model or "tiny", device=args.device, dtype=dtype)
    except (CheckpointError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    t0 = time.time()
    profile = profile_path(model, args)
    if args.fast:
        plain = profile
        model.use_fast_path(args.bucket, graphs=args.device.startswith("cuda"), compile_layers=args.compile)
        profile = profile_path(model, args)
        profile["plain"] = plain
        profile["speedup"] = speedups(plain, profile)
        print("plain / fast, medians:", json.dumps(profile["speedup"]))
    profile["meta"] = {
        "model": args.preset or args.model or "tiny", "preset": model.cfg.name, "device": args.device,
        "device_name": device_name(args.device), "threads": torch.get_num_threads(), "dtype": args.dtype,
        "torch": torch.__version__,
        "transformers": transformers.__version__, "date": time.strftime("%Y-%m-%d %H:%M"),
        "repeats": args.repeats, "warmup": args.warmup, "new_tokens": args.new_tokens,
        "path": "fast" if args.fast else "plain", "graphs": bool(args.fast and args.device.startswith("cuda")),
        "compile": args.compile, "bucket": args.bucket if args.fast else None, "minutes": (time.time() - t0) / 60,
    }  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_json(args.out, profile)
    print(f"full-config latency (reference request) {profile['reference_full_ms']:.1f} ms")
    if "live_check" in profile:
        print("latency model vs live:", json.dumps({k: round(v, 3) for k, v in profile["live_check"].items()}))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
