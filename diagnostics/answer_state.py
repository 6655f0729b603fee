"""Does the model read the question at the answer position? Residual RMS and spread per family.

    python scripts/answer_state.py --model tiny [--checkpoint runs/RUN/checkpoint.pt] --n 16 --tier medium

For each SynthVQA family, the hidden state at the position that predicts the first answer token
(the prompt's last), after every layer of the full config, on `--n` val scenes: its RMS and its
spread (norm of the std over scenes / norm of the mean). A family whose state is large and
nearly constant (spread << 1) is answered from its prior whatever the image or question: after
the final norm nothing else survives, and gradients through it are divided by that norm (the
training aid `--norm-cap` exists for it, `training/aids/norm_cap.py`).
"""

from __future__ import annotations

import argparse
import json

import torch

from envs.tasks.synthvqa import FAMILIES, SPLIT_SEEDS, make_sample
from envs.threads import add_threads_flag, use_threads
from envs.vlm.checkpoint import load_model
from envs.vlm.errors import CheckpointError
from envs.vlm.presets import TIERS


@torch.no_grad()
def answer_state(model, family: str, n: int, tier: str) -> dict[str, list[float]]:
    samples = [make_sample(SPLIT_SEEDS["val"], i, family) for i in range(n)]
    states: dict[int, torch.Tensor] = {}
    prepared = model.prepare([s.image for s in samples], [s.question for s in samples], tier)
    layers = list(range(model.cfg.llm.layers))
    model.forward_logits(prepared, layers, model.cfg.llm.top_k, on_layer=lambda i, _, h: states.update({i: h[:, -1]}))
    rms, spread = [], []
    for i in layers:
        h = states[i].float()
        rms.append(float(h.norm(dim=-1).mean() / h.shape[-1] ** 0.5))
        spread.append(float(h.std(0).norm() / h.mean(0).norm()))
    return {"rms": rms, "spread": spread}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="tiny", help="preset name with shipped weights, or a model directory")
    ap.add_argument("--checkpoint", help="a train_vlm.py checkpoint.pt whose weights replace the model's")
    ap.add_argument("--n", type=int, default=16)
    ap.add_argument("--tier", default="medium", choices=TIERS)
    ap.add_argument("--json", action="store_true", help="print JSON instead of a table")
    add_threads_flag(ap)
    args = ap.parse_args(argv)
    use_threads(args.threads)
    if args.n < 2:
        ap.error("--n must be >= 2 (the spread is a standard deviation over scenes)")
    try:
        model = load_model(args.model)
        if args.checkpoint:
            model.load_state_dict(torch.load(args.checkpoint, map_location="cpu", weights_only=True)["model"])
    except (CheckpointError, OSError) as e:
        ap.error(str(e))
    except (KeyError, RuntimeError) as e:  # not a train_vlm.py checkpoint, or one of another preset's shapes
        ap.error(f"{args.checkpoint} is not a train_vlm.py checkpoint of {args.model}: {str(e).splitlines()[0]}")
    model = model.float().eval()
    out = {fam: answer_state(model, fam, args.n, args.tier) for fam in FAMILIES}
    if args.json:
        print(json.dumps(out, indent=1))
    else:
        last = model.cfg.llm.layers - 1
        print(f"answer position, {args.n} val scenes per family, tier {args.tier}, full config")
        print(f"{'family':10s} {'RMS l0':>7s} {'RMS l2':>7s} {'RMS last':>9s} {'spread last':>12s}")
        for fam, s in out.items():
            print(f"{fam:10s} {s['rms'][0]:7.1f} {s['rms'][2]:7.1f} {s['rms'][last]:9.1f} {s['spread'][last]:12.2f}")
    return out


if __name__ == "__main__":
    main()
