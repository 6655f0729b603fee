"""Guided attention: a training loss on where the answer position looks, and what it reads there.

The vision tokens can carry an object's shape and colour while the answer position never reads the
asked object's. Here one attention head of the answer position (by default at layer 2, which every
config runs) is told which vision tokens show the objects the question is about
(`synthvqa.asked_objects`), or, where the scene has none, the first token (a null target): the loss
is -log of the attention mass there, as supervised-attention VQA models train attention maps toward
where people looked. For presence the target is the small object of the asked colour *and* shape,
so a head that scores a colour match plus a shape match reads the answer itself.

Presence can also be taught as two steps (`--attn-presence shape --read-weight W`): the head looks
at the small objects of the asked shape, and the guided layer's output at the answer position must
name their colours through the model's own LM head (`colour_reads`); comparing that colour with the
asked one is left to the later layers, which `--early-weight` asks to answer by the guided layer.

`answer_attention` recomputes the head's softmax from the layer's input with the layer's own
weights (norm, q/k projections and norms, rotary), so the loss sees the probabilities `run_layer`
used, and nothing in the served forward changes.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from envs.tasks.dense_labels import object_token_mask
from envs.tasks.synthvqa import (
    COLOURS,
    FAMILIES,
    PRESENCE_LOOKS,
    SMALL_SIZE,
    asked_object,
    asked_objects,
    asks_presence,
)
from envs.vlm.model import Prepared, Preprocessed
from envs.vlm.staged import rotate_half
from training.aids.base import LossTerm, Part


@dataclass
class AttentionGuideOptions:
    attn_weight: float = 0.0  # > 0: guide where the answer position looks
    attn_layers: tuple[int, ...] = (2,)  # layers whose `attn_head` is guided (0-2 run in every config)
    attn_head: int = 1  # the guided head of each of those layers
    attn_families: tuple[str, ...] = field(  # the families whose rows the guide points
        default=FAMILIES, metadata={"choices": FAMILIES, "metavar": "FAMILY"}
    )
    attn_presence: str = field(default="match", metadata={"choices": PRESENCE_LOOKS})  # or "shape": see asked_objects
    read_weight: float = 0.0  # > 0: name the looked-at colours at the guided layers (two-step presence)
    early_weight: float = 0.0  # > 0: presence answers read at the guided layers too (deep supervision)


def answer_positions(targets: torch.Tensor) -> torch.Tensor:
    """Index [B] of the position that predicts each row's first answer token (targets: [B, T], -100 off answers)."""
    predicts = targets[:, 1:] != -100  # position t predicts token t + 1
    if not predicts.any(dim=1).all():
        raise ValueError("every row needs a teacher-forced answer")
    return predicts.int().argmax(dim=1)


def answer_attention(layer: nn.Module, h_in: torch.Tensor, position_embeddings, valid, query: torch.Tensor):
    """Attention probabilities [B, heads, T] of position `query[b]` of each row in `layer` (an
    `OlmoeDecoderLayer`) given its input `h_in` [B, T, d]: `OlmoeAttention`'s arithmetic for one query."""
    attn = layer.self_attn
    b, t, _ = h_in.shape
    rows = torch.arange(b, device=h_in.device)
    x = layer.input_layernorm(h_in)
    q, k = attn.q_norm(attn.q_proj(x[rows, query])), attn.k_norm(attn.k_proj(x))
    if attn.config.clip_qkv is not None:
        q, k = (
            q.clamp(-attn.config.clip_qkv, attn.config.clip_qkv),
            k.clamp(-attn.config.clip_qkv, attn.config.clip_qkv),
        )
    q = q.view(b, -1, attn.head_dim)  # [B, H, hd]
    k = k.view(b, t, -1, attn.head_dim).transpose(1, 2)  # [B, H, T, hd]
    cos, sin = position_embeddings  # [B, T, hd]
    q = q * cos[rows, query][:, None] + rotate_half(q) * sin[rows, query][:, None]
    k = k * cos[:, None] + rotate_half(k) * sin[:, None]
    scores = torch.einsum("bhd,bhtd->bht", q, k).float() * attn.scaling
    seen = valid & (torch.arange(t, device=h_in.device)[None] <= query[:, None])
    return torch.softmax(scores.masked_fill(~seen[:, None], float("-inf")), dim=-1)


def guide_masks(
    samples: list, crops: list, tokens_per_side: int, families=FAMILIES, presence: str = "match"
) -> list[np.ndarray | None]:
    """Per sample, a bool mask over its vision tokens (connector order) of its asked objects
    (`synthvqa.asked_objects(sample, presence)`); all False where the scene has none (look at the null
    token); None where they are too small for these crops (nothing to say: the answer cannot be read
    at this tier) or the sample's family is not among `families`."""
    out = []
    for sample, c in zip(samples, crops, strict=True):
        if sample.family not in families:
            out.append(None)
            continue
        objects = asked_objects(sample, presence)
        mask = object_token_mask(objects, c, tokens_per_side)
        out.append(mask if mask.any() or not objects else None)
    return out


def colour_reads(samples: list, crops: list, tokens_per_side: int) -> np.ndarray:
    """[B, len(COLOURS)]: for a presence-family row, the share of each colour among the small objects of
    the asked shape that these crops show (what a reader finds in the first step of "is there a small
    red star?": the small stars' colours); zeros elsewhere (no such object, too small, other family)."""
    out = np.zeros((len(samples), len(COLOURS)), dtype=np.float32)
    for i, (sample, c) in enumerate(zip(samples, crops, strict=True)):
        if sample.family != "presence":
            continue
        objects = asked_objects(sample, "shape")
        if objects and object_token_mask(objects, c, tokens_per_side).any():
            for o in objects:
                out[i, list(COLOURS).index(o.colour)] += 1 / len(objects)
    return out


def target_positions(pre: Preprocessed, token_masks: list[np.ndarray | None], length: int) -> torch.Tensor:
    """Bool [B, length]: the sequence positions (left-padded to `length`) of the vision tokens each row's
    mask marks (connector order = `pre.patch_positions` order); the first token for an all-False mask;
    nothing for None."""
    out = torch.zeros(len(pre.token_ids), length, dtype=torch.bool)
    for i, (seq, patches, mask) in enumerate(zip(pre.token_ids, pre.patch_positions, token_masks, strict=True)):
        if mask is None:
            continue
        if len(mask) != len(patches):
            raise ValueError(f"row {i}: a mask over {len(mask)} vision tokens for {len(patches)} patch positions")
        offset = length - len(seq)
        if mask.any():
            out[i, np.asarray(patches, dtype=np.int64)[mask] + offset] = True
        else:
            out[i, offset] = True  # <bos>: the null target
    return out


def asked_colour_positions(samples: list, pre: Preprocessed, tokenizer, length: int) -> torch.Tensor:
    """Bool [B, length]: in each "is there a small <colour> <shape>?" row (left-padded to `length`), the
    position of the question's colour word, the one text token the answer position has to compare
    the found colour with; nothing in other rows."""
    out = torch.zeros(len(samples), length, dtype=torch.bool)
    for i, (s, seq) in enumerate(zip(samples, pre.token_ids, strict=True)):
        if not asks_presence(s):
            continue
        (word,) = tokenizer.encode(asked_object(s.question)[0])
        at = [j for j, t in enumerate(seq) if t == word]
        if len(at) != 1:
            raise ValueError(f"row {i}: the colour word should occur once in the prompt, found {len(at)}")
        out[i, length - len(seq) + at[0]] = True
    return out


def match_positions(samples: list, pre: Preprocessed, tokenizer, length: int, rows: np.ndarray) -> torch.Tensor:
    """Bool [B, length]: for the `rows` (`presence_rows`), the question's colour word where the answer
    is "yes" and the first token (<bos>) where it is "no"; nothing elsewhere. A head guided here has to
    score the colour word by whether the colour found in the image equals it: a query-key product is
    the bilinear form an equality test needs."""
    out = asked_colour_positions(samples, pre, tokenizer, length)
    for i, s in enumerate(samples):
        if not rows[i]:
            out[i] = False
        elif s.answer == "no":
            out[i] = False
            out[i, length - len(pre.token_ids[i])] = True
    return out


def presence_rows(samples: list, crops: list, tokens_per_side: int) -> np.ndarray:
    """Bool [B]: the "is there a small <colour> <shape>?" rows whose small objects these crops show (at
    the low tier they are too small to check): the rows `AttentionGuide` can ask to answer early."""
    return np.array(
        [
            asks_presence(s)
            and object_token_mask([o for o in s.objects if o.size <= SMALL_SIZE], c, tokens_per_side).any()
            for s, c in zip(samples, crops, strict=True)
        ]
    )


class AttentionGuide:
    """An `on_layer` hook: -log of the attention mass that `head` of the answer position puts on the
    asked objects' vision tokens (or the null token, see `guide_masks`), averaged over the rows with
    a target and over the `layers` run. Rows whose objects are too small for the tier add nothing.

    With `reads` (`colour_reads`), also the cross-entropy of the colour words read off each guided
    layer's output at the answer position through the model's own final norm and LM head (a logit
    lens, no new weights) against the colours of the looked-at objects: the intermediate result of
    a two-step presence check is then in the residual stream by that layer, for the later layers to
    compare with the asked colour. With `early` (`presence_rows`), also the cross-entropy of those
    rows' first answer token read the same way (deep supervision: the comparison by the guided layer).
    `positions` ([B, T] bool) names the positions to look at directly instead of `token_masks`, e.g.
    the question's colour word (`asked_colour_positions`): the other operand of that comparison.
    """

    def __init__(
        self,
        model,
        pre: Preprocessed,
        prepared: Prepared,
        token_masks,
        layers: tuple[int, ...],
        head: int,
        reads: np.ndarray | None = None,
        early: np.ndarray | None = None,
        positions: torch.Tensor | None = None,
    ):
        if not 0 <= head < model.cfg.llm.heads:
            raise ValueError(f"head must lie in 0..{model.cfg.llm.heads - 1}, got {head}")
        self.model, self.layers, self.head, self.valid = model, set(layers), head, prepared.valid
        self.query = answer_positions(prepared.targets)
        if positions is None:
            positions = target_positions(pre, token_masks, prepared.valid.shape[1])
        targets = positions.to(prepared.valid.device)
        self.rows = targets.any(dim=1)
        self.targets = targets[self.rows]
        positions = model._positions(prepared.valid)
        self.position_embeddings = model.llm.rotary_emb(prepared.embeds, positions)
        self.terms, self.row_masses = [], []  # per guided layer run: loss, mass of each row with a target
        self.read_terms, self.read_hits = [], []  # per guided layer run: colour-read loss, argmax in the read set
        self.reads = None
        if reads is not None:
            ids = [model.tokenizer.encode(c) for c in COLOURS]
            if any(len(i) != 1 for i in ids):
                raise ValueError("the colour read needs one token per colour word; this tokenizer splits some")
            ids = [i[0] for i in ids]
            reads = torch.as_tensor(reads, device=prepared.valid.device)
            self.read_rows, self.reads = reads.sum(-1) > 0, reads[reads.sum(-1) > 0]
            self.colour_ids = torch.tensor(ids, device=prepared.valid.device)
        self.early_terms = []  # per guided layer run: early answer loss
        self.early = None if early is None else torch.as_tensor(early, device=prepared.valid.device)
        if self.early is not None:
            rows = torch.arange(len(self.query), device=self.query.device)
            self.early_targets = prepared.targets[rows, self.query + 1][self.early]

    def __call__(self, layer: int, h_in: torch.Tensor, h_out: torch.Tensor) -> None:
        if layer not in self.layers:
            return
        if self.rows.any():
            probs = answer_attention(
                self.model.llm.layers[layer], h_in, self.position_embeddings, self.valid, self.query
            )
            mass = (probs[self.rows, self.head] * self.targets).sum(-1)
            self.terms.append(-torch.log(mass.clamp_min(1e-6)).mean())
            self.row_masses.append(mass.detach())
        if self.reads is not None and self.read_rows.any():
            at = h_out[self.read_rows, self.query[self.read_rows]]
            logits = self.model.logits(at)[:, self.colour_ids].float()
            self.read_terms.append(-(self.reads * torch.log_softmax(logits, -1)).sum(-1).mean())
            picked = logits.argmax(-1, keepdim=True)
            self.read_hits.append((self.reads.gather(1, picked) > 0).float().mean().detach())
        if self.early is not None and self.early.any():
            logits = self.model.logits(h_out[self.early, self.query[self.early]]).float()
            self.early_terms.append(torch.nn.functional.cross_entropy(logits, self.early_targets))

    def early_value(self) -> torch.Tensor:
        """Mean early-answer cross-entropy over the guided layers run (zero if none ran or no row qualifies)."""
        return torch.stack(self.early_terms).mean() if self.early_terms else torch.zeros((), device=self.valid.device)

    def read_value(self) -> torch.Tensor:
        """Mean colour-read cross-entropy over the guided layers run (zero if none ran or no row reads)."""
        return torch.stack(self.read_terms).mean() if self.read_terms else torch.zeros((), device=self.valid.device)

    @property
    def read_accuracy(self) -> float:
        """Share of reading rows whose top colour word is a colour of a looked-at object."""
        return float(torch.stack(self.read_hits).mean()) if self.read_hits else float("nan")

    def value(self) -> torch.Tensor:
        return torch.stack(self.terms).mean() if self.terms else torch.zeros((), device=self.valid.device)

    @property
    def mass(self) -> float:
        """Mean attention mass on the targets at the guided layers (what the loss pushes toward 1)."""
        return float(torch.stack(self.row_masses).mean()) if self.row_masses else float("nan")


def check_guided_head(args, name: str, llm) -> None:
    """The rule every guided head follows: `<name>_weight` >= 0, `<name>_layers` non-empty layers of
    the LLM, `<name>_head` one of its heads."""
    weight, layers, head = (getattr(args, f"{name}_{part}") for part in ("weight", "layers", "head"))
    if weight < 0 or not layers or not 0 <= head < llm.heads:
        raise ValueError(f"{name}_weight must be >= 0, {name}_layers non-empty and {name}_head in 0..{llm.heads - 1}")
    if any(not 0 <= i < llm.layers for i in layers):
        raise ValueError(f"{name}_layers must lie in 0..{llm.layers - 1}, got {layers}")


class GuidedAttention(LossTerm):
    """`--attn-weight`, `--read-weight`, `--early-weight`: the three losses of `AttentionGuide` at
    `--attn-layers` / `--attn-head`, each with its own weight."""

    options = AttentionGuideOptions

    @classmethod
    def active(cls, args) -> bool:
        return args.attn_weight > 0 or args.read_weight > 0 or args.early_weight > 0

    @classmethod
    def check(cls, args, llm) -> None:
        check_guided_head(args, "attn", llm)
        if not args.attn_families or any(f not in FAMILIES for f in args.attn_families):
            raise ValueError(f"attn_families must name some of {FAMILIES}, got {args.attn_families}")
        if args.attn_presence not in PRESENCE_LOOKS or args.read_weight < 0:
            raise ValueError(f"attn_presence must be one of {PRESENCE_LOOKS} and read_weight >= 0")
        if args.early_weight < 0:
            raise ValueError("early_weight must be >= 0")

    @classmethod
    def targets(cls, args, samples: list, pre, tokenizer, tokens_per_side: int):
        """(attention masks, colour reads, early rows); masks all None when only reads or early are asked."""
        masks = reads = early = None
        if args.attn_weight > 0:
            masks = guide_masks(samples, pre.crops, tokens_per_side, args.attn_families, args.attn_presence)
        if args.read_weight > 0:
            reads = colour_reads(samples, pre.crops, tokens_per_side)
        if args.early_weight > 0:
            early = presence_rows(samples, pre.crops, tokens_per_side)
        return masks or [None] * len(samples), reads, early

    def hook(self, model, pre, prepared, targets) -> AttentionGuide:
        masks, reads, early = targets
        return AttentionGuide(model, pre, prepared, masks, self.args.attn_layers, self.args.attn_head, reads, early)

    def parts(self, guide: AttentionGuide) -> list[Part]:
        args, out = self.args, []
        if guide.terms:
            out.append(Part("attn", "attention_guide", guide.value(), args.attn_weight, {"attention_mass": guide.mass}))
        if guide.read_terms:
            more = {"colour_read_accuracy": guide.read_accuracy}
            out.append(Part("read", "colour_read", guide.read_value(), args.read_weight, more))
        if guide.early_terms:
            out.append(Part("early", "early_answer", guide.early_value(), args.early_weight))
        return out
