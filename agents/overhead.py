"""What the environments charge a controller per request: its time on the serving path, measured or pinned.

The charge is measured on a few train requests: the serving path's networks and features
(agents/serving.py) on the latency profile's clock, so a busy machine does not inflate it. A measured
charge differs between runs; `pinned_cost` gives a fixed one instead, for reproducible runs.
"""

from __future__ import annotations

import statistics
import time

import numpy as np

from agents.serving import (
    SingleStageServer,
    TwoStageServer,
    guard_overhead_ms,
    single_stage_overhead_ms,
    two_stage_overhead_ms,
)
from envs.assets import Assets
from envs.outcomes import dataset_samples
from policies.sb3 import decide

TIMING_REQUESTS = 24  # train requests the serving path is timed on


def timing_requests(assets: Assets, budgets, seed: int, n: int = TIMING_REQUESTS) -> tuple[list, list[float]]:
    """The first `n` train requests and a budget for each: what controller costs are timed on."""
    samples = dataset_samples(assets.train.table.meta["dataset"], 0, n)
    return samples, budgets.sample(np.random.default_rng(seed), len(samples), assets.full_ms).tolist()


def serving_overhead(assets: Assets, model, kind: str, budgets, seed: int) -> dict:
    """The controller's cost on the serving path (agents/serving.py), on train requests."""
    samples, budgets_ms = timing_requests(assets, budgets, seed)
    net = model.policy.mlp_extractor.net
    if kind == "two_stage":
        server = TwoStageServer(net, assets.vlm, assets.full_ms, assets.latency_model)
        return two_stage_overhead_ms(server, samples, budgets_ms)
    server = SingleStageServer(net, assets.vlm, assets.full_ms, assets.latency_model)
    return single_stage_overhead_ms(server, samples, budgets_ms)


def guard_overhead(assets: Assets, model, budgets, seed: int) -> float:
    """The budget guard's own time (median ms of wall time) on train requests."""
    samples, budgets_ms = timing_requests(assets, budgets, seed)
    server = SingleStageServer(model.policy.mlp_extractor.net, assets.vlm, assets.full_ms, assets.latency_model)
    return guard_overhead_ms(server, samples, budgets_ms)


def decision_ms(model, env, repeats: int = 30) -> float:
    """Median wall time of the policy's decisions for one request (all its steps), batch 1, on the
    serving path (`decide`: observation to tensors, network, masked argmax)."""
    times = []
    for i in range(repeats + 3):
        obs, _ = env.reset(seed=i)
        done, spent = False, 0.0
        while not done:
            masks = env.action_masks()
            t0 = time.perf_counter()
            action = decide(model.policy, obs, masks)
            spent += time.perf_counter() - t0
            obs, _, done, _, _ = env.step(action)
        if i >= 3:  # the first decisions pay one-time costs
            times.append(spent * 1e3)
    return float(statistics.median(times))


def controller_cost(assets: Assets, model, kind: str, env, budgets, seed: int) -> dict:
    """What the environments charge a controller per request (`charged_ms`), with the parts of its
    measurement: its cost on the serving path (features, headroom and networks timed between the VLM's
    stages; for two-stage plus the budget token's share of the layers 0-2 pass) on the latency profile's
    clock (scaled by the VLM's own speed measured beside it). A single-stage policy on the light encoder
    has no server (its run does not save the encoder): the wall time of its decisions (`decide_ms`,
    observation to action) is charged, and the budget guard's wall time (`guard_charged_ms`)."""
    cost = {"decide_ms": decision_ms(model, env)}
    if kind == "two_stage" or assets.reuse_low:
        cost.update(serving_overhead(assets, model, kind, budgets, seed))
    else:
        cost["guard_ms"] = guard_overhead(assets, model, budgets, seed)
    cost["charged_ms"] = cost.get("profile_ms", cost["decide_ms"])
    cost["guard_charged_ms"] = cost.get("guard_profile_ms", cost["guard_ms"])
    return cost


def pinned_cost(controller_ms: float, guard_ms: float) -> dict:
    """A charge given rather than measured: the same in every run."""
    return {"pinned": True, "charged_ms": float(controller_ms), "guard_charged_ms": float(guard_ms)}
