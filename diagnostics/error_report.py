"""Which wrong answers a VLM gives, per question family and config, on a fresh SynthVQA split.

    python scripts/error_report.py --model tiny --seed 9 --n 1000 --out reports/errors_tiny_seed9.json

Accuracy says how often a family fails; this says how: the most frequent (truth -> answer)
confusions, accuracy per true answer, for numeric answers the signed error (answer - truth),
for yes/no answers the false-yes and false-no rates, and for presence the accuracy by what the
scene's small objects share with the question (a model that checks only the shape fails the
"shape elsewhere" negatives) and, on the same scenes, how well it names the colour of a small
shape ("what colour is the small star?", the attribute training question): the step presence
needs, asked on its own. Configs default to the full top-k and all
blocks at every tier, which shows what each tier adds. Prints a markdown table; --out FILE.json
writes the report and the table beside it (FILE.md).
"""

from __future__ import annotations

import argparse
import sys
import warnings
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

from envs.atomic import write_json, write_text
from envs.tasks.synthvqa import PRESENCE_KINDS, TRAINING_SEEDS, SynthVQA, complement, presence_kind
from envs.threads import add_threads_flag, use_threads
from envs.vlm.checkpoint import load_model
from envs.vlm.errors import CheckpointError, KnobError
from envs.vlm.evaluate import Config, sweep
from envs.vlm.metrics import normalize_answer


def family_errors(truths: Sequence[str], answers: Sequence[str], top: int = 8) -> dict:
    """How the answers of one family go wrong; answers are compared after VQA normalisation."""
    truths = [normalize_answer(t) for t in truths]
    answers = [normalize_answer(a) for a in answers]
    pairs = list(zip(truths, answers, strict=True))
    if not pairs:
        raise ValueError("no answers to summarise")
    wrong = Counter((t, a) for t, a in pairs if t != a)
    per_truth: dict[str, list[int]] = {}
    for t, a in pairs:
        per_truth.setdefault(t, []).append(t == a)
    out = {
        "n": len(pairs),
        "accuracy": sum(t == a for t, a in pairs) / len(pairs),
        "confusions": [[t, a, c] for (t, a), c in wrong.most_common(top)],
        "accuracy_by_truth": {t: [sum(v) / len(v), len(v)] for t, v in sorted(per_truth.items(), key=_answer_order)},
    }
    if all(t.isdigit() for t in truths):
        signed = Counter(int(a) - int(t) for t, a in pairs if a.isdigit() and t != a)
        out["signed_error"] = {str(d): c for d, c in sorted(signed.items())}
        out["not_a_number"] = sum(not a.isdigit() for a in answers)
    if set(truths) <= {"yes", "no"}:
        said_yes = {t: [a == "yes" for tt, a in pairs if tt == t] for t in ("yes", "no")}
        out["yes_rate"] = sum(a == "yes" for a in answers) / len(answers)
        out["false_yes"] = sum(said_yes["no"]) / len(said_yes["no"]) if said_yes["no"] else None
        out["false_no"] = 1 - sum(said_yes["yes"]) / len(said_yes["yes"]) if said_yes["yes"] else None
    return out


def accuracy_by_kind(kinds: Sequence[str], truths: Sequence[str], answers: Sequence[str]) -> dict:
    """{kind: [accuracy, n]} over the kinds present, in PRESENCE_KINDS order."""
    right: dict[str, list[bool]] = {}
    for k, t, a in zip(kinds, truths, answers, strict=True):
        right.setdefault(k, []).append(normalize_answer(t) == normalize_answer(a))
    return {k: [sum(right[k]) / len(right[k]), len(right[k])] for k in PRESENCE_KINDS if k in right}


def _answer_order(item):
    t = item[0]
    return (0, int(t), "") if t.isdigit() else (1, 0, t)


def parse_config(text: str) -> Config:
    try:
        tier, k, blocks = text.split("/")
        return Config(tier, int(k), int(blocks))
    except ValueError:
        raise argparse.ArgumentTypeError(f"a config is TIER/TOP_K/BLOCKS, e.g. high/8/13; got {text!r}") from None


def markdown(report: dict) -> str:
    lines = [
        "| config | family | accuracy | most frequent confusions (truth -> answer: count) | bias |",
        "|---|---|---|---|---|",
    ]
    for cfg in report["configs"]:
        name = f"{cfg['tier']}/{cfg['top_k']}/{cfg['blocks']}"
        for fam, e in cfg["by_family"].items():
            conf = ", ".join(f"{t}->{a}: {c}" for t, a, c in e["confusions"][:4]) or "-"
            if "yes_rate" in e:
                bias = f"says yes {e['yes_rate']:.2f}"
            elif "signed_error" in e:
                low = sum(c for d, c in e["signed_error"].items() if int(d) < 0)
                bias = f"wrong low {low}, high {sum(e['signed_error'].values()) - low}"
            else:
                bias = ""
            lines.append(f"| {name} | {fam} | {e['accuracy']:.3f} | {conf} | {bias} |")
    kinds = [k for k in PRESENCE_KINDS if any(k in c.get("presence_by_kind", {}) for c in report["configs"])]
    if kinds:
        lines += ["", "Presence by what the scene's small objects share with the question (accuracy, n):", ""]
        lines += ["| config | " + " | ".join(kinds) + " |", "|---|" + "---|" * len(kinds)]
        for cfg in report["configs"]:
            got = cfg.get("presence_by_kind", {})
            cells = [f"{got[k][0]:.3f} ({got[k][1]})" if k in got else "-" for k in kinds]
            lines.append(f"| {cfg['tier']}/{cfg['top_k']}/{cfg['blocks']} | " + " | ".join(cells) + " |")
    if any("small_colour" in c for c in report["configs"]):
        lines += ["", 'Colour of a small shape on the presence scenes ("what colour is the small star?"):', ""]
        lines += ["| config | accuracy | n |", "|---|---|---|"]
        for cfg in report["configs"]:
            acc, n = cfg["small_colour"]
            lines.append(f"| {cfg['tier']}/{cfg['top_k']}/{cfg['blocks']} | {acc:.3f} | {n} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--seed", type=int, required=True, help="split seed (fresh: not one of the training seeds)")
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument(
        "--configs", nargs="+", type=parse_config, help="TIER/TOP_K/BLOCKS (default: full top-k and blocks per tier)"
    )
    ap.add_argument("--out", type=Path)
    add_threads_flag(ap)
    args = ap.parse_args(argv)
    use_threads(args.threads)
    if args.n <= 0:
        ap.error("--n must be positive")
    if args.seed in TRAINING_SEEDS:
        print(f"warning: seed {args.seed} is a training split seed", file=sys.stderr)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            model = load_model(args.model)
        except CheckpointError as e:
            sys.exit(f"error: {e}")
    knobs = model.cfg.knob_lists()
    configs = args.configs or [Config(t, max(knobs["top_k"]), max(knobs["blocks"])) for t in knobs["tier"]]
    samples = list(SynthVQA(args.seed, args.n))
    asked = [complement(s, "attribute") for s in samples if s.family == "presence"]
    colour_questions = [c for c in asked if c is not None and c.question.startswith("what colour is the small")]
    try:
        # sweep checks every config's knobs before any work
        answers, exact, _ = sweep(model, samples + colour_questions, configs)
    except KnobError as e:
        sys.exit(f"error: {e}")
    families = {
        fam: [i for i, s in enumerate(samples) if s.family == fam] for fam in sorted({s.family for s in samples})
    }
    presence = families.get("presence", [])
    kinds = [presence_kind(samples[i]) for i in presence]  # the same for every config
    report = {"model": str(args.model), "seed": args.seed, "n": args.n, "configs": []}
    for j, cfg in enumerate(configs):
        by_family = {
            fam: family_errors([samples[i].answer for i in idx], [answers[i][j] for i in idx])
            for fam, idx in families.items()
        }
        row = {"tier": cfg.tier, "top_k": cfg.top_k, "blocks": cfg.blocks, "by_family": by_family}
        if presence:
            row["presence_by_kind"] = accuracy_by_kind(
                kinds, [samples[i].answer for i in presence], [answers[i][j] for i in presence]
            )
        if colour_questions:
            row["small_colour"] = [float(exact[len(samples) :, j].sum()) / len(colour_questions), len(colour_questions)]
        report["configs"].append(row)
    table = markdown(report)
    print(table)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        write_json(args.out, report)
        write_text(args.out.with_suffix(".md"), f"{args.model}, SynthVQA seed {args.seed}, n={args.n}\n\n{table}\n")
    return report


if __name__ == "__main__":
    main()
