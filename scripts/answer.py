"""Ask the VLM one question about one image with chosen knobs, or under a latency budget with the
knobs a trained controller picks.

    python scripts/answer.py --model tiny --image cat.png --question "what colour?" \
        --tier high --top-k 8 --blocks 13 --json
    python scripts/answer.py --policy runs/ppo_two_stage_budget/policy.zip --budget-ms 30 \
        --image cat.png --question "what colour?" --json
    python scripts/answer.py --model tiny --list-knobs

With --policy the request is served with the latency profile and controller charge the policy was trained
with (its zip records them; --profile overrides) and with the CPU threads that profile was measured with
(--threads overrides); --json adds the predicted latency, who chose the knobs (policy, or the budget guard's
fallback or repair) and the profile.
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings

import torch

from agents.serving import load_server
from envs.budgets import BudgetError
from envs.latency import timed_answer
from envs.threads import add_threads_flag, use_threads
from envs.vlm.checkpoint import load_model, model_config
from envs.vlm.errors import CheckpointError, InputError, KnobError


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="tiny", help="a preset name (tiny, molmoe-1b) or a model directory")
    ap.add_argument("--image", help="the image file")
    ap.add_argument("--question", help="the question about it")
    ap.add_argument("--tier", default="high", help="without --policy: the vision tier (low, medium, high)")
    ap.add_argument("--top-k", type=int, help="without --policy: experts per token (default the largest)")
    ap.add_argument("--blocks", type=int, help="without --policy: decoder blocks run (default all)")
    ap.add_argument("--max-new-tokens", type=int, help="without --policy: the longest answer, in tokens")
    ap.add_argument("--policy", help="a saved controller (train_ppo.py's policy.zip): it picks the knobs")
    ap.add_argument("--budget-ms", type=float, help="the request's latency budget, with --policy")
    ap.add_argument("--warmup", type=int, default=2, help="with --policy: untimed runs of the request first")
    ap.add_argument("--profile", help="with --policy: the latency profile (a file, or a name in the policy's assets) "
                                      "instead of the one it was trained with")  # fmt: skip
    threads = add_threads_flag(ap)
    threads.help = "torch CPU threads (default: with --policy, those its profile was measured with; else 1)"
    ap.add_argument("--json", action="store_true", help="print one JSON object with the answer and its costs")
    ap.add_argument("--list-knobs", action="store_true", help="print the knob values and tiers' max-crops as JSON")
    ap.add_argument(
        "--top-logits",
        type=int,
        default=0,
        metavar="N",
        help="with --json: the first generated token's N largest logits, as [[token_id, value], ...]",
    )
    args = ap.parse_args(argv)
    if args.policy is not None:
        return _serve(ap, args)
    use_threads(args.threads)
    try:
        if args.list_knobs:  # from the config alone: no weights are loaded
            cfg = model_config(args.model)
            knobs = cfg.knob_lists()
            print(json.dumps({"tier": knobs["tier"], "max_crops": dict(cfg.knobs.max_crops),
                              "top_k": knobs["top_k"], "blocks": knobs["blocks"]}))  # fmt: skip
            return 0
        with warnings.catch_warnings():
            warnings.simplefilter("default")
            model = load_model(args.model)
        if args.image is None or args.question is None:
            ap.error("--image and --question are required (or --list-knobs)")
        top_k = args.top_k if args.top_k is not None else max(model.cfg.knobs.top_k)
        blocks = args.blocks if args.blocks is not None else max(model.cfg.knobs.blocks)
        res = timed_answer(model, args.image, args.question, args.tier, top_k, blocks, args.max_new_tokens)
    except (InputError, KnobError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    gen = res.generation
    if not args.json:
        print(gen.answers[0])
        return 0
    out = {
        "answer": gen.answers[0],
        "tier": args.tier,
        "top_k": top_k,
        "blocks": blocks,
        "vision_tokens": res.vision_tokens,
        "prompt_tokens": res.prompt_tokens,
        "crops": res.crops,
        "generated_tokens": len(gen.token_ids[0]),
        "layers_run": gen.layers_run,
        "expert_calls": gen.expert_calls[0],
        "block_ranking": model.ranking.method,
        "latency_ms": {**{k: round(v, 3) for k, v in res.parts_ms.items()}, "total": round(res.total_ms, 3)},
    }
    if args.top_logits > 0:
        values, ids = gen.step_logits[0][0].float().topk(min(args.top_logits, gen.step_logits[0].shape[-1]))
        out["top_logits"] = [[int(i), float(v)] for i, v in zip(ids.tolist(), values.tolist(), strict=True)]
    print(json.dumps(out))
    return 0


def _serve(ap, args) -> int:
    if args.image is None or args.question is None or args.budget_ms is None:
        ap.error("--policy needs --image, --question and --budget-ms")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            server = load_server(args.policy, args.profile)
            use_threads(args.threads or server.threads)  # time requests on the profile's clock
            for _ in range(args.warmup + 1):  # a process's first requests pay one-time costs; time a warm one
                served = server.serve(args.image, args.question, args.budget_ms)
        predicted = server.predicted(args.image, args.question, served.config)
    except (InputError, CheckpointError, BudgetError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if not args.json:
        print(served.answer)
        return 0
    c = served.config
    print(json.dumps({"answer": served.answer, "tier": c.tier, "top_k": c.top_k, "blocks": c.blocks,
                      "budget_ms": args.budget_ms, "within_budget": served.total_ms <= args.budget_ms,
                      "predicted_ms": round(predicted, 3), "chosen_by": served.chosen_by,
                      "guarded": served.chosen_by == "guard", "repaired": served.chosen_by == "repair",
                      "profile": server.profile, "threads": torch.get_num_threads(),
                      "latency_ms": {**{k: round(v, 3) for k, v in served.parts_ms.items()},
                                     "total": round(served.total_ms, 3)}}))  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
