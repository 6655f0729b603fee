"""Record every sample x every config once: answer, score and latency parts (the outcome table).

    python scripts/build_outcomes.py --model tiny --seed 2 --n 1000 --out outcomes/test \
        [--profile FILE] [--executor local|ray] [--export table.jsonl]
    python scripts/build_outcomes.py --retime outcomes/test --profile FILE --out outcomes/test_retimed

Also packs the table into OUT/table.npz, the compact form replay environments read.
Resumable: killing it at any moment and running the same command again completes the table with
exactly the rows a clean run gives. `--executor ray` runs shards as Ray tasks on the cluster at
--ray-address (or a local one). Also writes OUT/pareto.png.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from envs.asset_manifest import AssetsError, read_profile_file
from envs.oracle import pareto_plot
from envs.outcomes import OutcomeTable, build_outcomes, export_jsonl, retime_outcomes
from envs.tasks.synthvqa import dataset_spec
from envs.threads import add_threads_flag, use_threads
from envs.vlm.checkpoint import EMBEDDED, load_model
from envs.vlm.errors import CheckpointError
from envs.vlm.evaluate import Config
from envs.vlm.presets import PRESETS, TIERS

PROFILE_NAME = "latency_cpu.json"


def default_profile(model: str) -> Path:
    """The CPU profile that ships beside a model directory."""
    return (EMBEDDED / model if model in PRESETS else Path(model)) / PROFILE_NAME


def latency_model_of(profile: Path) -> dict:
    """The fitted latency model in a profile written by scripts/profile_latency.py, read and checked by
    `read_profile_file`; ValueError (AssetsError) if the file is missing or not such a profile."""
    try:
        return read_profile_file(profile)["model"]
    except FileNotFoundError as e:
        raise AssetsError(f"{e}; make one with scripts/profile_latency.py") from None


def pack(out: Path, title: str) -> OutcomeTable:
    """OUT/table.npz (what replay environments read) and OUT/pareto.png from a complete table."""
    table = OutcomeTable.load(out)
    table.save_npz(out / "table.npz")
    pareto_plot(table.valid(), out / "pareto.png", title)
    return table


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="tiny")
    data = ap.add_mutually_exclusive_group()
    data.add_argument("--seed", type=int, help="SynthVQA split seed")
    data.add_argument("--manifest", type=Path, help="a VQA JSONL manifest instead of SynthVQA")
    ap.add_argument("--n", type=int, default=1000, help="SynthVQA samples")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--profile", type=Path, help=f"latency profile (default: {PROFILE_NAME} beside the model)")
    ap.add_argument("--executor", choices=["local", "ray"], default="local")
    ap.add_argument("--ray-address", help="an existing Ray cluster (default: start a local one)")
    ap.add_argument("--gpus-per-task", type=float, default=0.0)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--shard-size", type=int, default=50)
    ap.add_argument("--batch-size", type=int, default=50)
    ap.add_argument("--export", type=Path, help="also write the table as sorted JSONL rows")
    ap.add_argument("--retime", type=Path, metavar="SRC", help="copy the table SRC with --profile's latencies")
    add_threads_flag(ap)
    args = ap.parse_args(argv)
    use_threads(args.threads)
    if args.retime is not None:
        return retime(args)
    if args.seed is None and args.manifest is None:
        ap.error("give --seed (SynthVQA) or --manifest")
    if args.n <= 0 or args.shard_size <= 0:
        ap.error("--n and --shard-size must be positive")
    try:
        latency = latency_model_of(args.profile or default_profile(args.model))
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    dataset = dataset_spec(args.seed, args.n)
    if args.manifest:
        dataset = {"kind": "manifest", "path": str(args.manifest.resolve())}
    try:
        model = load_model(args.model)
    except CheckpointError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    k = model.cfg.knob_lists()
    configs = [Config(t, top, b) for t in TIERS for top in k["top_k"] for b in k["blocks"]]
    try:
        build_outcomes(args.model, dataset, args.out, latency, configs, args.shard_size, args.batch_size,
                       args.executor, args.ray_address, args.gpus_per_task, args.device)  # fmt: skip
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    table = pack(args.out, f"{args.model}: {args.out.name}")
    if args.export:
        export_jsonl(args.out, args.export)
    print(f"{table.ok.sum()} samples ok, {(~table.ok).sum()} failed; wrote {args.out}")
    return 0


def retime(args) -> int:
    if args.profile is None:
        print(
            "error: --retime needs --profile FILE (a latency profile from scripts/profile_latency.py)", file=sys.stderr
        )
        return 2
    try:
        retime_outcomes(args.retime, args.out, latency_model_of(args.profile))
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    pack(args.out, f"{args.out.name} (retimed)")
    print(f"retimed {args.retime} with {args.profile}; wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
