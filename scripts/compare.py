"""Several runs side by side: one table and one plot (two-stage vs single-stage, variants, penalties).

python scripts/compare.py runs/ppo_two_stage_budget runs/ppo_single_stage_mlp --out runs/compare
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from envs.atomic import atomic_path, write_text


def load(run: Path) -> dict:
    path = run / "eval.json" if run.is_dir() else run
    if not path.is_file():
        raise FileNotFoundError(f"no eval.json in {run}")
    return json.loads(path.read_text())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", type=Path)
    ap.add_argument("--out", type=Path, default=Path("runs/compare"))
    args = ap.parse_args(argv)
    try:
        reports = {str(r): load(r) for r in args.runs}
    except (FileNotFoundError, json.JSONDecodeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    rows = []
    for run, rep in reports.items():
        meta = rep["meta"]
        encoder = meta.get("global_view", {}).get("encoder", "vlm")
        variant = meta["variant"] + (f", {encoder} encoder" if encoder != "vlm" else "")
        name = f"{meta['policy']}/{variant} ({Path(run).name})"
        for dist, block in rep["results"].items():
            policy = "ppo" if "ppo" in block else "policy"
            r = block[policy]
            gain = block.get("_paired", {}).get(f"{policy} - best_static")  # reports without paired differences
            rows.append((name, dist, r["accuracy"], r["violation_rate"], r["mean_latency_ms"], r["mean_reward"],
                         r["controller_ms"], block["best_static"]["mean_reward"],
                         f"{gain['mean']:+.3f} ({gain['se']:.3f})" if gain else "n/a",
                         r.get("violation_rate_feasible", float("nan")),
                         r.get("violation_rate_reachable", float("nan")), r.get("guarded_fraction", 0.0)))  # fmt: skip
    lines = ["| run | budgets | accuracy | violation rate | mean latency ms | mean reward | controller ms | "
             "best static reward | minus best static, paired (SE) | violation rate where a config fits | "
             "... with the controller's (or guard's) time | served by the guard |",
             "|---" * 12 + "|"]  # fmt: skip
    lines += [f"| {r[0]} | {r[1]} | " + " | ".join(x if isinstance(x, str) else f"{x:.3f}" for x in r[2:]) + " |"
              for r in rows]  # fmt: skip
    args.out.mkdir(parents=True, exist_ok=True)
    write_text(args.out / "compare.md", "\n".join(lines) + "\n")
    print("\n".join(lines))

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = list(dict.fromkeys(r[0] for r in rows))
    dists = list(dict.fromkeys(r[1] for r in rows))
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4))
    width = 0.8 / len(runs)
    for i, run in enumerate(runs):
        vals = [next((r[5] for r in rows if r[0] == run and r[1] == d), 0) for d in dists]
        ax1.bar([j + i * width for j in range(len(dists))], vals, width, label=run)
        pts = [(r[4], r[2]) for r in rows if r[0] == run]
        ax2.scatter([p[0] for p in pts], [p[1] for p in pts], label=run)
    for j, d in enumerate(dists):  # the bar to beat: the best static config (the first run's, per distribution)
        static = next(r[7] for r in rows if r[1] == d)
        ax1.hlines(static, j - width / 2, j + 0.8 - width / 2, colors="k", linewidth=1.5,
                   label="best static config" if j == 0 else None)  # fmt: skip
    ax1.set_xticks([j + 0.4 - width / 2 for j in range(len(dists))], dists)
    ax1.set_ylabel("mean reward")
    ax2.set_xlabel("mean latency (ms)")
    ax2.set_ylabel("accuracy")
    ax2.legend(*ax1.get_legend_handles_labels(), fontsize=7, loc="lower right")  # the scatter has room
    ax1.set_title("mean reward per budget distribution")
    ax2.set_title("accuracy against latency (one point per distribution)")
    fig.tight_layout()
    with atomic_path(args.out / "compare.png") as tmp:
        fig.savefig(tmp, dpi=90)
    print(f"wrote {args.out / 'compare.md'} and {args.out / 'compare.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
