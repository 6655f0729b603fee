"""Prepare a model's assets for a dataset: latency profile, outcome tables, feature caches, plots, summary.

    python scripts/prepare_assets.py --model tiny --data synthvqa:7:300 --out runs/assets_synth
    python scripts/prepare_assets.py --model my_model/ --data vqav2:questions.json,annotations.json,images/ \\
        --out runs/assets_mine [--device cpu|cuda] [--profile FILE] [--split 0.6,0.2,0.2] [--executor local|ray]
    python scripts/prepare_assets.py --model my_model/ --data hf:my_dataset/ --question-column query --out ...

DATA: synthvqa:SEED:N, a .jsonl manifest (rows {"id", "image", "question", "answers"}), VQAv2's
vqav2:QUESTIONS.json,ANNOTATIONS.json,IMAGE_DIR, or hf:DIR (a datasets dataset saved with save_to_disk,
or a folder of parquet files; needs pyarrow: pip install -e '.[hf]'). The data is checked first
(columns, duplicate ids, unreadable images, empty splits) and split into train / val / test by a seeded
hash of each question id. The latency profile is --profile, else one the model has for --device, else
measured now (keep the machine quiet). Writes OUT/assets.json (the manifest train_ppo.py, evaluate.py
and answer.py read: --assets OUT), OUT/profiles/NAME.json, OUT/data/SPLIT.jsonl, OUT/tables/SPLIT/
(table.npz, pareto.png, resumable shards: run the same command again after an interruption) and
OUT/summary.md. Runs with one torch thread unless --threads says otherwise.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from envs.asset_manifest import AssetsError
from envs.prepare import prepare_assets
from envs.tasks.sources import Columns, DataError, parse_fractions
from envs.threads import add_threads_flag, use_threads
from envs.vlm.errors import CheckpointError


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="a preset name (tiny) or a model directory (save_model's)")
    ap.add_argument(
        "--data", required=True, help="synthvqa:SEED:N, FILE.jsonl, vqav2:Q.json,A.json,IMAGE_DIR or hf:DIR"
    )
    ap.add_argument("--out", type=Path, required=True, help="the assets directory to write (or resume)")
    ap.add_argument("--device", default="cpu", help="where the model runs and is profiled: cpu or cuda[:N]")
    ap.add_argument("--profile", type=Path, help="a latency profile file (scripts/profile_latency.py) to use "
                                                 "instead of the model's own or a fresh measurement")  # fmt: skip
    ap.add_argument("--split", default="0.6,0.2,0.2", help="train,val,test fractions of the questions")
    ap.add_argument("--split-seed", type=int, default=0, help="the seed of the question-id hash that splits")
    ap.add_argument(
        "--executor", choices=["local", "ray"], default="local", help="run table shards here or as Ray tasks"
    )
    ap.add_argument("--ray-address", help="with --executor ray: an existing cluster (default: a local one)")
    ap.add_argument("--image-column", default="image", help="hf: the image column")
    ap.add_argument("--question-column", default="question", help="hf: the question column")
    ap.add_argument("--answers-column", default="answers", help="hf: the answers column (a list of strings)")
    ap.add_argument("--id-column", default="question_id", help="hf: the question id column (else `id`, else the row)")
    ap.add_argument("--no-features", action="store_true", help="skip the feature caches (built on first use instead)")
    ap.add_argument("--batch-size", type=int, default=32, help="requests per batch while building tables")
    add_threads_flag(ap)
    args = ap.parse_args(argv)
    if args.device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            ap.error("--device cuda asked for, but torch sees no CUDA device")
    use_threads(args.threads)
    columns = Columns(args.image_column, args.question_column, args.answers_column, args.id_column)
    try:
        out = prepare_assets(args.model, args.data, args.out, args.device, args.profile, parse_fractions(args.split),
                             args.split_seed, args.executor, args.ray_address, columns, not args.no_features,
                             batch_size=args.batch_size)  # fmt: skip
    except (DataError, AssetsError, CheckpointError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print((out / "summary.md").read_text())
    print(f"wrote {out}; next: python scripts/train_ppo.py --policy two_stage --assets {out} --quick")
    return 0


if __name__ == "__main__":
    sys.exit(main())
