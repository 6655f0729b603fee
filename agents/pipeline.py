"""The main job: oracle imitation, then MaskablePPO fine-tuning, then evaluation across budget distributions.

`run(args)` reads top to bottom: assets (model, profile, outcome tables) -> replay environments ->
policy -> the controller's charged time -> behaviour cloning -> PPO (the best parameters on the
validation split kept) -> evaluation of BC, PPO and baselines on the test split -> report.
"""

from __future__ import annotations

import dataclasses
import os
import resource
import time
from pathlib import Path

import torch
from sb3_contrib import MaskablePPO
from stable_baselines3.common.callbacks import CheckpointCallback
from stable_baselines3.common.vec_env import DummyVecEnv
from torch.utils.tensorboard import SummaryWriter

from agents import provenance
from agents.args import Args
from agents.distillation import use_light_encoder
from agents.episode_logger import EpisodeLogger
from agents.evaluation import evaluate_all, validation_rewards
from agents.imitation import behaviour_clone, collect
from agents.overhead import controller_cost, pinned_cost
from agents.report import write_report
from agents.selection import KeepBestOnValidation, gain_threshold
from agents.serving import load_policy
from envs.assets import Assets
from envs.atomic import atomic_path, write_json
from envs.budgets import Penalty, parse_distribution
from envs.guard import BudgetGuard
from envs.threads import use_threads
from envs.vlm.presets import PRESETS
from policies.networks import SemanticRouter, set_guard
from policies.sb3 import POLICIES

ROUTES = 8  # the router variant's prompt clusters


def stored_model(spec: str) -> str:
    """The model as a policy's kwargs keep it: a preset name, or a path relative to here (never absolute;
    the zip's own record, agents/provenance.py, finds it again from the policy's folder)."""
    return spec if spec in PRESETS else os.path.relpath(spec)


def policy_kwargs(args: Args, assets: Assets) -> dict:
    """The policy network's options: its VLM and the variant of its first stage (two-stage) or fusion."""
    kwargs = {"vlm": stored_model(assets.model)}
    if args.policy == "single_stage":
        return kwargs | {"fusion": args.variant}
    kwargs["stage1"] = args.variant
    if args.variant == "router":
        kwargs["routes"] = SemanticRouter.fit_routes(assets.train.features.prompt, ROUTES, seed=args.seed)
    return kwargs


def save_policy(model, path: Path, rec: dict) -> None:
    """The policy zip with its provenance record, written whole (atomically): a kill or a full disk leaves
    the previous file or none. No absolute path (the TensorBoard folder) is saved in a policy."""
    with atomic_path(path) as tmp:
        model.save(tmp, exclude=["tensorboard_log"])
        provenance.attach(tmp, rec)


def run(args: Args) -> Path:
    """Train and evaluate one controller as `args` say; writes the policies, eval.json/.md/.png and
    TensorBoard logs under `args.out` and returns it."""
    t0 = time.time()
    use_threads(args.threads)
    torch.manual_seed(args.seed)
    args.out.mkdir(parents=True, exist_ok=True)
    write_json(args.out / "args.json", dataclasses.asdict(args), default=str)

    # assets and the training environments (the run's own Assets: a light encoder changes its features)
    assets = Assets(args.assets or args.model, args.quick, args.profile, args.tables, args.allow_mismatch,
                    args.budget_reference)  # fmt: skip
    light_encoder_error = None
    if args.policy == "single_stage" and args.encoder == "light":
        light_encoder_error = use_light_encoder(assets, args.seed)
    penalty = Penalty(args.penalty, args.penalty_weight)
    train_dist = parse_distribution(args.train_budgets)
    envs = [assets.env(args.policy, assets.train, train_dist, penalty) for _ in range(args.n_envs)]
    vec = DummyVecEnv([lambda e=e: e for e in envs])
    vec.seed(args.seed)

    # the policy
    model = MaskablePPO(POLICIES[args.policy], vec, learning_rate=args.learning_rate, n_steps=args.n_steps,
                        batch_size=args.batch_size, n_epochs=args.n_epochs, gamma=args.gamma,
                        ent_coef=args.ent_coef, seed=args.seed, policy_kwargs=policy_kwargs(args, assets),
                        tensorboard_log=str(args.out / "tb"), verbose=0)  # fmt: skip

    # what each request is charged for the controller and for the budget guard
    if args.pinned:
        controller = pinned_cost(args.controller_ms, args.charged_guard_ms())
    else:
        controller = controller_cost(assets, model, args.policy, envs[0], train_dist, args.seed)
    controller_ms = controller["charged_ms"]
    guard = None
    if args.guard:
        guard = BudgetGuard.from_table(assets.train.table, controller["guard_charged_ms"], penalty, args.repair)
    for e in envs:  # training sees only the requests the policy decides
        e.controller_ms, e.guard, e.skip_guarded = controller_ms, guard, True
    # the policy carries the time its environment adds and its guard, so a server acts as training did
    model.policy.mlp_extractor.net.added_ms.copy_(torch.as_tensor(envs[0].added_latency()))
    set_guard(model.policy.mlp_extractor.net, guard)
    print(f"controller overhead {controller_ms:.2f} ms per request"
          + (f"; budget guard {guard.ms:.3f} ms" if guard else ""))  # fmt: skip

    # behaviour cloning of the oracle
    demos = collect(envs[0], args.bc_episodes, gamma=args.gamma, seed=args.seed, oracle=args.oracle,
                    shrink=args.oracle_shrink)  # fmt: skip
    writer = SummaryWriter(str(args.out / "tb" / "bc"))
    history = behaviour_clone(model.policy, demos, args.bc_epochs, seed=args.seed, log=writer.add_scalar)
    writer.close()
    rec = provenance.record(assets, args.out, controller_ms, guard.ms if guard else None)
    save_policy(model, args.out / "policy_bc.zip", rec)
    print(f"behaviour cloning: loss {history[0]:.3f} -> {history[-1]:.3f} over {len(history)} epochs")

    # PPO fine-tuning, keeping the best parameters on the validation split
    every = max(1, (args.select_every or args.ppo_steps) // args.n_envs)  # a callback step advances every env
    callbacks, keep = [EpisodeLogger(), CheckpointCallback(every, str(args.out / "checkpoints"), "ppo")], None
    if assets.val is not None and args.select_every > 0:
        threshold = gain_threshold(args.select_alpha, args.ppo_steps // args.select_every)

        def score(m):
            return validation_rewards(assets, args.policy, args.eval_budgets, penalty, m, args.select_episodes,
                                      controller_ms, guard)  # fmt: skip

        keep = KeepBestOnValidation(score, args.select_every, threshold)
        callbacks.append(keep)
    model.learn(args.ppo_steps, callback=callbacks, progress_bar=True, tb_log_name="ppo")
    if keep is not None:
        print(f"kept the parameters of PPO step {keep.best_step} (validation reward {keep.best:.3f})")
    save_policy(model, args.out / "policy.zip", rec)

    # evaluation on the test split, and the report
    bc = load_policy(args.out / "policy_bc.zip")[0]
    results = evaluate_all(assets, args.policy, args.eval_budgets, {"ppo": model, "bc_only": bc}, penalty,
                           controller_ms, args.eval_episodes, args.seed + 10_000, guard=guard)  # fmt: skip
    meta = {"policy": args.policy, "variant": args.variant, "controller_ms": controller_ms, "controller": controller,
            "guard_ms": guard.ms if guard else None, "repair": bool(guard and guard.repair),
            "global_view": {"encoder": args.encoder, "ms": assets.global_ms, "reused_at_low_tier": assets.reuse_low,
                            "distillation_relative_error": light_encoder_error},
            "full_config_ms": assets.full_ms, "minutes": (time.time() - t0) / 60, "assets": rec,
            "peak_memory_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "bc_loss": history, "test_samples": len(assets.test),
            "selection": None if keep is None else {"history": keep.history, "kept_step": keep.best_step,
                                                     "min_gain_se": keep.min_gain_se, "alpha": args.select_alpha,
                                                     "validation_requests": len(assets.val)}}  # fmt: skip
    write_report(args.out, meta, results)
    return args.out


def train(args: Args | None = None, **fields) -> Path:
    """Run the main job from `args`, or from `Args(**fields)`; returns the run's directory.

    >>> out = train(policy="two_stage", quick=True, out=Path("runs/quick"), controller_ms=1.0)
    """
    return run(args if args is not None else Args(**fields))
