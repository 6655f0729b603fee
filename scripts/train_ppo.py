"""The main job: imitate the oracle, fine-tune with MaskablePPO, evaluate across budget distributions.

    python scripts/train_ppo.py --policy two_stage [--variant budget|prompt|router] [--quick] [--out DIR]
    python scripts/train_ppo.py --policy single_stage [--variant mlp|transformer]
    python scripts/train_ppo.py --quick --controller-ms 1.0   # a reproducible run: the same numbers every time
    python scripts/train_ppo.py --policy two_stage --assets ASSETS --quick   # your own model and data
                                                  # (scripts/prepare_assets.py; docs/own_model_and_data.md)

Writes DIR/policy.zip, DIR/policy_bc.zip, eval.json, eval.md, eval.png and TensorBoard logs (DIR/tb).
--controller-ms X charges X ms per request for the controller instead of measuring it (a measured charge
differs between runs); the budget guard is then charged --guard-ms, by default X as well.
The policy zips record the model, profile and tables they were trained with (relative paths and hashes),
so evaluate.py and answer.py use the same ones. Runs with one torch thread unless --threads says otherwise.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import types
import typing
from pathlib import Path

from agents.args import HELP, Args
from agents.pipeline import run
from envs.asset_manifest import AssetsError
from envs.budgets import BudgetError


def _flag_type(hint):
    """The argparse type of a field: its own, or the non-None one of an optional field."""
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        return next(a for a in typing.get_args(hint) if a is not type(None))
    return hint


def parse(argv: list[str] | None) -> Args:
    """`Args` from the command line: one flag per field (`--ppo-steps` for `ppo_steps`; booleans also `--no-x`)."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    hints = typing.get_type_hints(Args)
    for f in dataclasses.fields(Args):
        flag, kind = "--" + f.name.replace("_", "-"), _flag_type(hints[f.name])
        help_ = f.metadata.get("help", HELP.get(f.name))
        if kind is bool:
            ap.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default, help=help_)
        else:
            ap.add_argument(flag, type=kind, default=f.default, help=help_)
    ns = ap.parse_args(argv)
    try:
        return Args(**vars(ns))
    except ValueError as e:
        ap.error(str(e))


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    if args.out == Path("runs/ppo"):
        light = "_light" if args.policy == "single_stage" and args.encoder == "light" else ""
        args.out = Path(f"runs/ppo_{args.policy}_{args.variant}{light}{'_quick' if args.quick else ''}")
    try:
        out = run(args)
    except (BudgetError, FileNotFoundError, AssetsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
