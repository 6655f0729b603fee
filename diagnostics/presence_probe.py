"""What the answer position of a presence question knows, layer by layer: linear probes.

    python scripts/presence_probe.py --model tiny --seed 11 --n 480 --out reports/presence_probe_tiny_seed11.md

"is there a small red star?" needs two operands at the position that predicts the answer: the
colour the question asks for (a text token) and the colour of the small stars the image shows.
For each layer in `--layers` this collects that position's residual after the layer (presence
questions of a fresh split, full config, `--tier`), fits a multinomial logistic regression on the
first 70% (standardised features, L2) and reports held-out accuracy for the asked colour, the found
colour (rows with exactly one small object of the asked shape) and the yes/no answer, beside the
majority-class rate. A probe that cannot read the asked colour says the comparison has nothing to
compare with, whatever the image side holds.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

from envs.atomic import write_json, write_text
from envs.tasks.synthvqa import COLOURS, TRAINING_SEEDS, asked_object, make_sample
from envs.tasks.synthvqa import asked_objects as looked_at
from envs.threads import add_threads_flag, use_threads
from envs.vlm.checkpoint import load_model
from envs.vlm.errors import CheckpointError
from envs.vlm.model import preprocess_requests
from envs.vlm.presets import TIERS
from training.aids.attention_guide import answer_positions

TARGETS = ("asked colour", "found colour", "answer")


def features(model, samples: list, tier: str, layers: list[int], batch: int = 32) -> dict[int, np.ndarray]:
    """{layer: [n, d]} residual after each of `layers` at the position predicting the answer (full config)."""
    got: dict[int, list] = {i: [] for i in layers}
    run = list(range(model.cfg.llm.layers))
    for start in range(0, len(samples), batch):
        part = samples[start : start + batch]
        pre = preprocess_requests(
            model.cfg,
            model.tokenizer,
            [s.image for s in part],
            [s.question for s in part],
            tier,
            [s.answer for s in part],
        )
        with torch.no_grad():
            prepared = model.connect(pre, model.encode_vision(pre.pixels()))
            rows, query = torch.arange(len(part)), answer_positions(prepared.targets)

            def keep(i, h_in, h_out, rows=rows, query=query):
                if i in got:
                    got[i].append(h_out[rows, query].float().numpy())

            model.forward_logits(prepared, run, model.cfg.llm.top_k, on_layer=keep)
    return {i: np.concatenate(v) for i, v in got.items()}


def labels(samples: list) -> dict[str, np.ndarray]:
    """Per target, a class per sample (-1: not defined for that sample)."""
    names = list(COLOURS)
    asked = [names.index(asked_object(s.question)[0]) for s in samples]
    found = []
    for s in samples:
        of_shape = looked_at(s, "shape")
        found.append(names.index(of_shape[0].colour) if len(of_shape) == 1 else -1)
    answer = [int(s.answer == "yes") for s in samples]
    return {"asked colour": np.array(asked), "found colour": np.array(found), "answer": np.array(answer)}


def probe_accuracy(x: np.ndarray, y: np.ndarray, train_share: float = 0.7, steps: int = 300) -> tuple[float, float]:
    """Held-out accuracy of a logistic regression fitted on the first `train_share` rows, and the
    held-out rate of the training split's majority class."""
    n_train = int(train_share * len(y))
    if n_train < 2 or n_train == len(y):
        raise ValueError(f"need rows on both sides of the split, got {len(y)}")
    xt = torch.tensor(x, dtype=torch.float32)
    yt = torch.tensor(y)
    mean, std = xt[:n_train].mean(0), xt[:n_train].std(0) + 1e-6
    xt = (xt - mean) / std
    classes = int(y.max()) + 1
    weight = torch.zeros(x.shape[1], classes, requires_grad=True)
    bias = torch.zeros(classes, requires_grad=True)
    opt = torch.optim.Adam([weight, bias], lr=0.05)
    with torch.enable_grad():
        for _ in range(steps):
            logits = xt[:n_train] @ weight + bias
            loss = torch.nn.functional.cross_entropy(logits, yt[:n_train]) + 1e-3 * weight.pow(2).sum()
            opt.zero_grad()
            loss.backward()
            opt.step()
    with torch.no_grad():
        held = ((xt[n_train:] @ weight + bias).argmax(1) == yt[n_train:]).float().mean().item()
    majority = np.bincount(y[:n_train]).argmax()
    return held, float((y[n_train:] == majority).mean())


def report(model, samples: list, tier: str, layers: list[int]) -> dict:
    feats, ys = features(model, samples, tier, layers), labels(samples)
    rows = []
    for layer in layers:
        row = {"layer": layer}
        for name in TARGETS:
            defined = ys[name] >= 0
            row[name], row[f"{name} majority"] = probe_accuracy(feats[layer][defined], ys[name][defined])
        rows.append(row)
    return {"tier": tier, "n": len(samples), "layers": rows}


def markdown(result: dict, model: str, seed: int) -> str:
    head = " | ".join(f"{t} (majority)" for t in TARGETS)
    lines = [
        f"{model}, SynthVQA seed {seed}, {result['n']} presence questions, {result['tier']} tier, full config.",
        "Held-out accuracy of linear probes on the answer position's residual after each layer.",
        "",
        f"| layer | {head} |",
        "|---|" + "---|" * len(TARGETS),
    ]
    for row in result["layers"]:
        cells = " | ".join(f"{row[t]:.2f} ({row[f'{t} majority']:.2f})" for t in TARGETS)
        lines.append(f"| {row['layer']} | {cells} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="tiny", help="'tiny' or a model directory")
    ap.add_argument("--seed", type=int, default=11)
    ap.add_argument("--n", type=int, default=480, help="presence questions")
    ap.add_argument("--tier", choices=TIERS, default="high")
    ap.add_argument("--layers", type=int, nargs="+", default=[1, 2, 4, 8, 15])
    ap.add_argument("--out", type=Path, help="write the table to this .md file and the figures beside it (.json)")
    add_threads_flag(ap)
    args = ap.parse_args(argv)
    use_threads(args.threads)
    if args.seed in TRAINING_SEEDS:
        ap.error(f"seed {args.seed} is one the model trained or was ranked on; pick a fresh one")
    if args.n < 20:
        ap.error("--n must be >= 20 (the probes fit on 70% and are scored on the rest)")
    try:
        model = load_model(args.model)
    except CheckpointError as e:
        ap.error(str(e))
    if any(not 0 <= i < model.cfg.llm.layers for i in args.layers):
        ap.error(f"--layers must lie in 0..{model.cfg.llm.layers - 1}")
    torch.manual_seed(0)
    samples = [make_sample(args.seed, i, "presence") for i in range(args.n)]
    result = report(model.float().eval(), samples, args.tier, sorted(set(args.layers)))
    text = markdown(result, args.model, args.seed)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        write_text(args.out, text)
        write_json(args.out.with_suffix(".json"), {"model": args.model, "seed": args.seed} | result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
