"""Accuracy of every config of the model's knob space on a fresh SynthVQA split, with a heat map beside the JSON.

    python scripts/eval_vlm.py --model tiny --seed 7 --n 2000 --out reports/tiny_eval_seed7.json

Writes {"configs": [{"tier", "top_k", "blocks", "accuracy", "by_family"}, ...], "meta": {...}} and
FILE.png: accuracy over (top_k, blocks) per tier, overall and per family.
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

import numpy as np

from envs.atomic import atomic_path, write_json
from envs.outcomes import OutcomeTable
from envs.tasks.synthvqa import TRAINING_SEEDS, SynthVQA, dataset_spec
from envs.threads import add_threads_flag, use_threads
from envs.vlm.checkpoint import load_model
from envs.vlm.errors import CheckpointError
from envs.vlm.evaluate import Config, accuracy_table, all_configs, sweep


def heat_map(rows: list[dict], cfg, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    families = ["overall", *sorted(rows[0]["by_family"])]
    tiers, ks, bs = cfg.knob_lists()["tier"], cfg.knob_lists()["top_k"], cfg.knob_lists()["blocks"]
    fig, axes = plt.subplots(len(families), len(tiers), figsize=(3.2 * len(tiers), 2.6 * len(families)), squeeze=False)
    for r, fam in enumerate(families):
        for c, tier in enumerate(tiers):
            grid = np.zeros((len(ks), len(bs)))
            for row in rows:
                if row["tier"] == tier:
                    acc = row["accuracy"] if fam == "overall" else row["by_family"][fam]
                    grid[ks.index(row["top_k"]), bs.index(row["blocks"])] = acc
            ax = axes[r][c]
            ax.imshow(grid, vmin=0, vmax=1, cmap="viridis", origin="lower")
            for i in range(len(ks)):
                for j in range(len(bs)):
                    ax.text(j, i, f"{grid[i, j]:.2f}", ha="center", va="center", fontsize=7,
                            color="white" if grid[i, j] < 0.6 else "black")  # fmt: skip
            ax.set_xticks(range(len(bs)), bs)
            ax.set_yticks(range(len(ks)), ks)
            ax.set_title(f"{fam} - {tier}", fontsize=9)
            if r == len(families) - 1:
                ax.set_xlabel("blocks")
            if c == 0:
                ax.set_ylabel("top-k")
    fig.suptitle(title)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=90)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--seed", type=int, required=True, help="split seed (fresh: not one of the training seeds)")
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--batch-size", type=int, default=50)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--outcomes", type=Path, help="score from an outcome table of this split instead of running")
    add_threads_flag(ap)
    args = ap.parse_args(argv)
    use_threads(args.threads)
    if args.n <= 0:
        ap.error("--n must be positive")
    if args.seed in TRAINING_SEEDS:
        print(f"warning: seed {args.seed} is a training split seed", file=sys.stderr)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = load_model(args.model)
    except CheckpointError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    configs = all_configs(model)
    t0 = time.time()
    if args.outcomes:
        table = OutcomeTable.load(args.outcomes)
        if table.meta.get("dataset") != dataset_spec(args.seed, args.n):
            print(f"error: {args.outcomes} is not the table of SynthVQA seed {args.seed}, n={args.n}", file=sys.stderr)
            return 2
        if table.configs != configs:
            print(f"error: {args.outcomes} was built with other configs than this model's", file=sys.stderr)
            return 2
        families, em, vqa = table.families, table.exact, table.score
    else:
        samples = list(SynthVQA(args.seed, args.n))
        families = [s.family for s in samples]
        _, em, vqa = sweep(model, samples, configs, args.batch_size)
    rows = accuracy_table(families, configs, em)
    k = model.cfg.knobs
    full = configs.index(Config("high", max(k.top_k), max(k.blocks)))
    meta = {"model": str(args.model), "seed": args.seed, "n": args.n, "metric": "exact match",
            "vqa_accuracy_full": float(vqa[:, full].mean()), "minutes": (time.time() - t0) / 60,
            "ranking": model.ranking.method}  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_json(args.out, {"meta": meta, "configs": rows})
    heat_map(rows, model.cfg, args.out.with_suffix(".png"), f"{args.model}: SynthVQA seed {args.seed}, n={args.n}")
    print(f"full config accuracy {rows[full]['accuracy']:.3f}; wrote {args.out} and {args.out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
