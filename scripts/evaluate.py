"""Evaluate a saved policy on a split of its assets, or on a fresh SynthVQA split, against the oracle
and the baselines.

    python scripts/evaluate.py --policy runs/own/policy.zip --assets ASSETS --split test \
        --budgets uniform,tight --out runs/own/eval_test.json
    python scripts/evaluate.py --policy runs/ppo_two_stage_budget/policy.zip \
        --budgets uniform,tight,bimodal,trace:budgets.json --seed 7 --n 500 --out eval_seed7.json

Without --seed the policy is evaluated on --split of --assets (default: the assets, profile and tables
it was trained with, as its zip records them). With --seed a fresh SynthVQA split's outcome table is
built once and cached under $KNOB_RL_CACHE (default ~/.cache/knob-rl). A policy_bc.zip beside the
policy is evaluated too. The controller is charged what training charged it (recorded in the zip);
--measure-controller measures it on this machine instead, and --controller-ms X pins it (the budget
guard --guard-ms, by default X too). Writes OUT (.json), OUT.md (with the run's time and peak memory)
and OUT.png (accuracy and violations against the budget), each naming the assets, profile and table.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from pathlib import Path

from agents import provenance
from agents.policy_eval import evaluate
from agents.report import markdown, plot
from agents.serving import load_policy
from envs.assets import Assets, assets_dir, load_assets
from envs.atomic import write_text
from envs.budgets import BudgetError, Penalty, parse_distribution
from envs.outcomes import OutcomeTable, build_outcomes
from envs.tasks.synthvqa import dataset_spec
from envs.threads import add_threads_flag, use_threads
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
    ap.add_argument("--policy", type=Path, required=True, help="a saved controller (train_ppo.py's policy.zip)")
    ap.add_argument("--budgets", default="uniform,tight,bimodal",
                    help="comma-separated budget distributions (uniform, log_uniform, tight, loose, bimodal, "
                         "trace:FILE)")  # fmt: skip
    ap.add_argument(
        "--assets", type=Path, help="an assets directory (scripts/prepare_assets.py --out); default the policy's own"
    )
    ap.add_argument("--split", choices=["train", "val", "test"], default="test", help="the assets' split to use")
    ap.add_argument("--profile", help="the latency profile: a file or a name in the assets' manifest; default the "
                                      "one the policy was trained with")  # fmt: skip
    ap.add_argument("--tables", type=Path, help="outcome tables (SPLIT/table.npz) instead of the assets' own")
    ap.add_argument(
        "--allow-mismatch",
        action="store_true",
        help="warn about, rather than refuse, tables of other weights or another profile",
    )
    ap.add_argument("--seed", type=int, help="evaluate on a fresh SynthVQA split of this seed instead")
    ap.add_argument("--n", type=int, default=500, help="with --seed: the SynthVQA split's requests")
    ap.add_argument("--episodes", type=int, default=500, help="episodes per budget distribution")
    ap.add_argument("--penalty", default="indicator", help="the reward's penalty: indicator or relative")
    ap.add_argument("--penalty-weight", type=float, default=1.0, help="the penalty's weight")
    ap.add_argument(
        "--measure-controller",
        action="store_true",
        help="measure the controller's time on this machine rather than charge what training did",
    )
    ap.add_argument("--out", type=Path, required=True, help="the report's JSON file (.md and .png beside it)")
    add_threads_flag(ap)
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
    use_threads(args.threads)
    t0 = time.time()
    try:
        for spec in args.budgets.split(","):
            parse_distribution(spec)  # fail before any work
        table = None
        if args.seed is not None:
            model, _ = load_policy(args.policy)
            rec = model.provenance
            root = args.assets or (provenance.resolve(args.policy, rec["assets"]) if rec else model.policy.vlm)
            assets = load_assets(root, False, args.profile, args.tables, args.allow_mismatch)
            table = test_table(assets, model.policy.vlm, args.seed, args.n)
        report = evaluate(args.policy, args.budgets, args.episodes, args.seed or 0, table=table,
                          penalty=Penalty(args.penalty, args.penalty_weight), controller_ms=args.controller_ms,
                          guard_ms=args.guard_ms, assets=args.assets, split=args.split, profile=args.profile,
                          tables=args.tables, allow_mismatch=args.allow_mismatch,
                          measure=args.measure_controller)  # fmt: skip
    except (BudgetError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    meta, results = report["meta"], report["results"]
    if args.seed is not None:
        meta["n"] = args.n
    meta["minutes"] = (time.time() - t0) / 60  # the whole command, table building included
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(args.out, json.dumps({"meta": meta, "results": results}, indent=1))
    write_atomic(args.out.with_suffix(".md"), markdown(meta, results))
    plot(args.out.with_suffix(".png"), results, meta["full_config_ms"])
    print(markdown(meta, results))
    return 0


def write_atomic(path: Path, text: str) -> None:
    write_text(path, text)


if __name__ == "__main__":
    sys.exit(main())
