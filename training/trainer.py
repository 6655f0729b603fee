"""Knob-elastic training of a preset on SynthVQA, then its block ranking.

Every batch samples a config (`batches.sample_knobs`): a tier, a router top-k and a subset of the
knobbed layers, so every config stays usable whatever ranking picks the layers later; the first
`full_steps`, and a `p_full` share after them, train the full config (progressive shrinking, as in
Once-for-All, then the "sandwich" rule of slimmable networks). The dense vision loss
(`vision_probe.py`) tells every vision token what it shows; the first `vision_steps` train the
vision encoder and connector on it alone, which is cheap (no LLM) and gives the LLM legible
features to learn from. Optional extra losses are training aids (`training/aids/`), looped over.
Read top to bottom: schedule, optimiser groups, setup/resume, loop, ranking, save.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import torch
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

from envs.atomic import atomic_path, write_json
from envs.tasks.synthvqa import SPLIT_SEEDS, SynthVQA
from envs.vlm.checkpoint import build_model, load_dir, save_model
from envs.vlm.evaluate import Config, accuracy_table, sweep
from envs.vlm.presets import TIERS
from envs.vlm.ranking import compute_ranking
from training.aids import AIDS, OnLayer, active_aids
from training.args import TrainArgs
from training.batches import StepMaker, step_inputs
from training.checkpoints import continue_head, save_checkpoint
from training.vision_probe import PROBE_FILE, VisionProbe, load_probe, probe_report, vision_tokens


def lr_at(step: int, args: TrainArgs) -> float:
    """Linear warm-up over `warmup` steps, then a cosine from `lr` to `min_lr` at `steps`."""
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    frac = (step - args.warmup) / max(1, args.steps - args.warmup)
    return args.min_lr + 0.5 * (args.lr - args.min_lr) * (1 + math.cos(math.pi * min(frac, 1.0)))


def validation_configs(model) -> list[Config]:
    """The largest and the smallest (top-k, blocks) at every tier."""
    k = model.cfg.knobs
    return [
        Config(t, top, blk)
        for t in TIERS
        for top, blk in ((max(k.top_k), max(k.blocks)), (min(k.top_k), min(k.blocks)))
    ]


def param_groups(model, probe: VisionProbe, args: TrainArgs) -> list[dict]:
    """AdamW groups: decayed matrices, undecayed norms/biases/embeddings, the probe, and the MoE MLPs of
    `boost_layers` at `boost_scale` times the rate. Why boost: an equality of two features (a presence
    check compares two colours) is an MLP's job, and a layer asked to learn it late in training can
    need a higher rate than the rest of a model being fine-tuned."""
    boosted = tuple(f"llm.layers.{i}.mlp." for i in args.boost_layers)
    groups = {(False, True): [], (False, False): [], (True, True): [], (True, False): []}
    for name, p in model.named_parameters():
        groups[(name.startswith(boosted), p.ndim >= 2 and "embed" not in name)].append(p)  # () matches none
    out = [
        {"params": params, "weight_decay": args.weight_decay if decay else 0.0}
        | ({"lr_scale": args.boost_scale} if boost else {})
        for (boost, decay), params in groups.items()
        if params or not boost  # the two plain groups always, so old checkpoints' optimiser states still load
    ]
    return out + [{"params": list(probe.parameters()), "weight_decay": 0.0}]


def each_hook(hooks: list[OnLayer | None]) -> OnLayer | None:
    """One `on_layer` hook calling every one of `hooks` that is not None (None if none is)."""
    live = [h for h in hooks if h is not None]
    if not live:
        return None

    def call_all(layer: int, h_in: torch.Tensor, h_out: torch.Tensor) -> None:
        for hook in live:
            hook(layer, h_in, h_out)

    return call_all


def start_model(args: TrainArgs):
    """A fresh model of `args.preset`, or the weights of `args.init` (its LLM only with `reinit_vision`)."""
    model = build_model(args.preset, seed=args.seed)
    if args.init:
        init = load_dir(args.init)
        if init.cfg.to_dict() != model.cfg.to_dict():
            raise ValueError(f"{args.init} is a {init.cfg.name} model with other shapes than preset {args.preset}")
        keep = {
            k: v
            for k, v in init.state_dict().items()
            if not (args.reinit_vision and k.startswith(("vit.", "connector.")))
        }
        model.load_state_dict(keep, strict=not args.reinit_vision)
    return model.to(args.device).train()


def resume(ckpt: Path, args: TrainArgs, model, probe, opt, heads: dict) -> int:
    """Load `ckpt` into the run's model, probe, aid heads and optimiser; the step it was written at."""
    state = torch.load(ckpt, map_location=args.device, weights_only=True)
    model.load_state_dict(state["model"])
    probe.load_state_dict(state["probe"])
    for aid in AIDS:  # a head missing on either side: the optimiser's groups would not match either
        if aid.head_key and (aid.head_key in heads) != (aid.head_key in state):
            raise ValueError(
                f"{ckpt} was written with other --{aid.weight_flag} options: resume with those or use a new --out"
            )
    for key, head in heads.items():
        head.load_state_dict(state[key])
    opt.load_state_dict(state["opt"])
    print(f"resumed from {ckpt} at step {state['step']}")
    return state["step"]


def validate(model, probe: VisionProbe, val: list, args: TrainArgs, step: int, writer, answers: bool) -> None:
    """Probe accuracy per tier and group; with `answers`, accuracy of `validation_configs` per family."""
    for t, groups in probe_report(model, probe, val[: args.probe_n]).items():
        for group, acc in groups.items():
            writer.add_scalar(f"probe/{t}/{group}", acc, step)
        tqdm.write(f"step {step} probe {t}: " + " ".join(f"{g} {a:.2f}" for g, a in groups.items()))
    if not answers:
        return
    configs = validation_configs(model)
    _, em, _ = sweep(model, val, configs, progress=False)
    for row in accuracy_table([s.family for s in val], configs, em):
        tag = f"{row['tier']}_k{row['top_k']}_b{row['blocks']}"
        writer.add_scalar(f"val/{tag}", row["accuracy"], step)
        for fam, acc in row["by_family"].items():
            writer.add_scalar(f"val_family/{tag}/{fam}", acc, step)
        tqdm.write(f"step {step} {tag}: {row['accuracy']:.3f} {json.dumps(row['by_family'])}")


def train(args: TrainArgs) -> Path:
    """Train, rank the blocks and save the model to OUT/model (and `ship`); resumes OUT/checkpoint.pt."""
    args.check()
    args.out.mkdir(parents=True, exist_ok=True)
    write_json(args.out / "args.json", args.to_dict())
    model = start_model(args)
    probe = VisionProbe(model.cfg.llm.d_model).to(args.device)
    aids = [aid(args, model) for aid in active_aids(args)]
    heads = {aid.head_key: aid.head for aid in aids if aid.head is not None}  # training-only weights of the aids
    if args.init and not (args.reinit_vision or args.fresh_probe):
        load_probe(probe, args.init)
    for aid in aids:
        if aid.head is not None and args.init:  # where the run that trained `init` had this head too
            continue_head(aid.head, aid.head_name, args.init, aid.head_key)
    opt = torch.optim.AdamW(param_groups(model, probe, args), lr=args.lr, betas=(0.9, 0.95))
    for aid in aids:
        if aid.head is not None:
            opt.add_param_group(
                {"params": list(aid.head.parameters()), "weight_decay": 0.0, "lr_scale": aid.head_lr_scale}
            )
    ckpt = args.out / "checkpoint.pt"
    start = resume(ckpt, args, model, probe, opt, heads) if ckpt.exists() else 0
    writer = SummaryWriter(str(args.out / "tb"))
    val = list(SynthVQA(SPLIT_SEEDS["val"], args.val_n))
    t0 = time.time()
    end = args.stop_at or args.steps
    bar = tqdm(range(start, end), initial=start, total=end, desc="train")
    inputs = step_inputs(StepMaker(args, model.cfg, model.tokenizer), start, end, args.workers)
    for step, step_in in zip(bar, inputs, strict=True):
        tier, top_k, layers, pre = step_in.tier, step_in.top_k, step_in.layers, step_in.pre
        warm_up = step < args.vision_steps
        for g in opt.param_groups:
            g["lr"] = lr_at(step, args) * g.get("lr_scale", 1.0)
        prepared = model.connect(pre, model.encode_vision(pre.pixels()))
        # a fresh probe's loss is large and random: while it learns, its gradients stay out of the ViT
        probe_only = (lambda t: t.detach()) if step < args.probe_warmup else (lambda t: t)
        aux = probe.loss(probe_only(prepared.image_tokens), step_in.targets) if args.aux_weight > 0 else torch.zeros(())
        if step_in.dense_pre is not None:
            aux = aux + probe.loss(probe_only(vision_tokens(model, step_in.dense_pre)), step_in.dense_targets)
        if warm_up:
            loss, shown = aux, {}  # the LLM is not run: vision warm-up
        else:
            hooks = [aid.hook(model, pre, prepared, t) for aid, t in zip(aids, step_in.aid_targets, strict=True)]
            answer = model.answer_loss(prepared, layers, top_k, on_layer=each_hook(hooks))
            loss, shown = answer + args.aux_weight * aux, {"answer": answer.item()}
            for aid, hook in zip(aids, hooks, strict=True):
                for part in aid.parts(hook) if hook is not None else []:  # none where nothing ran
                    loss = loss + part.weight * part.value
                    shown[part.name] = part.value.item()
                    writer.add_scalar(f"train/{part.tag}", shown[part.name], step)
                    for key, value in part.scalars.items():
                        writer.add_scalar(f"train/{key}", value, step)
            writer.add_scalar("train/loss", shown["answer"], step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        opt.step()
        shown["aux"] = aux.item()
        bar.set_postfix({k: f"{v:.3f}" for k, v in shown.items()} | {"tier": tier, "k": top_k, "d": len(layers)})
        writer.add_scalar("train/aux_loss", shown["aux"], step)
        writer.add_scalar("train/grad_norm", float(gnorm), step)
        writer.add_scalar("train/lr", lr_at(step, args), step)
        writer.add_scalar("train/depth", len(layers), step)
        if (step + 1) % args.ckpt_every == 0 or step + 1 == end:
            save_checkpoint(ckpt, model, probe, opt, step + 1, heads)
        if (step + 1) % args.val_every == 0 or step + 1 == end:
            model.eval()
            validate(model, probe, val, args, step + 1, writer, answers=not warm_up)  # answers once the LLM trains
            model.train()
        if args.max_minutes > 0 and time.time() - t0 > 60 * args.max_minutes:
            save_checkpoint(ckpt, model, probe, opt, step + 1, heads)
            end = step + 1
            tqdm.write(f"stopped at step {end} of {args.steps}: --max-minutes {args.max_minutes} reached")
            break
    writer.add_scalar("train/minutes", (time.time() - t0) / 60, end)
    writer.close()

    model.eval()
    calib = [(s.image, s.question, s.answer) for s in SynthVQA(SPLIT_SEEDS["calibration"], args.ranking_n)]
    model.ranking = compute_ranking(model, args.ranking, calib, tier="high")
    print(f"block ranking ({model.ranking.method}): {model.ranking.order}")
    out = save_model(model, args.out / "model", dtype=getattr(torch, args.ship_dtype))
    with atomic_path(out / PROBE_FILE) as tmp:  # training-only, read by a later --init
        torch.save(probe.state_dict(), tmp)
    if args.ship:
        save_model(model, args.ship, dtype=getattr(torch, args.ship_dtype))
        with atomic_path(args.ship / PROBE_FILE) as tmp:  # a run from the shipped model continues it
            torch.save(probe.state_dict(), tmp)
    return out
