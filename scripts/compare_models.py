"""Compare VLM checkpoints on a few configs of one fresh SynthVQA split (quicker than eval_vlm's 75).

    python scripts/compare_models.py --seed 7 --n 400 --models runs/tiny_vlm_mix8/model tiny \
        --out reports/compare_models_stage8_stage9.json
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path

from envs.tasks.synthvqa import SynthVQA
from envs.vlm.checkpoint import load_model
from envs.vlm.errors import CheckpointError
from envs.vlm.evaluate import Config, accuracy_table, sweep

CONFIGS = [Config("high", 8, 13), Config("high", 1, 11), Config("high", 8, 5), Config("medium", 8, 13),
           Config("low", 8, 13), Config("low", 1, 5)]  # fmt: skip


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--n", type=int, default=400)
    ap.add_argument("--models", nargs="+", required=True, help="model directories or preset names")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)
    if args.n <= 0:
        ap.error("--n must be positive")
    samples = list(SynthVQA(args.seed, args.n))
    families = [s.family for s in samples]
    result = {"seed": args.seed, "n": args.n, "models": {}}
    for spec in args.models:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                model = load_model(spec)
            except CheckpointError as e:
                sys.exit(f"error: {e}")
        _, em, _ = sweep(model, samples, CONFIGS, progress=False)
        result["models"][spec] = accuracy_table(families, CONFIGS, em)
        for row in result["models"][spec]:
            print(spec, row["tier"], row["top_k"], row["blocks"], f"{row['accuracy']:.3f}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
