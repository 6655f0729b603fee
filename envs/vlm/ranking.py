"""Block importance rankings of LLM layers 3..L-1; `blocks = n` keeps the top n.

Three methods, each recorded in the ranking it makes:
- `adalora`: AdaLoRA's sensitivity x uncertainty. Per weight, I = |w * dL/dw| on a calibration
  batch, smoothed I_bar = b1*I_bar + (1-b1)*I, uncertainty U_bar = b2*U_bar + (1-b2)*|I - I_bar|;
  a block scores sum(I_bar * U_bar) over its weights.
- `block_influence`: ShortGPT's 1 - cos(h_in, h_out), averaged over tokens.
- `leave_one_out`: exact-match accuracy lost when that one block is skipped.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from envs.atomic import write_json
from envs.vlm.errors import CheckpointError
from envs.vlm.metrics import exact_match

FIRST = 3


@dataclass
class BlockRanking:
    method: str
    order: list[int]  # layers of 3..L-1, most important first
    scores: dict[int, float]  # higher = more important
    calibration: str = ""

    @classmethod
    def index_order(cls, n_layers: int) -> BlockRanking:
        """Placeholder for an unranked model: keep the lowest layers first."""
        layers = list(range(FIRST, n_layers))
        return cls("index_order", layers, {i: float(n_layers - i) for i in layers}, "none")

    @classmethod
    def from_scores(cls, method: str, scores: dict[int, float], calibration: str) -> BlockRanking:
        order = sorted(scores, key=lambda i: (-scores[i], i))
        return cls(method, order, {int(i): float(s) for i, s in scores.items()}, calibration)

    def save(self, path: Path) -> None:
        write_json(path, asdict(self))

    @classmethod
    def load(cls, path: Path, n_layers: int) -> BlockRanking:
        d = json.loads(Path(path).read_text())
        r = cls(
            d["method"],
            [int(i) for i in d["order"]],
            {int(k): v for k, v in d["scores"].items()},
            d.get("calibration", ""),
        )
        if sorted(r.order) != list(range(FIRST, n_layers)):
            raise CheckpointError(f"{path}: the ranking must order exactly layers {FIRST}..{n_layers - 1}")
        return r


Sample = tuple  # (image, question, answer)


def _batches(samples: Sequence[Sample], batch_size: int):
    for i in range(0, len(samples), batch_size):
        chunk = samples[i : i + batch_size]
        yield [s[0] for s in chunk], [s[1] for s in chunk], [s[2] for s in chunk]


def _describe(samples, tier) -> str:
    return f"{len(samples)} samples at tier {tier}"


def adalora_ranking(
    model,
    samples: Sequence[Sample],
    tier: str = "high",
    batch_size: int = 8,
    beta1: float = 0.85,
    beta2: float = 0.85,
) -> BlockRanking:
    layers = list(range(model.cfg.llm.layers))
    blocks = {i: [p for p in model.llm.layers[i].parameters()] for i in range(FIRST, len(layers))}
    params = [p for ps in blocks.values() for p in ps]
    i_bar = [torch.zeros_like(p) for p in params]
    u_bar = [torch.zeros_like(p) for p in params]
    for images, questions, answers in tqdm(list(_batches(samples, batch_size)), desc="adalora", leave=False):
        prepared = model.prepare(images, questions, tier, answers=answers, grad=True)
        loss = model.answer_loss(prepared, layers, model.cfg.llm.top_k)
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        with torch.no_grad():
            for p, g, ib, ub in zip(params, grads, i_bar, u_bar, strict=True):
                sens = (p * g).abs() if g is not None else torch.zeros_like(p)
                ib.mul_(beta1).add_(sens, alpha=1 - beta1)
                ub.mul_(beta2).add_((sens - ib).abs(), alpha=1 - beta2)
    scores, k = {}, 0
    for i, ps in blocks.items():
        scores[i] = sum(float((i_bar[k + j] * u_bar[k + j]).sum()) for j in range(len(ps)))
        k += len(ps)
    return BlockRanking.from_scores("adalora", scores, _describe(samples, tier))


def block_influence_ranking(model, samples: Sequence[Sample], tier: str = "high", batch_size: int = 8) -> BlockRanking:
    n = model.cfg.llm.layers
    total = {i: 0.0 for i in range(FIRST, n)}
    count = 0.0
    for images, questions, _ in _batches(samples, batch_size):
        prepared = model.prepare(images, questions, tier)
        valid = prepared.valid.float()

        def on_layer(i, h_in, h_out, valid=valid):
            if i >= FIRST:
                cos = torch.nn.functional.cosine_similarity(h_in.float(), h_out.float(), dim=-1)
                total[i] += float(((1 - cos) * valid).sum())

        with torch.no_grad():
            model.forward_logits(prepared, list(range(n)), model.cfg.llm.top_k, on_layer)
        count += float(valid.sum())
    return BlockRanking.from_scores(
        "block_influence", {i: s / count for i, s in total.items()}, _describe(samples, tier)
    )


def leave_one_out_ranking(model, samples: Sequence[Sample], tier: str = "high", batch_size: int = 8) -> BlockRanking:
    n = model.cfg.llm.layers
    k = model.cfg.llm.top_k
    correct = {i: 0 for i in [None, *range(FIRST, n)]}
    for images, questions, answers in _batches(samples, batch_size):
        state = model.prefix(model.prepare(images, questions, tier))  # layers 0-2 once per batch
        for skip in correct:
            gen = model.generate(state, [i for i in range(n) if i != skip], k)
            correct[skip] += sum(exact_match(a, [b]) for a, b in zip(gen.answers, answers, strict=True))
    full = correct.pop(None)
    scores = {i: (full - c) / len(samples) for i, c in correct.items()}
    return BlockRanking.from_scores("leave_one_out", scores, _describe(samples, tier))


RANKINGS = {
    "adalora": adalora_ranking,
    "block_influence": block_influence_ranking,
    "leave_one_out": leave_one_out_ranking,
}


def compute_ranking(model, method: str, samples: Sequence[Sample], **kwargs) -> BlockRanking:
    if method not in RANKINGS:
        raise ValueError(f"unknown ranking method {method!r}; choose one of {sorted(RANKINGS)}")
    if not samples:
        raise ValueError("a block ranking needs at least one calibration sample")
    return RANKINGS[method](model, samples, **kwargs)
