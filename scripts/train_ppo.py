"""The main job: imitate the oracle, fine-tune with MaskablePPO, evaluate across budget distributions.

    python scripts/train_ppo.py --policy two_stage [--variant budget|prompt|router] [--quick] [--out DIR]
    python scripts/train_ppo.py --policy single_stage [--variant mlp|transformer]

Writes DIR/policy.zip, DIR/policy_bc.zip, eval.json, eval.md, eval.png and TensorBoard logs (DIR/tb).
"""

from __future__ import annotations

import argparse
import sys
import typing
from pathlib import Path

from agents.pipeline import Args, run
from envs.budgets import BudgetError


def parse(argv: list[str] | None) -> Args:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    hints = typing.get_type_hints(Args)
    for f in __import__("dataclasses").fields(Args):
        flag = "--" + f.name.replace("_", "-")
        if hints[f.name] is bool:
            ap.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default)
        elif hints[f.name] is Path:
            ap.add_argument(flag, type=Path, default=f.default)
        elif f.name == "variant":
            ap.add_argument(flag, default=None)
        else:
            ap.add_argument(flag, type=type(f.default), default=f.default)
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
    except (BudgetError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
