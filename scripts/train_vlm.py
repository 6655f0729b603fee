"""Train a VLM preset on SynthVQA with sampled knobs, rank its blocks, and save (optionally ship) it.

    python scripts/train_vlm.py --out runs/tiny_vlm --steps 3000 --ship envs/vlm/weights/tiny
    python scripts/train_vlm.py --recipe training/recipes/01_vqa.json   # one step of the shipped lineage

Resumable: run the same command again after an interruption (or `--recipe OUT/args.json`).
TensorBoard logs in OUT/tb. Every option: `--help`; what they do: docs/ and training/.
Runs with one torch thread unless --threads N (or $KNOB_RL_THREADS) says otherwise: on an idle
machine, training a larger preset gains from more.
"""

from __future__ import annotations

import sys

from envs.threads import use_threads
from training.cli import parse_command
from training.trainer import train


def main(argv: list[str] | None = None) -> int:
    args, threads = parse_command(argv, __doc__)
    use_threads(threads)
    out = train(args)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
