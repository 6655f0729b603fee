"""Evaluate a saved policy on a fresh SynthVQA test split, against the oracle and the baselines.

    python scripts/evaluate.py --policy runs/ppo_two_stage_budget/policy.zip \
        --budgets uniform,tight,bimodal,trace:budgets.json --seed 7 --n 500 --out eval_seed7.json

The split's outcome table is built once (vision and layers 0-2 shared per sample and tier) and
cached under $KNOB_RL_CACHE (default ~/.cache/knob-rl). A policy_bc.zip beside the policy is
evaluated too. --controller-ms X charges X ms per request for the controller instead of measuring it
(the budget guard --guard-ms, by default X too): two evaluations of one seed then agree exactly.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from pathlib import Path

from agents.policy_eval import evaluate
from agents.report import markdown
from agents.serving import load_policy
from envs.assets import Assets, assets_dir, load_assets
from envs.budgets import BudgetError, Penalty, parse_distribution
from envs.outcomes import OutcomeTable, build_outcomes
from envs.tasks.synthvqa import dataset_spec
from envs.vlm.checkpoint import weights_digest
from envs.vlm.evaluate import all_configs


def test_table(assets: Assets, model_spec: str, seed: int, n: int) -> Path:
    root = Path(os.environ.get("KNOB_RL_CACHE", Path.home() / ".cache" / "knob-rl"))
    spec = json.dumps(dataset_spec(seed, n), sort_keys=True)
    key = hashlib.sha1(f"{Path(assets_dir(model_spec)).resolve()}|{weights_digest(model_spec)}|{spec}".encode())
    key = key.hexdigest()[:12]
    out = root / "outcomes" / f"synthvqa-{seed}-{n}-{key}"
    if not (out / "table.npz").is_file():
        print(f"building the outcome table of seed {seed} (n={n}) in {out}")
        build_outcomes(model_spec, dataset_spec(seed, n), out, assets.latency_model.to_dict(),
                       all_configs(assets.vlm))  # fmt: skip
        OutcomeTable.load(out).save_npz(out / "table.npz")
    return out / "table.npz"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--policy", type=Path, required=True)
    ap.add_argument("--budgets", default="uniform,tight,bimodal")
    ap.add_argument("--seed", type=int, required=True)
    ap.add_argument("--n", type=int, default=500)
    ap.add_argument("--episodes", type=int, default=500)
    ap.add_argument("--penalty", default="indicator")
    ap.add_argument("--penalty-weight", type=float, default=1.0)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--controller-ms", type=float, default=None,
                    help="charge this controller time (ms) per request instead of measuring it on the serving "
                         "path: two evaluations of one seed then give identical numbers")  # fmt: skip
    ap.add_argument(
        "--guard-ms",
        type=float,
        default=None,
        help="with --controller-ms: the budget guard's charged time (ms); default --controller-ms",
    )
    args = ap.parse_args(argv)
    if args.guard_ms is not None and args.controller_ms is None:
        ap.error("--guard-ms pins the guard's time only beside --controller-ms")
    for flag, value in (("--controller-ms", args.controller_ms), ("--guard-ms", args.guard_ms)):
        if value is not None and not value >= 0:
            ap.error(f"{flag} must be >= 0 ms, got {value}")
    try:
        for spec in args.budgets.split(","):
            parse_distribution(spec)  # fail before any work
        model, _ = load_policy(args.policy)
        table = test_table(load_assets(model.policy.vlm), model.policy.vlm, args.seed, args.n)
        report = evaluate(args.policy, args.budgets, args.episodes, args.seed, table=table,
                          penalty=Penalty(args.penalty, args.penalty_weight), controller_ms=args.controller_ms,
                          guard_ms=args.guard_ms)  # fmt: skip
    except (BudgetError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    meta, results = report["meta"], report["results"]
    meta["n"] = args.n
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"meta": meta, "results": results}, indent=1))
    args.out.with_suffix(".md").write_text(markdown(meta, results))
    print(markdown(meta, results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
