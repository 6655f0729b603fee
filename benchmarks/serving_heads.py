"""Two-stage controller's small layers on the serving path: numpy copies against the torch network.

    python benchmarks/serving_heads.py --policy runs/ppo_two_stage_budget/policy.zip \
        --out benchmarks/results/serving_heads.json

Each request runs the VLM's stages as serving does (crops, vision, connector, layers 0-2 with the
budget token); stage 1 + the token's embedding is timed before the layers 0-2 pass and the heads
after it, where caches are cold from the VLM's work. Requests alternate between the numpy path and
the torch path, so both see the same conditions. Prints and writes medians in milliseconds.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
import warnings
from pathlib import Path

import torch

from agents.serving import load_policy, load_server
from envs.assets import assets_dir
from envs.features import stage2_sees
from envs.outcomes import OutcomeTable, dataset_samples
from envs.vlm.presets import TIERS
from policies.networks import tier_room


def torch_stage1(net, obs: dict, tier: int):
    with torch.inference_mode():
        o = {k: torch.as_tensor(v)[None] for k, v in obs.items()}
        int(net.stage1.pi(net.stage1.inputs(o)).argmax())
        o["tier"] = torch.nn.functional.one_hot(torch.tensor([tier]), len(TIERS)).float()
        return net.stage2.embed(o), tier_room(o)


def torch_heads(net, state: torch.Tensor, room: torch.Tensor):
    with torch.inference_mode():
        logits = net.stage2.knob_logits(state.float(), room)[0]
        n_top_k = net.space.n_top_k
        return int(logits[:n_top_k].argmax()), int(logits[n_top_k:].argmax())


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--policy", type=Path, required=True)
    ap.add_argument("--requests", type=int, default=24)
    ap.add_argument("--repeats", type=int, default=4)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)
    warnings.simplefilter("ignore")
    server, vlm_spec = load_server(args.policy), load_policy(args.policy)[0].policy.vlm
    vlm, net = server.vlm, server.net
    train = OutcomeTable.load(assets_dir(vlm_spec) / "outcomes" / "train.npz")  # its requests
    samples = dataset_samples(train.meta["dataset"], 0, args.requests)
    times = {f"{path}_{part}": [] for path in ("numpy", "torch") for part in ("stage1_ms", "heads_ms")}
    for r in range(args.repeats):
        for i, s in enumerate(samples):
            tier, path = (i + r) % len(TIERS), ("numpy", "torch")[(i + r) % 2]
            pre = vlm.preprocess([s.image], [s.question], TIERS[tier])
            with torch.no_grad():
                prepared = vlm.connect(pre, vlm.encode_vision(pre.pixels()))
            sees = stage2_sees(vlm, pre, prepared.valid.shape[1])
            obs = server.observe(s.image, s.question, 30.0)
            t0 = time.perf_counter()
            if path == "numpy":
                server.choose_tier(obs)
                token, room = server.stage2_inputs(obs, tier)
            else:
                token, room = torch_stage1(net, obs, tier)
            t1 = time.perf_counter()
            with torch.no_grad():
                state = vlm.prefix(prepared, token, sees)
            t2 = time.perf_counter()
            if path == "numpy":
                server.choose_knobs(state.side_state, room, tier)
            else:
                torch_heads(net, state.side_state, room)
            times[f"{path}_stage1_ms"].append((t1 - t0) * 1e3)
            times[f"{path}_heads_ms"].append((time.perf_counter() - t2) * 1e3)
    result = {k: statistics.median(v) for k, v in times.items()}
    result["requests_per_path"] = len(times["numpy_stage1_ms"])
    result["policy"] = str(args.policy)
    print(json.dumps(result, indent=1))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
