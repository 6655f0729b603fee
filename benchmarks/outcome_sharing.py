"""Work shared by the outcome sweep vs the naive per-config run: layer evaluations and wall time.

    python benchmarks/outcome_sharing.py --model tiny --n 20 --out benchmarks/results/outcome_sharing.json

Both runs answer every sample under every config. The naive run calls the one-call path per
config (vision and layers 0-2 again each time); the sweep runs them once per (sample, tier).
Layer evaluations are counted with forward hooks: tokens through each ViT and LLM layer call.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path

from envs.tasks.synthvqa import SynthVQA
from envs.vlm.checkpoint import load_model
from envs.vlm.evaluate import all_configs, finish_all


def count_layer_tokens(model):
    counts = {"vit": 0, "llm": 0}

    def hook(kind):
        def fn(module, args, kwargs, out):
            h = kwargs.get("hidden_states", args[0] if args else None)
            counts[kind] += h.shape[0] * h.shape[1]

        return fn

    handles = [layer.register_forward_hook(hook("vit"), with_kwargs=True) for layer in model.vit.encoder.layers]
    handles += [layer.self_attn.register_forward_hook(hook("llm"), with_kwargs=True) for layer in model.llm.layers]
    return counts, handles


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--n", type=int, default=20)
    ap.add_argument("--batch-size", type=int, default=20)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = load_model(args.model)
    samples = list(SynthVQA(5, args.n))
    configs = all_configs(model)
    results = {}
    for mode in ("naive", "shared"):
        counts, handles = count_layer_tokens(model)
        t0 = time.perf_counter()
        answers = {}
        if mode == "shared":
            for j, idx, _, gen in finish_all(model, samples, configs, args.batch_size):
                for i, a in zip(idx, gen.answers, strict=True):
                    answers[(i, j)] = a
        else:
            for j, c in enumerate(configs):
                for b0 in range(0, len(samples), args.batch_size):
                    chunk = samples[b0 : b0 + args.batch_size]
                    gen = model.answer([s.image for s in chunk], [s.question for s in chunk], c.tier, c.top_k, c.blocks)
                    for i, a in enumerate(gen.answers):
                        answers[(b0 + i, j)] = a
        results[mode] = {"seconds": time.perf_counter() - t0, **counts, "answers": answers}
        for h in handles:
            h.remove()
    same = results["naive"]["answers"] == results["shared"]["answers"]
    report = {
        "n": args.n, "configs": len(configs), "same_answers": same,
        **{f"{m}_{k}": results[m][k] for m in results for k in ("seconds", "vit", "llm")},
        "vit_ratio": results["naive"]["vit"] / results["shared"]["vit"],
        "llm_ratio": results["naive"]["llm"] / results["shared"]["llm"],
        "wall_ratio": results["naive"]["seconds"] / results["shared"]["seconds"],
    }  # fmt: skip
    print(json.dumps(report, indent=1))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=1))
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
