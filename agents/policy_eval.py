"""Evaluate a saved policy: its controller charged, it and its BC start against the baselines."""

from __future__ import annotations

import resource
import time
from pathlib import Path

from agents import provenance
from agents.evaluation import evaluate_all
from agents.overhead import controller_cost, pinned_cost
from agents.serving import load_policy
from envs.asset_manifest import file_hash
from envs.assets import load_assets
from envs.budgets import Penalty, parse_distribution
from envs.guard import BudgetGuard
from envs.knob_env import replay_backend
from policies.networks import guard_of


def evaluate(policy: str | Path, budgets: str = "uniform,tight,bimodal", episodes: int = 500, seed: int = 0, *,
             table: str | Path | None = None, penalty: Penalty | None = None, controller_ms: float | None = None,
             guard_ms: float | None = None, assets: str | Path | None = None, split: str = "test",
             profile: str | Path | None = None, tables: str | Path | None = None, allow_mismatch: bool = False,
             measure: bool = False) -> dict:  # fmt: skip
    """Evaluate a saved policy (train_ppo.py's policy.zip; a policy_bc.zip beside it is evaluated too) on a
    split (`split`, default test) of its assets, or on the outcome table `table`, for `episodes` episodes per
    budget distribution in `budgets` (comma-separated specs). The assets: `assets` (a directory), else the
    ones the policy records it was trained with, else its model's; `profile` and `tables` as in `Assets`
    (by default the profile the policy was trained with). The controller is charged what it was charged in
    training (recorded in the zip); `measure` measures it on the serving path instead, and `controller_ms`
    (and `guard_ms`, default `controller_ms`) pins it. Returns {"meta": ..., "results": ...} as eval.json
    holds them, with the assets, profile and tables used, the run time and the peak memory.

    >>> report = evaluate("runs/ppo_two_stage_budget/policy.zip", "tight", episodes=200, controller_ms=1.0)
    """
    for spec in budgets.split(","):
        parse_distribution(spec)  # fail before any work
    if guard_ms is not None and controller_ms is None:
        raise ValueError("guard_ms pins the guard's time only beside controller_ms")
    t0 = time.time()
    policy, penalty = Path(policy), penalty or Penalty()
    model, kind = load_policy(policy)
    rec = model.provenance
    if assets is None:
        assets = provenance.resolve(policy, rec["assets"]) if rec else model.policy.vlm
    if profile is None and rec is not None:
        trained_with = Path(provenance.in_assets(policy, rec, rec["profile"]["file"]))
        profile = trained_with if trained_with.is_file() else None
    reference = rec.get("budget_reference", "profile") if rec else "profile"  # budgets read as in training
    assets = load_assets(assets, False, profile, tables, allow_mismatch, reference)
    if rec is not None and assets.weights != rec["model"]["weights"]:
        raise ValueError(f"{policy} was trained on weights {rec['model']['weights']}; the assets' model holds "
                         f"{assets.weights}")  # fmt: skip
    test = assets.backend(split) if table is None else replay_backend(assets.vlm, table, assets.latency_model)
    env = assets.env(kind, test, parse_distribution("uniform"), Penalty())
    if model.observation_space != env.observation_space:
        raise ValueError(f"{policy} was saved for another model or observation space than {model.policy.vlm}")
    if controller_ms is not None:
        controller = pinned_cost(controller_ms, controller_ms if guard_ms is None else guard_ms)
        source = "pinned"
    elif rec is not None and not measure:
        trained_guard = rec["guard_ms"] if rec["guard_ms"] is not None else rec["controller_ms"]
        controller = pinned_cost(rec["controller_ms"], trained_guard)
        source = "as trained"
    else:
        controller = controller_cost(assets, model, kind, env, parse_distribution("log_uniform"), seed)
        source = "measured"
    guard = guard_of(model.policy.mlp_extractor.net)  # its expected scores; time and penalty of this evaluation
    guard = guard and BudgetGuard(guard.scores, controller["guard_charged_ms"], penalty, guard.repair)
    policies = {"policy": model}
    if (policy.parent / "policy_bc.zip").is_file():
        policies["bc_only"] = load_policy(policy.parent / "policy_bc.zip")[0]
    results = evaluate_all(assets, kind, budgets, policies, penalty, controller["charged_ms"], episodes, seed, test,
                           guard)  # fmt: skip
    meta = {"policy": kind, "variant": getattr(model.policy, "stage1", getattr(model.policy, "fusion", "")),
            "policy_file": str(policy), "seed": seed, "controller_ms": controller["charged_ms"],
            "controller": controller, "controller_source": source, "guard_ms": guard.ms if guard else None,
            "repair": bool(guard and guard.repair), "full_config_ms": assets.full_ms,
            "assets": str(assets.root), "split": split,
            "profile": {"name": assets.profile_name, "file": str(assets.profile_file), "latency": assets.latency_hash,
                        "device": assets.profile_meta.get("device"), "date": assets.profile_meta.get("date")},
            "table": {"file": str(table if table is not None else assets.table_path(split)),
                      "content": file_hash(table if table is not None else assets.table_path(split)),
                      "dataset": test.table.meta["dataset"], "requests": len(test.table.sample_ids)},
            "minutes": (time.time() - t0) / 60,
            "peak_memory_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}  # fmt: skip
    return {"meta": meta, "results": results}
