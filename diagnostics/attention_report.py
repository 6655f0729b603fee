"""Where the answer position looks: one head's attention mass on the objects a question is about.

    python scripts/attention_report.py --model runs/my_vlm/model --layer 2 --head 1 --seed 9 --n 300 \\
        --out reports/attention_my_vlm_seed9.md

For each tier and family, the mean attention mass that head `--head` of layer `--layer` puts, at the
position predicting the answer, on the vision tokens of the question's asked objects
(`synthvqa.asked_objects`) or, where the scene has none, on the first token (the null target of
`training/aids/attention_guide.py`); presence is split by what the scene's small objects share with the
question, so a head that finds the asked shape whatever its colour shows as low mass on the null
token for "shape elsewhere". Rows whose objects are too small for the tier are left out. The
uniform column is the mass an evenly spread head would put there. All layers run (full config).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

from envs.atomic import write_text
from envs.tasks.synthvqa import FAMILIES, PRESENCE_KINDS, TRAINING_SEEDS, SynthVQA, asks_presence, presence_kind
from envs.threads import add_threads_flag, use_threads
from envs.vlm.checkpoint import load_model
from envs.vlm.errors import CheckpointError
from envs.vlm.model import preprocess_requests
from envs.vlm.presets import TIERS
from training.aids.attention_guide import AttentionGuide, guide_masks


def masses(model, samples: list, tier: str, layer: int, head: int, batch: int = 16) -> tuple[np.ndarray, np.ndarray]:
    """Per sample: the head's mass on its targets and the mass a uniform head would put there (NaN: no target)."""
    got, uniform = np.full(len(samples), np.nan), np.full(len(samples), np.nan)
    side = model.cfg.vision.tokens_per_side
    for start in range(0, len(samples), batch):
        part = samples[start : start + batch]
        answers = [s.answer for s in part]
        pre = preprocess_requests(
            model.cfg, model.tokenizer, [s.image for s in part], [s.question for s in part], tier, answers
        )
        with torch.no_grad():
            prepared = model.connect(pre, model.encode_vision(pre.pixels()))
            guide = AttentionGuide(model, pre, prepared, guide_masks(part, pre.crops, side), (layer,), head)
            model.forward_logits(prepared, list(range(model.cfg.llm.layers)), model.cfg.llm.top_k, on_layer=guide)
        rows = guide.rows.nonzero().flatten().numpy()
        got[start + rows] = guide.row_masses[0].numpy()
        seen = prepared.valid[guide.rows] & (
            torch.arange(prepared.valid.shape[1])[None] <= guide.query[guide.rows, None]
        )
        uniform[start + rows] = (guide.targets.sum(-1) / seen.sum(-1)).numpy()
    return got, uniform


def report(model, samples: list, layer: int, head: int) -> str:
    groups = {f: [s.family == f for s in samples] for f in FAMILIES}
    kinds = [presence_kind(s) if asks_presence(s) else "" for s in samples]
    groups |= {f"presence: {k}": [k == kind for kind in kinds] for k in PRESENCE_KINDS if k in kinds}
    lines = [
        f"Layer {layer}, head {head}: attention mass on the asked objects (null token where absent), n, uniform mass",
        "",
        "| tier | group | mass | n | uniform |",
        "|---|---|---|---|---|",
    ]
    for tier in TIERS:
        got, uniform = masses(model, samples, tier, layer, head)
        for name, member in groups.items():
            keep = np.asarray(member) & ~np.isnan(got)
            if keep.any():
                lines.append(
                    f"| {tier} | {name} | {got[keep].mean():.3f} | {keep.sum()} | {uniform[keep].mean():.3f} |"
                )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="tiny", help="'tiny' or a model directory")
    ap.add_argument("--layer", type=int, default=2)
    ap.add_argument("--head", type=int, default=1)
    ap.add_argument("--seed", type=int, default=9)
    ap.add_argument("--n", type=int, default=300)
    ap.add_argument("--out", type=Path, help="also write the table to this .md file")
    add_threads_flag(ap)
    args = ap.parse_args(argv)
    use_threads(args.threads)
    if args.seed in TRAINING_SEEDS:
        ap.error(f"seed {args.seed} is one the model trained or was ranked on; pick a fresh one")
    if args.n < 1:
        ap.error("--n must be >= 1")
    try:
        model = load_model(args.model)
    except CheckpointError as e:
        ap.error(str(e))
    llm = model.cfg.llm
    if not 0 <= args.layer < llm.layers or not 0 <= args.head < llm.heads:
        ap.error(f"--layer must lie in 0..{llm.layers - 1} and --head in 0..{llm.heads - 1}")
    text = report(model.float().eval(), list(SynthVQA(args.seed, args.n)), args.layer, args.head)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        write_text(args.out, f"{args.model}, SynthVQA seed {args.seed}, n={args.n}\n\n" + text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
