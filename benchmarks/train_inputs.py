"""Host time of a training step's inputs (scenes, crops, tokens, vision-token targets), and how many
steps per second `--workers` processes deliver.

    python benchmarks/train_inputs.py --out benchmarks/results/train_inputs_cpu.json

Without workers this host work runs in the training loop between accelerator steps, so it bounds
the step rate. The recipe timed here is a typical one (batches of 32, complementary pairs, four
dense scenes per step); each tier is timed alone since the crops, and so the work, grow with it. A
step's inputs are a pure function of the step, so every timed call makes a different step.
"""

from __future__ import annotations

import argparse
import itertools
import json
import platform
import sys
import time
from pathlib import Path

import torch

from envs.latency import median_ms
from envs.vlm.checkpoint import build_model
from envs.vlm.presets import TIERS
from training.args import TrainArgs
from training.batches import StepMaker, step_inputs

RECIPE = dict(
    batch_size=32, full_steps=0, p_full=0.5, dense_aux_batch=4, complement_pairs="easy",
    family_weights=(0.4, 3, 2.5, 1, 2.5), steps=100_000,
)  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=8)
    ap.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--steps", type=int, default=24, help="steps drawn per worker count")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)
    model = build_model("tiny", device="meta")  # shapes and tokenizer only: no weights are needed here
    rows = []
    for i, tier in enumerate(TIERS):
        weights = tuple(float(j == i) for j in range(len(TIERS)))
        maker = StepMaker(TrainArgs(tier_weights=weights, **RECIPE), model.cfg, model.tokenizer)
        steps = itertools.count()
        ms = median_ms(lambda m=maker, s=steps: m[next(s)], repeats=args.repeats, warmup=1)
        rows.append({"tier": tier, "ms_per_step": ms})
    maker = StepMaker(TrainArgs(tier_weights=(0.4, 0.8, 1.6), **RECIPE), model.cfg, model.tokenizer)
    rates = []
    for workers in args.workers:
        t0 = time.perf_counter()
        for _ in step_inputs(maker, 0, args.steps, workers):
            pass
        rates.append({"workers": workers, "steps_per_s": args.steps / (time.perf_counter() - t0)})
    report = {"recipe": "batch 32, easy pairs, 4 dense scenes; tier weights 0.4 / 0.8 / 1.6 for the rates",
              "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads",
              "date": time.strftime("%Y-%m-%d"), "repeats": args.repeats, "tiers": rows, "rates": rates}  # fmt: skip
    print(f"inputs of one step, median of {args.repeats} steps (one process):")
    print("| tier | ms per step |\n|---|---|")
    for r in rows:
        print(f"| {r['tier']} | {r['ms_per_step']:.0f} |")
    print(f"\nsteps per second delivered, the recipe's tier mix, {args.steps} steps (includes worker start-up):")
    print("| workers | steps/s |\n|---|---|")
    for r in rates:
        print(f"| {r['workers']} | {r['steps_per_s']:.2f} |")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=1))
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
