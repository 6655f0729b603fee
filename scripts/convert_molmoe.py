"""Convert a local MolmoE-1B checkpoint (Hugging Face remote-code layout) into a knob-rl model directory.

    python scripts/convert_molmoe.py --src /path/to/MolmoE-1B --out models/molmoe-1b

SRC holds the weights (*.safetensors or *.bin) and tokenizer.json; nothing is downloaded.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from envs.vlm.convert import convert_checkpoint
from envs.vlm.errors import CheckpointError


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--src", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--preset", default="molmoe-1b")
    ap.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default="bfloat16")
    args = ap.parse_args(argv)
    try:
        out = convert_checkpoint(args.src, args.out, args.preset, getattr(torch, args.dtype))
    except CheckpointError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
