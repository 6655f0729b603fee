"""Evaluate a saved policy on a fresh SynthVQA test split, against the oracle and the baselines.

    python scripts/evaluate.py --policy runs/ppo_two_stage_budget/policy.zip \
        --budgets uniform,tight,bimodal,trace:budgets.json --seed 7 --n 500 --out eval_seed7.json

The split's outcome table is built once (vision and layers 0-2 shared per sample and tier) and
cached under $KNOB_RL_CACHE (default ~/.cache/knob-rl). A policy_bc.zip beside the policy is
evaluated too.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from pathlib import Path

from agents.pipeline import Assets, assets_dir, controller_cost, evaluate_all
from agents.report import markdown
from agents.serving import load_policy
from envs.budgets import BudgetError, Penalty, parse_distribution
from envs.guard import BudgetGuard
from envs.knob_env import replay_backend
from envs.outcomes import OutcomeTable, build_outcomes
from envs.tasks.synthvqa import dataset_spec
from envs.vlm.checkpoint import weights_digest
from envs.vlm.evaluate import all_configs
from policies.networks import guard_of


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
    args = ap.parse_args(argv)
    try:
        for spec in args.budgets.split(","):
            parse_distribution(spec)  # fail before any work
        model, kind = load_policy(args.policy)
        assets = Assets(model.policy.vlm)
        env = assets.env(kind, assets.test, parse_distribution("uniform"), Penalty())
        if model.observation_space != env.observation_space:
            raise ValueError(f"{args.policy} was saved for another model or observation space than {model.policy.vlm}")
        test = replay_backend(assets.vlm, test_table(assets, model.policy.vlm, args.seed, args.n), assets.latency_model)
        controller = controller_cost(assets, model, kind, env, parse_distribution("log_uniform"), args.seed)
        controller_ms = controller["charged_ms"]
        penalty = Penalty(args.penalty, args.penalty_weight)
        guard = guard_of(model.policy.mlp_extractor.net)  # its expected scores; time and penalty of this run
        guard = guard and BudgetGuard(guard.scores, controller["guard_charged_ms"], penalty, guard.repair)
        policies = {"policy": model}
        if (args.policy.parent / "policy_bc.zip").is_file():
            policies["bc_only"] = load_policy(args.policy.parent / "policy_bc.zip")[0]
        results = evaluate_all(assets, kind, args.budgets, policies, penalty, controller_ms, args.episodes,
                               args.seed, test, guard)  # fmt: skip
    except (BudgetError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    meta = {"policy": kind, "variant": getattr(model.policy, "stage1", getattr(model.policy, "fusion", "")),
            "policy_file": str(args.policy), "seed": args.seed, "n": args.n, "controller_ms": controller_ms,
            "controller": controller, "guard_ms": guard.ms if guard else None,
            "repair": bool(guard and guard.repair), "full_config_ms": assets.full_ms, "minutes": 0.0,
            "peak_memory_mb": 0.0}  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"meta": meta, "results": results}, indent=1))
    args.out.with_suffix(".md").write_text(markdown(meta, results))
    print(markdown(meta, results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
