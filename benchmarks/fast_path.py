"""Device check: does the fast path make the knobs pay off in wall-clock time?

    python benchmarks/fast_path.py --preset molmoe-1b --device cuda --out benchmarks/results/fast_path_h100.json
    python benchmarks/fast_path.py --preset tiny --device cpu --out /tmp/fast_path_cpu.json   # dry run

Builds the preset with random weights (latency depends on shapes only), checks the fast path's
answers and first-token logits against the plain path, then times both paths in one run on the
same requests: vision per tier, prefill and decode of the full and the cheapest config, MoE time
at the high tier for top-k 8 and 2, and the end-to-end span (vision + prefill + 3 decode tokens).
Each figure is printed beside the floor it implies: decode against the bytes of active weights at
the copy bandwidth measured here, prefill against its FLOPs at the bf16 matmul rate measured here.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from envs.latency import PROFILE_QUESTION, StageTimer, full_tier_image, median_ms, timed_prefix
from envs.tasks.synthvqa import make_sample
from envs.vlm.checkpoint import build_model
from envs.vlm.fast import Phase
from envs.vlm.staged import moe_forward

NEW_TOKENS = 3
TARGETS = {"decode_full_ms": 3.0, "prefill_full_high_ms": 20.0, "span_ratio": 6.0, "moe_cut_8_to_2": 0.30}


def request_parts(model, image, question, tier, top_k, blocks, repeats, warmup) -> dict[str, float]:
    """Median ms of vision, prefill (layers 0-2 + the rest) and decode per token, on the path in use."""
    runs: dict[str, list[float]] = {"vision": [], "prefill": [], "decode_per_token": []}
    for r in range(warmup + repeats):
        timer = StageTimer(model.device)
        _, prepared, state = timed_prefix(model, image, question, tier, timer)
        with torch.no_grad():
            gen = model.generate(state, model.layers_for(blocks), top_k, NEW_TOKENS, timer=timer, ignore_eos=True)
        if r >= warmup:
            runs["vision"].append(timer.ms["vision"])
            runs["prefill"].append(timer.ms["prefill"])
            runs["decode_per_token"].append(timer.ms["decode"] / max(1, gen.decode_steps[0]))
    out = {k: float(np.median(v)) for k, v in runs.items()}
    out["span"] = out["vision"] + out["prefill"] + NEW_TOKENS * out["decode_per_token"]
    out["prompt_tokens"] = prepared.prompt_tokens[0]
    out["crops"] = prepared.n_crops[0]
    return out


def moe_ms(model, tokens: int, top_k: int, graphs: bool, repeats: int, warmup: int) -> float:
    """One knobbed layer's MoE block over `tokens` tokens (the high tier's prompt)."""
    layer = model.llm.layers[5]
    x = torch.randn(1, tokens, model.cfg.llm.d_model, device=model.device, dtype=model.dtype)
    with torch.no_grad():
        phase = Phase(lambda: moe_forward(layer.mlp, x, top_k), graphs)
        return median_ms(phase, model.device, repeats, warmup)


def floors(model, device, prompt_tokens: int) -> dict[str, float]:
    """Decode: active weight bytes / measured copy bandwidth. Prefill: FLOPs / measured bf16 matmul rate."""
    lm = model.cfg.llm
    bytes_per = torch.finfo(model.dtype).bits // 8
    attn = 4 * lm.d_model * lm.d_model
    expert = 3 * lm.d_model * lm.expert_hidden
    active = lm.layers * (attn + lm.d_model * lm.experts + lm.top_k * expert) + lm.output_vocab_size * lm.d_model
    n = 256 * 2**20 if device.type == "cuda" else 16 * 2**20
    src = torch.empty(n, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    copy_ms = median_ms(lambda: dst.copy_(src), device, 10, 3)
    bandwidth = 2 * n / (copy_ms / 1e3)  # read + write
    m = 8192 if device.type == "cuda" else 512
    a = torch.randn(m, m, device=device, dtype=model.dtype)
    mm_ms = median_ms(lambda: a @ a, device, 10, 3)
    flops_rate = 2 * m**3 / (mm_ms / 1e3)
    prefill_flops = 2 * (active - lm.output_vocab_size * lm.d_model) * prompt_tokens
    prefill_flops += 2 * lm.layers * prompt_tokens**2 * lm.d_model  # causal attention scores and values
    return {
        "active_weight_bytes_per_token": active * bytes_per,
        "measured_bandwidth_GBps": bandwidth / 1e9,
        "decode_floor_ms": active * bytes_per / bandwidth * 1e3,
        "measured_matmul_TFLOPs": flops_rate / 1e12,
        "prefill_flops_high": prefill_flops,
        "prefill_floor_ms": prefill_flops / flops_rate * 1e3,
    }


def equality(model, device, n: int = 4) -> dict:
    """First-token logits and greedy answers, plain vs fast, on SynthVQA requests at the medium tier."""
    samples = [make_sample(2, i) for i in range(n)]
    images, questions = [s.image for s in samples], [s.question for s in samples]
    results = {}
    for path in ("plain", "fast"):
        model.use_fast_path(None) if path == "plain" else model.use_fast_path(graphs=device.type == "cuda")
        with torch.no_grad():
            state = model.prefix(model.prepare(images, questions, "medium"))
            results[path] = [model.finish(state, k, b, NEW_TOKENS) for k, b in ((8, 13), (2, 7))]
    model.use_fast_path(None)
    rel, agree = [], []
    for p, f in zip(results["plain"], results["fast"], strict=True):
        a, b = p.step_logits[0].float(), f.step_logits[0].float()
        rel.append(float((a - b).abs().max() / a.abs().max()))
        agree += [x == y for x, y in zip(p.answers, f.answers, strict=True)]
    return {"max_rel_first_logits": max(rel), "answer_agreement": float(np.mean(agree)), "requests": len(agree)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="molmoe-1b")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--compile", action="store_true", help="also torch.compile each layer on the fast path")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda asked for, but torch sees no CUDA device")
    t0 = time.time()
    model = build_model(args.preset, device=device, dtype=getattr(torch, args.dtype))
    print(f"built {args.preset} on {device} in {time.time() - t0:.0f} s", flush=True)
    image = full_tier_image(model.cfg.vision.crop_size)  # 1 / 5 / 13 views at low / medium / high
    question = PROFILE_QUESTION
    k_max, b_max = max(model.cfg.knobs.top_k), max(model.cfg.knobs.blocks)
    k_min, b_min = min(model.cfg.knobs.top_k), min(model.cfg.knobs.blocks)
    report: dict = {"preset": args.preset, "device": torch.cuda.get_device_name(device) if device.type == "cuda"
                    else "cpu", "dtype": args.dtype, "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"),
                    "targets": TARGETS}  # fmt: skip
    report["equality"] = equality(model, device)
    print("fast vs plain:", json.dumps(report["equality"]), flush=True)
    for path in ("plain", "fast"):
        if path == "fast":
            model.use_fast_path(graphs=device.type == "cuda", compile_layers=args.compile)
        rows = {}
        for name, tier, k, b in (("full_high", "high", k_max, b_max), ("min_low", "low", k_min, b_min),
                                 ("full_medium", "medium", k_max, b_max), ("top2_high", "high", 2, b_max)):  # fmt: skip
            rows[name] = request_parts(model, image, question, tier, k, b, args.repeats, args.warmup)
            print(path, name, json.dumps({k: round(v, 2) for k, v in rows[name].items()}), flush=True)
        tokens = rows["full_high"]["prompt_tokens"]
        rows["moe_high_k8_ms"] = moe_ms(model, tokens, k_max, path == "fast" and device.type == "cuda",
                                        args.repeats, args.warmup)  # fmt: skip
        rows["moe_high_k2_ms"] = moe_ms(model, tokens, 2, path == "fast" and device.type == "cuda",
                                        args.repeats, args.warmup)  # fmt: skip
        report[path] = rows
    model.use_fast_path(None)
    report["floors"] = floors(model, device, report["fast"]["full_high"]["prompt_tokens"])
    figures = {}
    for path in ("plain", "fast"):
        r = report[path]
        figures[path] = {
            "decode_full_ms": r["full_high"]["decode_per_token"],
            "prefill_full_high_ms": r["full_high"]["prefill"],
            "span_ratio": r["full_high"]["span"] / r["min_low"]["span"],
            "moe_cut_8_to_2": 1 - r["moe_high_k2_ms"] / r["moe_high_k8_ms"],
        }
    report["figures"] = figures
    report["minutes"] = (time.time() - t0) / 60
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1))
    fl = report["floors"]
    print(f"\n{args.preset} on {report['device']} ({args.dtype}); floors: decode {fl['decode_floor_ms']:.2f} ms "
          f"({fl['measured_bandwidth_GBps']:.0f} GB/s), high-tier prefill {fl['prefill_floor_ms']:.2f} ms "
          f"({fl['measured_matmul_TFLOPs']:.0f} TFLOP/s)")  # fmt: skip
    print("| figure | target | plain | fast |\n|---|---|---|---|")
    for name, target in TARGETS.items():
        print(f"| {name} | {target} | {figures['plain'][name]:.3f} | {figures['fast'][name]:.3f} |")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
