"""Train the tiny VLM on SynthVQA with sampled knobs, rank its blocks, and save (optionally ship) it.

    python scripts/train_vlm.py --out runs/tiny_vlm --steps 3000 --ship envs/vlm/weights/tiny

Resumable: run the same command again after an interruption. TensorBoard logs in OUT/tb.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import typing
from pathlib import Path

from envs.tasks.synthvqa import FAMILIES, PRESENCE_LOOKS
from envs.vlm.train import TrainArgs, train


def parse(argv: list[str] | None) -> TrainArgs:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    hints = typing.get_type_hints(TrainArgs)
    for f in dataclasses.fields(TrainArgs):
        flag = "--" + f.name.replace("_", "-")
        if f.name == "tier_weights":
            ap.add_argument(flag, type=float, nargs=3, default=f.default, metavar=("LOW", "MED", "HIGH"))
        elif f.name == "family_weights":
            names = tuple(n.upper() for n in FAMILIES)
            ap.add_argument(flag, type=float, nargs=len(FAMILIES), default=f.default, metavar=names)
        elif f.name in ("attn_layers", "ask_layers", "match_layers", "carry_layers", "boost_layers"):
            ap.add_argument(flag, type=int, nargs="+", default=f.default, metavar="LAYER")
        elif f.name == "attn_families":
            ap.add_argument(flag, nargs="+", choices=FAMILIES, default=f.default, metavar="FAMILY")
        elif f.name == "attn_presence":
            ap.add_argument(flag, choices=PRESENCE_LOOKS, default=f.default)
        elif hints[f.name] is bool:
            ap.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default)
        elif hints[f.name] in (Path, Path | None):
            ap.add_argument(flag, type=Path, default=f.default)
        else:
            ap.add_argument(flag, type=type(f.default), default=f.default)
    ns = ap.parse_args(argv)
    args = TrainArgs(
        **{
            **vars(ns),
            "tier_weights": tuple(ns.tier_weights),
            "family_weights": tuple(ns.family_weights),
            "attn_layers": tuple(ns.attn_layers),
            "attn_families": tuple(ns.attn_families),
            "ask_layers": tuple(ns.ask_layers),
            "match_layers": tuple(ns.match_layers),
            "carry_layers": tuple(ns.carry_layers),
            "boost_layers": tuple(ns.boost_layers),
        }
    )
    if args.steps <= 0 or args.batch_size <= 0:
        ap.error("--steps and --batch-size must be positive")
    if (args.vision_steps > 0 or args.dense_aux_batch > 0) and args.aux_weight <= 0:
        ap.error("--vision-steps and --dense-aux-batch train on the dense vision loss: they need --aux-weight > 0")
    if args.dense_aux_batch < 0 or args.probe_n < 1:
        ap.error("--dense-aux-batch must be >= 0 and --probe-n >= 1")
    if args.norm_cap < 0 or args.norm_weight < 0:
        ap.error("--norm-cap and --norm-weight must be >= 0 (--norm-cap 0 turns the penalty off)")
    try:
        args.check()
    except ValueError as e:
        ap.error(str(e))
    if args.reinit_vision and args.init is None:
        ap.error("--reinit-vision keeps the LLM of --init DIR: give --init")
    return args


def main(argv: list[str] | None = None) -> int:
    out = train(parse(argv))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
