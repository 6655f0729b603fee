"""Evaluate policies and baselines on the same requests and budgets, per budget distribution.

Every policy and baseline runs the same episodes (same seeds: same samples, same budgets) through
an environment, so the latency accounting (controller overhead, global-crop reuse) is the
environment's. Baselines are free of controller overhead: oracle, best static config (chosen on
the train split under the same distribution), max config, random feasible config.
"""

from __future__ import annotations

import numpy as np
from sb3_contrib.common.maskable.evaluation import evaluate_policy
from stable_baselines3.common.vec_env import DummyVecEnv

from envs.budgets import Penalty, parse_distribution
from envs.knob_env import TwoStageKnobEnv
from envs.oracle import best_static_from_arrays, max_config, oracle_from_arrays, random_feasible_from_arrays
from policies.sb3 import decide

METRICS = ("accuracy", "violation_rate", "violation_rate_feasible", "violation_rate_reachable", "mean_latency_ms",
           "p95_latency_ms", "mean_reward", "controller_ms", "guarded_fraction", "repaired_fraction")  # fmt: skip


def feasible(env, with_controller: bool = False) -> bool:
    """Does the cheapest config alone fit this episode's budget? (replay backends; live: True)

    A controller's own overhead is not excused: the same episodes count for every policy and baseline.
    `with_controller`: the cheapest config plus the time the env adds for the controller, or for its
    budget guard where that is less (reachable).
    """
    backend = env.backend
    if not hasattr(backend, "table"):
        return True
    added = env.added_latency() if with_controller else 0.0
    if with_controller and env.guard is not None:
        added = np.minimum(added, env.guard.ms)
    latency = backend.table.latency[backend.valid[env._sample]] + added
    return bool(latency.min() <= env._budget)


def run_episodes(env, choose, episodes: int, seed: int = 10_000) -> dict[str, np.ndarray]:
    """`choose(env, obs, masks) -> action` for each step; returns per-episode arrays."""
    keys = ("score", "latency", "violation", "reward", "controller", "config", "budget", "feasible", "reachable",
            "guarded", "repaired", "request")  # fmt: skip
    out = {k: [] for k in keys}
    for ep in range(episodes):
        obs, _ = env.reset(seed=seed + ep)
        out["request"].append(env._sample)  # the split's request index: episodes of one request are not independent
        out["feasible"].append(feasible(env))
        out["reachable"].append(feasible(env, with_controller=True))
        done = False
        while not done:
            obs, reward, done, _, info = env.step(choose(env, obs, env.action_masks()))
        for key, val in (("score", info["score"]), ("latency", info["latency_ms"]), ("violation", info["violation"]),
                         ("reward", reward), ("controller", info["controller_ms"]), ("config", info["config_index"]),
                         ("budget", info["budget_ms"]), ("guarded", info.get("guarded", False)),
                         ("repaired", info.get("repaired", False))):  # fmt: skip
            out[key].append(val)
    return {k: np.asarray(v) for k, v in out.items()}


def clustered_se(gain: np.ndarray, clusters: np.ndarray) -> float:
    """Standard error of the mean of `gain`, clustered (sums of residuals per cluster): episodes drawn
    from one request share its difficulty, so they are not independent."""
    gain = np.asarray(gain, dtype=np.float64)
    _, index = np.unique(clusters, return_inverse=True)
    sums = np.bincount(index, weights=gain - gain.mean())
    n = len(sums)
    return float(np.sqrt(n / (n - 1) * (sums**2).sum()) / gain.size) if n > 1 else 0.0


def paired_differences(runs: dict[str, dict[str, np.ndarray]], pairs) -> dict[str, dict[str, float]]:
    """Mean reward of `a` minus `b` for each `(a, b)` in `pairs`, episode by episode (the runs share
    their episodes: same requests, same budgets), with its standard error clustered by request."""
    out = {}
    for a, b in pairs:
        if a in runs and b in runs:
            if any(not np.array_equal(runs[a][k], runs[b][k]) for k in ("request", "budget") if k in runs[a]):
                raise ValueError(f"{a} and {b} ran different episodes: no paired difference")
            gain = runs[a]["reward"] - runs[b]["reward"]
            out[f"{a} - {b}"] = {"mean": float(gain.mean()), "se": clustered_se(gain, runs[a]["request"])}
    return out


def summarize(r: dict[str, np.ndarray]) -> dict[str, float]:
    """`violation_rate_feasible`: among episodes whose budget the cheapest config fits;
    `violation_rate_reachable`: among those it fits with the policy's own overhead added;
    `guarded_fraction`: episodes the budget guard served without the policy; `repaired_fraction`:
    episodes whose chosen config did not fit and the guard served one that does instead."""
    fits, reach = r["feasible"].astype(bool), r["reachable"].astype(bool)
    return {
        "accuracy": float(r["score"].mean()), "violation_rate": float(r["violation"].mean()),
        "violation_rate_feasible": float(r["violation"][fits].mean()) if fits.any() else 0.0,
        "violation_rate_reachable": float(r["violation"][reach].mean()) if reach.any() else 0.0,
        "feasible_fraction": float(fits.mean()), "guarded_fraction": float(r["guarded"].mean()),
        "repaired_fraction": float(r["repaired"].mean()),
        "mean_latency_ms": float(r["latency"].mean()), "p95_latency_ms": float(np.percentile(r["latency"], 95)),
        "mean_reward": float(r["reward"].mean()), "controller_ms": float(r["controller"].mean()),
        "episodes": len(r["score"]),
    }  # fmt: skip


def policy_chooser(model):
    """Deterministic actions of a trained policy, on the serving path whose time the env charges."""

    def choose(env, obs, masks):
        return decide(model.policy, obs, masks)

    return choose


def config_chooser(pick):
    """Turn `pick(env) -> config index` into per-step actions (two-stage: tier first)."""

    def choose(env, obs, masks):
        tier, k, b = env.space.config_knobs(pick(env))
        if isinstance(env, TwoStageKnobEnv) and env._stage == 0:
            return np.array([tier, 0, 0])
        return np.array([env._tier if isinstance(env, TwoStageKnobEnv) else tier, k, b])

    return choose


def _row(env):
    return env.backend.valid[env._sample]


def best_static(train_env, distribution, episodes: int = 2000, seed: int = 0) -> int:
    """The config with the best mean reward on the train split under this budget distribution."""
    rng = np.random.default_rng(seed)
    table = train_env.backend.table.valid()
    idx = rng.integers(len(table.ok), size=episodes)
    budgets = distribution.sample(rng, episodes, train_env.full_ms)
    return best_static_from_arrays(table.score[idx], table.latency[idx], budgets, train_env.penalty)


def baselines(env, train_env, distribution, episodes: int, seed: int) -> tuple[dict[str, dict], dict]:
    """Baselines on `env` (an environment without controller overhead): summaries, and the
    per-episode arrays of each (for paired differences)."""
    table = env.backend.table
    rng = np.random.default_rng(seed)
    static = best_static(train_env, distribution)
    biggest = max_config(table)

    def oracle(e):
        r = _row(e)
        return int(oracle_from_arrays(table.score[r : r + 1], table.latency[r : r + 1], [e._budget], e.penalty)[0])

    def random_feasible(e):
        r = _row(e)
        return int(random_feasible_from_arrays(table.latency[r : r + 1], [e._budget], rng)[0])

    picks = {"oracle": oracle, "best_static": lambda e: static, "max_config": lambda e: biggest,
             "random_feasible": random_feasible}  # fmt: skip
    runs = {name: run_episodes(env, config_chooser(p), episodes, seed) for name, p in picks.items()}
    out = {name: summarize(r) for name, r in runs.items()}
    out["best_static"]["config"] = table.configs[static].__dict__
    return out, runs


def evaluate_all(assets, kind: str, budgets: str, policies: dict, penalty: Penalty, controller_ms: float,
                 episodes: int, seed: int, test=None, guard=None) -> dict:  # fmt: skip
    """Every policy and baseline on the same test episodes, per budget distribution in `budgets` (comma
    separated specs): summaries, the policies' episodes, and paired differences against the BC start and
    the best static config. The policies run behind `guard` if given; the baselines have no controller
    and so no guard. `test`: a replay backend other than `assets.test`."""
    test = test or assets.test
    results = {}
    for spec in budgets.split(","):
        dist = parse_distribution(spec)
        env = assets.env(kind, test, dist, penalty, controller_ms, guard)
        rows = {name: run_episodes(env, policy_chooser(m), episodes, seed) for name, m in policies.items()}
        plain = assets.env("two_stage", test, dist, penalty, 0.0)
        train = assets.env("two_stage", assets.train, dist, penalty, 0.0)
        results[dist.name] = {name: summarize(r) for name, r in rows.items()}
        summaries, runs = baselines(plain, train, dist, episodes, seed)
        results[dist.name].update(summaries)
        results[dist.name]["_episodes"] = {name: {k: r[k].tolist() for k in ("budget", "score", "violation")}
                                           for name, r in rows.items()}  # fmt: skip
        pairs = [(name, ref) for name in rows for ref in ("bc_only", "best_static") if name != ref]
        results[dist.name]["_paired"] = paired_differences(rows | runs, pairs)
    return results


VALIDATION_SEED = 20_000  # the validation episodes' seed: the same requests and budgets at every check


def validation_rewards(assets, kind: str, budgets: str, penalty: Penalty, model, episodes: int,
                       controller_ms: float, guard=None, n_envs: int = 50):  # fmt: skip
    """Rewards on the validation split per budget distribution in `budgets`, the same episodes in the same
    order every call, [distributions, episodes], and each episode's request (its sample index). Episodes
    run `n_envs` at a time, so the policy decides in batches."""
    rewards, requests = [], []
    for spec in budgets.split(","):
        dist = parse_distribution(spec)
        vec = DummyVecEnv([lambda d=dist: assets.env(kind, assets.val, d, penalty, controller_ms, guard)] * n_envs)
        vec.seed(VALIDATION_SEED)
        samples = []  # the callback sees each finished episode just before its reward is recorded

        def note(local, _, samples=samples):
            if local["done"]:
                samples.append(local["info"]["sample"])

        episodes_rewards, _ = evaluate_policy(model, vec, episodes, return_episode_rewards=True, warn=False,
                                              callback=note)  # fmt: skip
        rewards.append(episodes_rewards)
        requests.append(samples)
    return np.array(rewards), np.array(requests)
