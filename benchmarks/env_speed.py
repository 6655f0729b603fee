"""Environment speed: replay steps per second (no policy in the loop) and live episodes per second.

python benchmarks/env_speed.py --model tiny --out benchmarks/results/env_speed.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from envs.assets import Assets
from envs.budgets import parse_distribution
from envs.knob_env import Penalty


def steps_per_second(env, steps: int, seed: int = 0) -> float:
    rng = np.random.default_rng(seed)
    env.reset(seed=seed)
    t0 = time.perf_counter()
    splits = np.cumsum(env.action_space.nvec)[:-1]
    for _ in range(steps):
        mask = env.action_masks()
        action = [rng.choice(np.flatnonzero(m)) for m in np.split(mask, splits)]
        _, _, done, _, _ = env.step(action)
        if done:
            env.reset()
    return steps / (time.perf_counter() - t0)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--steps", type=int, default=20000)
    ap.add_argument("--live-episodes", type=int, default=20)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)
    assets = Assets(args.model)
    dist, penalty = parse_distribution("uniform"), Penalty()
    report = {}
    for kind in ("two_stage", "single_stage"):
        env = assets.env(kind, assets.train, dist, penalty)
        report[f"replay_{kind}_steps_per_s"] = steps_per_second(env, args.steps)
        env = assets.env(kind, assets.live("test"), dist, penalty)
        steps = args.live_episodes * (2 if kind == "two_stage" else 1)
        report[f"live_{kind}_episodes_per_s"] = steps_per_second(env, steps) / (steps / args.live_episodes)
    print(json.dumps(report, indent=1))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
