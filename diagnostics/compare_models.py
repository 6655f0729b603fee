"""Compare VLM checkpoints on a few configs of one fresh SynthVQA split (quicker than eval_vlm's every config).

    python scripts/compare_models.py --seed 7 --n 400 --models runs/my_vlm/model tiny \
        --out reports/compare_models_my_vlm_tiny.json
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

from envs.atomic import write_json
from envs.tasks.synthvqa import SynthVQA
from envs.threads import add_threads_flag, use_threads
from envs.vlm.checkpoint import load_model
from envs.vlm.errors import CheckpointError
from envs.vlm.evaluate import Config, accuracy_table, sweep


def comparison_configs(knobs: dict[str, list]) -> list[Config]:
    """Six configs spanning a knob space (`VLMConfig.knob_lists()`): the full config at every tier, and
    at the high tier the fewest experts with one block less than all, and all experts with the fewest
    blocks; the cheapest config of the low tier last."""
    tiers, ks, bs = knobs["tier"], knobs["top_k"], knobs["blocks"]
    low, high = tiers[0], tiers[-1]
    return [
        Config(high, ks[-1], bs[-1]),
        Config(high, ks[0], bs[-2]),
        Config(high, ks[-1], bs[0]),
        *(Config(t, ks[-1], bs[-1]) for t in reversed(tiers[:-1])),
        Config(low, ks[0], bs[0]),
    ]


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--n", type=int, default=400)
    ap.add_argument("--models", nargs="+", required=True, help="model directories or preset names")
    ap.add_argument("--out", type=Path)
    add_threads_flag(ap)
    args = ap.parse_args(argv)
    use_threads(args.threads)
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
        configs = comparison_configs(model.cfg.knob_lists())
        _, em, _ = sweep(model, samples, configs, progress=False)
        result["models"][spec] = accuracy_table(families, configs, em)
        for row in result["models"][spec]:
            print(spec, row["tier"], row["top_k"], row["blocks"], f"{row['accuracy']:.3f}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        write_json(args.out, result)
    return result


if __name__ == "__main__":
    main()
