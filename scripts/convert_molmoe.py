"""Convert a local MolmoE checkpoint (Hugging Face remote-code layout, or megablocks' fused experts)
into a knob-rl model directory.

    python scripts/convert_molmoe.py --src /path/to/MolmoE-1B --out models/molmoe-1b --dtype float32

SRC holds config.json (Molmo's fields give every shape), tokenizer.json and the weights: one
model.safetensors, shards listed in model.safetensors.index.json, or *.bin files. Nothing is
downloaded. The model uses Molmo's token layout and prompt; its tiers are max-crops values
(--max-crops LOW,MEDIUM,HIGH, default 2,6,12; later editable in OUT/config.json, knobs.max_crops).
Check the result with `scripts/answer.py --model OUT --list-knobs`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from envs.threads import add_threads_flag, use_threads
from envs.vlm.convert import convert_checkpoint
from envs.vlm.errors import CheckpointError
from envs.vlm.presets import TIERS


def _max_crops(text: str) -> dict[str, int]:
    try:
        values = [int(x) for x in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected three integers LOW,MEDIUM,HIGH, got {text!r}") from None
    if len(values) != len(TIERS):
        raise argparse.ArgumentTypeError(f"expected three integers LOW,MEDIUM,HIGH, got {text!r}")
    return dict(zip(TIERS, values, strict=True))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--src", type=Path, required=True, help="the checkpoint directory")
    ap.add_argument("--out", type=Path, required=True, help="the model directory to write")
    ap.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default="bfloat16")
    ap.add_argument(
        "--max-crops", type=_max_crops, help="the tiers' max-crops values, LOW,MEDIUM,HIGH (default 2,6,12)"
    )
    ap.add_argument("--preset", help="take the shapes from a preset (tiny, molmoe-1b) when SRC has no config.json")
    add_threads_flag(ap)
    args = ap.parse_args(argv)
    use_threads(args.threads)
    try:
        out = convert_checkpoint(args.src, args.out, args.preset, getattr(torch, args.dtype), args.max_crops)
    except CheckpointError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
