"""Where the fast path's time goes: each phase's graph replay against the kernels inside it.

    python benchmarks/fast_path_kernels.py --preset molmoe-1b --device cuda --out kernels_h100.json
    python benchmarks/fast_path_kernels.py --preset tiny --device cpu --out /tmp/kernels.json   # dry run

For a few phases (vision, layers 0-2, the knobbed layers, one decode step; full and cheapest config)
it times the captured replay (graphs on CUDA, eager elsewhere) and profiles the same phase run
eagerly with torch.profiler: how many kernels it launches, how long the device is busy in them,
and the heaviest kernels. Replay time far above busy time means gaps between kernels; busy time far
above the floor means slow or too many kernels. Latency depends on shapes only: random weights.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from envs.latency import PROFILE_QUESTION, StageTimer, full_tier_image, median_ms, timed_prefix
from envs.vlm.checkpoint import build_model

PHASES = ("vision", "prefix", "rest", "decode")


def kernels(fn, device: torch.device, top: int = 8) -> dict:
    """Kernel count, busy ms and the heaviest kernels of one eager run (CPU: aten ops' self time)."""
    fn()  # warm: allocator, cuBLAS handles
    on_gpu = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_gpu else [])
    with profile(activities=activities) as prof:
        fn()
        if on_gpu:
            torch.cuda.synchronize()
    if on_gpu:
        events = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
        durations = [(e.name, e.time_range.elapsed_us() / 1e3) for e in events]
    else:
        events = [e for e in prof.events() if e.name.startswith("aten::") and e.cpu_parent is None]
        durations = [(e.name, e.cpu_time_total / 1e3) for e in events]
    by_name: dict[str, list[float]] = {}
    for name, ms in durations:
        by_name.setdefault(name[:90], []).append(ms)
    heaviest = sorted(by_name.items(), key=lambda kv: -sum(kv[1]))[:top]
    return {
        "kernels": len(durations),
        "busy_ms": float(sum(ms for _, ms in durations)),
        "top": [{"name": n, "calls": len(v), "ms": float(sum(v))} for n, v in heaviest],
    }


def phases_of(model, image, tier: str, top_k: int, blocks: int) -> dict:
    """Run one request on a fresh fast path so its phases exist (captured on CUDA); return them by name.

    A phase's `fn` is its eager body over the same static buffers; calling the phase replays it."""
    fast = model.use_fast_path(64, graphs=model.device.type == "cuda")
    timer = StageTimer(model.device)
    _, prepared, state = timed_prefix(model, image, PROFILE_QUESTION, tier, timer)
    with torch.no_grad():
        model.generate(state, model.layers_for(blocks), top_k, 2, timer=None, ignore_eos=True)
    named = {key[0]: phase for key, phase in fast.phases.items()}  # one phase of each kind per request
    return named | {"crops": prepared.n_crops[0], "prompt_tokens": prepared.prompt_tokens[0]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="molmoe-1b")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda asked for, but torch sees no CUDA device")
    model = build_model(args.preset, device=device, dtype=getattr(torch, args.dtype))
    image = full_tier_image(model.cfg.vision.crop_size)  # 1 / 5 / 13 views at low / medium / high
    k_max, b_max = max(model.cfg.knobs.top_k), max(model.cfg.knobs.blocks)
    k_min, b_min = min(model.cfg.knobs.top_k), min(model.cfg.knobs.blocks)
    report: dict = {"preset": args.preset, "dtype": args.dtype, "torch": torch.__version__,
                    "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                    "date": time.strftime("%Y-%m-%d"), "configs": {}}  # fmt: skip
    for name, tier, k, b in (("full_high", "high", k_max, b_max), ("min_low", "low", k_min, b_min)):
        phases = phases_of(model, image, tier, k, b)
        rows = {"crops": phases["crops"], "prompt_tokens": phases["prompt_tokens"]}
        with torch.no_grad():
            for phase in PHASES:
                if phase not in phases:
                    continue  # vision is a phase only where graphs capture it
                rows[phase] = {
                    "replay_ms": median_ms(phases[phase], device, 20, 3),
                    **kernels(phases[phase].fn, device),
                }
                shown = {key: round(v, 3) if isinstance(v, float) else v for key, v in rows[phase].items()}
                print(name, phase, json.dumps({key: v for key, v in shown.items() if key != "top"}), flush=True)
        report["configs"][name] = rows
    model.use_fast_path(None)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1))
    print("| config | phase | replay ms | busy ms | kernels | heaviest |\n|---|---|---|---|---|---|")
    for name, rows in report["configs"].items():
        for phase in (p for p in PHASES if p in rows):
            r = rows[phase]
            top = r["top"][0]
            print(f"| {name} | {phase} | {r['replay_ms']:.3f} | {r['busy_ms']:.3f} | {r['kernels']} | "
                  f"{top['name'][:50]} x{top['calls']} {top['ms']:.3f} ms |")  # fmt: skip
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
