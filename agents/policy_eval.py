"""Evaluate a saved policy: its controller charged, it and its BC start against the baselines."""

from __future__ import annotations

from pathlib import Path

from agents.evaluation import evaluate_all
from agents.overhead import controller_cost, pinned_cost
from agents.serving import load_policy
from envs.assets import load_assets
from envs.budgets import Penalty, parse_distribution
from envs.guard import BudgetGuard
from envs.knob_env import replay_backend
from policies.networks import guard_of


def evaluate(policy: str | Path, budgets: str = "uniform,tight,bimodal", episodes: int = 500, seed: int = 0, *,
             table: str | Path | None = None, penalty: Penalty | None = None, controller_ms: float | None = None,
             guard_ms: float | None = None) -> dict:  # fmt: skip
    """Evaluate a saved policy (train_ppo.py's policy.zip; a policy_bc.zip beside it is evaluated too) on its
    model's test split, or on the outcome table `table`, for `episodes` episodes per budget distribution in
    `budgets` (comma-separated specs). The controller's charge is measured on the serving path, or pinned
    with `controller_ms` (and `guard_ms` for the guard, default `controller_ms`): pinned, two evaluations of
    one seed give identical numbers. Returns {"meta": ..., "results": ...} as eval.json holds them.

    >>> report = evaluate("runs/ppo_two_stage_budget/policy.zip", "tight", episodes=200, controller_ms=1.0)
    """
    for spec in budgets.split(","):
        parse_distribution(spec)  # fail before any work
    if guard_ms is not None and controller_ms is None:
        raise ValueError("guard_ms pins the guard's time only beside controller_ms")
    policy, penalty = Path(policy), penalty or Penalty()
    model, kind = load_policy(policy)
    assets = load_assets(model.policy.vlm)
    env = assets.env(kind, assets.test, parse_distribution("uniform"), Penalty())
    if model.observation_space != env.observation_space:
        raise ValueError(f"{policy} was saved for another model or observation space than {model.policy.vlm}")
    test = assets.test if table is None else replay_backend(assets.vlm, table, assets.latency_model)
    if controller_ms is not None:
        controller = pinned_cost(controller_ms, controller_ms if guard_ms is None else guard_ms)
    else:
        controller = controller_cost(assets, model, kind, env, parse_distribution("log_uniform"), seed)
    guard = guard_of(model.policy.mlp_extractor.net)  # its expected scores; time and penalty of this evaluation
    guard = guard and BudgetGuard(guard.scores, controller["guard_charged_ms"], penalty, guard.repair)
    policies = {"policy": model}
    if (policy.parent / "policy_bc.zip").is_file():
        policies["bc_only"] = load_policy(policy.parent / "policy_bc.zip")[0]
    results = evaluate_all(assets, kind, budgets, policies, penalty, controller["charged_ms"], episodes, seed, test,
                           guard)  # fmt: skip
    meta = {"policy": kind, "variant": getattr(model.policy, "stage1", getattr(model.policy, "fusion", "")),
            "policy_file": str(policy), "seed": seed, "controller_ms": controller["charged_ms"],
            "controller": controller, "guard_ms": guard.ms if guard else None,
            "repair": bool(guard and guard.repair), "full_config_ms": assets.full_ms, "minutes": 0.0,
            "peak_memory_mb": 0.0}  # fmt: skip
    return {"meta": meta, "results": results}
