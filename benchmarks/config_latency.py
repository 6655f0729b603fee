"""Median end-to-end latency of one request for every config of the knob space, and the max/min ratio.

    python benchmarks/config_latency.py --model tiny --repeats 5 --out benchmarks/results/tiny_cpu_configs.json

All configs decode the same number of tokens (EOS ignored) so only the knobs differ. Configs are
measured in an interleaved order, round by round, so machine noise spreads over all of them.
"""

from __future__ import annotations

import argparse
import itertools
import json
import platform
import statistics
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import transformers
from tqdm import tqdm

from envs.latency import PARTS, timed_answer
from envs.vlm.checkpoint import load_model


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--new-tokens", type=int, default=3)
    ap.add_argument("--image-size", type=int, nargs=2, default=(160, 200), metavar=("H", "W"))
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch default)")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = load_model(args.model)
    image = (np.random.default_rng(0).random((*args.image_size, 3)) * 255).astype(np.uint8)
    question = "which letter is written in the top left corner?"
    knobs = model.cfg.knob_lists()
    configs = list(itertools.product(knobs["tier"], knobs["top_k"], knobs["blocks"]))

    def run(cfg):
        return timed_answer(model, image, question, *cfg, max_new_tokens=args.new_tokens, ignore_eos=True)

    for cfg in configs[:: len(configs) // 5]:  # warm-up
        run(cfg)
    samples: dict[tuple, list] = {c: [] for c in configs}
    for _ in tqdm(range(args.repeats), desc="rounds"):
        for cfg in configs:
            samples[cfg].append(run(cfg))
    rows = []
    for cfg, runs in samples.items():
        rows.append(
            {
                "tier": cfg[0], "top_k": cfg[1], "blocks": cfg[2],
                "vision_tokens": runs[0].vision_tokens, "prompt_tokens": runs[0].prompt_tokens,
                "expert_calls": runs[0].generation.expert_calls[0],
                "total_ms": statistics.median(r.total_ms for r in runs),
                **{f"{p}_ms": statistics.median(r.parts_ms[p] for r in runs) for p in PARTS if p != "controller"},
            }
        )  # fmt: skip
    fastest = min(rows, key=lambda r: r["total_ms"])
    slowest = max(rows, key=lambda r: r["total_ms"])
    ratio = slowest["total_ms"] / fastest["total_ms"]
    print(f"{'tier':6} {'k':>2} {'blk':>3} {'tokens':>6} {'vision':>8} {'prefill':>8} {'decode':>8} {'total':>8}  ms")
    for r in rows:
        print(
            f"{r['tier']:6} {r['top_k']:>2} {r['blocks']:>3} {r['prompt_tokens']:>6} {r['vision_ms']:8.1f} "
            f"{r['prefill_ms']:8.1f} {r['decode_ms']:8.1f} {r['total_ms']:8.1f}"
        )
    print(
        f"max/min config latency: {ratio:.2f}x  (slowest {slowest['tier']}/k{slowest['top_k']}/b{slowest['blocks']} "
        f"{slowest['total_ms']:.1f} ms, fastest {fastest['tier']}/k{fastest['top_k']}/b{fastest['blocks']} "
        f"{fastest['total_ms']:.1f} ms)"
    )
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        meta = {
            "model": args.model, "device": "cpu", "cpu": platform.processor() or platform.machine(),
            "threads": torch.get_num_threads(), "torch": torch.__version__, "transformers": transformers.__version__,
            "date": time.strftime("%Y-%m-%d"), "repeats": args.repeats, "new_tokens": args.new_tokens,
            "image_size": list(args.image_size), "max_over_min": ratio,
        }  # fmt: skip
        args.out.write_text(json.dumps({"meta": meta, "configs": rows}, indent=1))
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
