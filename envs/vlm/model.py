"""The knob-controllable MolmoE-style VLM, composed from `transformers` modules.

`CLIPVisionModel` (features of two layers concatenated) -> Molmo connector -> image features added
to the image-patch token embeddings -> `OlmoeModel` decoder layers -> LM head.

A request runs in stages so the two-stage controller can act between them:
  preprocess + encode_vision + connect  (= prepare): tier -> crops -> vision tokens -> embeddings
  prefix: LLM layers 0-2 once, KV cache kept
  finish: layers 3.. chosen by `blocks` with router `top_k`, then greedy decoding with the same knobs
Every stage takes a batch of requests that share a config.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from transformers import CLIPVisionConfig, CLIPVisionModel, OlmoeConfig, OlmoeModel

from envs.vlm.connector import MolmoConnector
from envs.vlm.crops import Crops, image_size, make_crops, tiling_for
from envs.vlm.decode import Generation, greedy_step
from envs.vlm.errors import InputError, KnobError
from envs.vlm.fast import FastPath
from envs.vlm.layout import image_token_count, image_tokens
from envs.vlm.presets import FIRST_KNOBBED_LAYER, TIERS, VLMConfig
from envs.vlm.ranking import BlockRanking
from envs.vlm.staged import KVCache, attention_mask, run_layer
from envs.vlm.tokenizer import TextTokenizer


@dataclass
class Preprocessed:
    """Host-side part of a batch: crops and token ids (left-padded later)."""

    tier: str
    crops: list[Crops]
    token_ids: list[list[int]]
    patch_positions: list[list[int]]  # index in token_ids of each image-patch token, crop by crop
    answer_lengths: list[int]  # teacher-forced answer tokens (+ <eos>) at the end of token_ids; 0 at serving
    text_lengths: list[int]  # prompt-text tokens ("User: ... Assistant:") before any answer tokens
    # per request, the pooled token (view * tokens per view + index) each image-patch token carries;
    # None: every pooled token in view order (the per-tile layout)
    token_sources: list[list[int]] | None = None

    def pixels(self) -> torch.Tensor:
        """All crops of the batch, request by request: [total crops, 3, S, S]."""
        return torch.from_numpy(np.concatenate([c.pixels for c in self.crops]))

    @classmethod
    def merge(cls, parts: list[Preprocessed]) -> Preprocessed:
        """One batch from requests preprocessed one by one (all at the same tier)."""
        if len({p.tier for p in parts}) != 1:
            raise ValueError("requests of one batch must share a tier")
        return cls(
            parts[0].tier,
            [c for p in parts for c in p.crops],
            [t for p in parts for t in p.token_ids],
            [q for p in parts for q in p.patch_positions],
            [n for p in parts for n in p.answer_lengths],
            [n for p in parts for n in p.text_lengths],
            None if all(p.token_sources is None for p in parts) else [s for p in parts for s in p.sources()],
        )

    def sources(self) -> list[list[int]]:
        """`token_sources`, filled in for the per-tile layout."""
        if self.token_sources is not None:
            return self.token_sources
        return [list(range(len(p))) for p in self.patch_positions]


@dataclass
class Prepared:
    tier: str
    embeds: torch.Tensor  # [B, T, d] input embeddings, image features added, left-padded
    valid: torch.Tensor  # [B, T] bool, False on left padding
    n_crops: list[int]
    vision_tokens: list[int]
    prompt_tokens: list[int]
    targets: torch.Tensor | None = None  # [B, T] token ids to predict at each position, -100 elsewhere
    image_tokens: torch.Tensor | None = None  # [total crops, tokens per crop, d] connector output


@dataclass
class PrefixState:
    """Everything `finish` needs after layers 0-2 ran once."""

    prepared: Prepared
    hidden: torch.Tensor  # [B, T, d] hidden states after layer 2
    cache: KVCache
    positions: torch.Tensor  # [B, T]
    expert_calls: list[int]  # (token, expert) evaluations so far, per request
    expert_calls_by_layer: list[int]  # so far, summed over the batch
    side_state: torch.Tensor | None = None  # [B, d] a side token's state after layer 2 (see `prefix`)


def preprocess_requests(
    cfg: VLMConfig,
    tokenizer: TextTokenizer,
    images: list,
    questions: list[str],
    tier: str,
    answers: list[str] | None = None,
) -> Preprocessed:
    """Crops and token ids of a batch: host work that needs no weights, so a training data worker
    can run it ahead of the accelerator (`training/batches.py`). `KnobVLM.preprocess` is this call."""
    if tier not in TIERS:
        raise KnobError(f"unknown tier {tier!r}; choose one of {list(TIERS)}")
    if len(images) != len(questions) or not images:
        raise InputError(f"need as many images as questions (>0), got {len(images)} and {len(questions)}")
    ids = tokenizer.ids
    if answers is not None and len(answers) != len(questions):
        raise InputError(f"need one answer per question, got {len(answers)} for {len(questions)}")
    crops, token_ids, patch_positions, answer_lengths, text_lengths, sources = [], [], [], [], [], []
    for n, (image, question) in enumerate(zip(images, questions, strict=True)):
        if not isinstance(question, str) or not question.strip():
            raise InputError("the question is empty")
        c = make_crops(image, cfg.knobs.max_crops[tier], cfg.vision)
        image_ids, offsets, src = image_tokens(c.tiling, c.n_crops, cfg.vision, ids)
        seq, pos = [ids["bos"], *image_ids], [1 + o for o in offsets]
        text = tokenizer.prompt_ids(question, cfg.always_start_with_space)
        seq.extend(text)
        text_lengths.append(len(text))
        if answers is not None:
            answer_ids = tokenizer.encode(answers[n]) + [ids["eos"]]
            seq.extend(answer_ids)
            answer_lengths.append(len(answer_ids))
        else:
            answer_lengths.append(0)
        if len(seq) + cfg.max_new_tokens > cfg.llm.max_positions:
            raise InputError(f"the request needs {len(seq)} tokens; the model handles {cfg.llm.max_positions}")
        crops.append(c)
        token_ids.append(seq)
        patch_positions.append(pos)
        sources.append(src)
    per_tile = cfg.vision.layout == "per_tile"
    return Preprocessed(
        tier, crops, token_ids, patch_positions, answer_lengths, text_lengths, None if per_tile else sources
    )


class KnobVLM(nn.Module):
    def __init__(self, cfg: VLMConfig, tokenizer: TextTokenizer, ranking: BlockRanking | None = None):
        super().__init__()
        cfg.validate()
        self.cfg, self.tokenizer = cfg, tokenizer
        if tokenizer.vocab_size > cfg.llm.vocab_size:
            raise ValueError(f"tokenizer has {tokenizer.vocab_size} tokens, the model {cfg.llm.vocab_size}")
        v, lm = cfg.vision, cfg.llm
        self.vit = CLIPVisionModel(
            CLIPVisionConfig(
                hidden_size=v.width,
                intermediate_size=v.mlp,
                num_hidden_layers=v.layers,
                num_attention_heads=v.heads,
                image_size=v.crop_size,
                patch_size=v.patch_size,
                hidden_act="quick_gelu",
                layer_norm_eps=1e-5,
                attn_implementation="sdpa",
            )
        )
        self.vit.post_layernorm = nn.Identity()  # Molmo reads hidden states, never the pooled output
        self.connector = MolmoConnector(cfg)
        self.llm = OlmoeModel(
            OlmoeConfig(
                vocab_size=lm.vocab_size,
                hidden_size=lm.d_model,
                intermediate_size=lm.expert_hidden,
                num_hidden_layers=lm.layers,
                num_attention_heads=lm.heads,
                num_key_value_heads=lm.heads,
                num_experts=lm.experts,
                num_experts_per_tok=lm.top_k,
                norm_topk_prob=lm.norm_topk_prob,
                rms_norm_eps=lm.rms_norm_eps,
                rope_parameters={"rope_type": "default", "rope_theta": lm.rope_theta},
                max_position_embeddings=lm.max_positions,
                pad_token_id=None,
                bos_token_id=None,
                eos_token_id=None,
                attn_implementation="sdpa",
                experts_implementation="grouped_mm",
            )
        )
        self.lm_head = nn.Linear(lm.d_model, lm.output_vocab_size, bias=False)
        self.ranking = ranking or BlockRanking.index_order(lm.layers)
        n_vit_states = v.layers + 1
        self._feature_states = [i % n_vit_states for i in v.feature_layers]
        self.fast = None  # a FastPath once use_fast_path() is called; inference then runs over static shapes

    def use_fast_path(self, bucket: int = 64, graphs: bool = False, compile_layers: bool = False):
        """Serve `encode_vision`, `prefix` and `finish` from a static-shape path (envs/vlm/fast.py).

        Training (grad enabled) always takes the plain path. `use_fast_path(None)` switches back.
        """
        self.fast = None if bucket is None else FastPath(self, bucket, graphs, compile_layers)
        return self.fast

    # ---------------------------------------------------------------- knobs
    def check_knobs(self, tier: str | None = None, top_k: int | None = None, blocks: int | None = None):
        k = self.cfg.knobs
        if tier is not None and tier not in TIERS:
            raise KnobError(f"unknown tier {tier!r}; choose one of {list(TIERS)}")
        if top_k is not None and top_k not in k.top_k:
            raise KnobError(f"top_k={top_k} is not offered by preset {self.cfg.name}; choose one of {list(k.top_k)}")
        if blocks is not None and blocks not in k.blocks:
            raise KnobError(f"blocks={blocks} is not offered by preset {self.cfg.name}; choose one of {list(k.blocks)}")

    def layer_top_k(self, layer: int, top_k: int) -> int:
        """The router top-k layer `layer` runs with: the trained k for layers 0-2, the knob after."""
        return self.cfg.llm.top_k if layer < FIRST_KNOBBED_LAYER else top_k

    def layers_for(self, blocks: int) -> list[int]:
        """Layers 0-2, then the `blocks` most important of 3..L-1 in their original order."""
        return list(range(FIRST_KNOBBED_LAYER)) + sorted(self.ranking.order[:blocks])

    @property
    def device(self) -> torch.device:
        return self.lm_head.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.lm_head.weight.dtype

    # ---------------------------------------------------------------- stage 1: vision
    def preprocess(
        self, images: list, questions: list[str], tier: str, answers: list[str] | None = None
    ) -> Preprocessed:
        return preprocess_requests(self.cfg, self.tokenizer, images, questions, tier, answers)

    def request_shapes(self, image, question: str) -> tuple[list[int], list[int]]:
        """Crops and prompt tokens (vision + text) of a request at every tier, from the image's size
        and the question's length alone: what `preprocess` would make, known before any pixel work."""
        size, v = image_size(image), self.cfg.vision
        n_text = len(self.tokenizer.prompt_ids(question, self.cfg.always_start_with_space))
        tilings = [tiling_for(size[0], size[1], self.cfg.knobs.max_crops[t], v) for t in TIERS]
        # bos, the image-marker tokens of the layout, then the text
        return [1 + r * c for r, c in tilings], [1 + image_token_count(t, v) + n_text for t in tilings]

    def encode_vision(self, pixels: torch.Tensor) -> torch.Tensor:
        """[n, 3, S, S] -> [n, P*P, feature_width]: two ViT layers' patch features, concatenated.

        Only the layers up to the deepest one read are run.
        """
        if self.fast is not None and not torch.is_grad_enabled():
            return self.fast.encode_vision(pixels)
        return self._encode_vision_plain(pixels)

    def _encode_vision_plain(self, pixels: torch.Tensor) -> torch.Tensor:
        h = self.vit.pre_layrnorm(self.vit.embeddings(pixels.to(self.device, self.dtype)))
        states = [h]
        for layer in self.vit.encoder.layers[: max(self._feature_states)]:
            h = layer(h, attention_mask=None)
            states.append(h)
        return torch.cat([states[i][:, 1:] for i in self._feature_states], dim=-1)

    def image_tokens(self, pre: Preprocessed, features: torch.Tensor) -> torch.Tensor:
        """Pool and project vision features: [n_total_crops, tokens_per_crop, d], crop by crop."""
        masks = torch.from_numpy(np.concatenate([c.patch_mask for c in pre.crops])).to(self.device)
        return self.connector(features, masks)

    def connect(self, pre: Preprocessed, features: torch.Tensor) -> Prepared:
        """Image tokens added to the patch-token embeddings, left-padded."""
        tokens = self.image_tokens(pre, features)
        b, t = len(pre.token_ids), max(len(s) for s in pre.token_ids)
        ids = torch.full((b, t), self.tokenizer.ids["pad"], dtype=torch.long, device=self.device)
        valid = torch.zeros(b, t, dtype=torch.bool, device=self.device)
        rows, cols, picked = [], [], []
        first_view, per_view = 0, tokens.shape[1]
        for i, seq in enumerate(pre.token_ids):
            offset = t - len(seq)
            ids[i, offset:] = torch.tensor(seq, device=self.device)
            valid[i, offset:] = True
            rows += [i] * len(pre.patch_positions[i])
            cols += [offset + p for p in pre.patch_positions[i]]
            if pre.token_sources is not None:  # the per-tile layout takes every pooled token in order
                picked += [first_view * per_view + s for s in pre.token_sources[i]]
            first_view += pre.crops[i].n_crops
        targets = None
        if any(pre.answer_lengths):
            targets = torch.full_like(ids, -100)
            for i, n in enumerate(pre.answer_lengths):
                targets[i, t - n :] = ids[i, t - n :]
        embeds = self.llm.embed_tokens(ids)
        flat = tokens.reshape(-1, tokens.shape[-1])
        embeds = embeds.index_put(
            (torch.tensor(rows, device=self.device), torch.tensor(cols, device=self.device)),
            flat if pre.token_sources is None else flat[torch.tensor(picked, device=self.device)],
            accumulate=True,
        )
        return Prepared(
            tier=pre.tier,
            embeds=embeds,
            valid=valid,
            n_crops=[c.n_crops for c in pre.crops],
            vision_tokens=[len(p) for p in pre.patch_positions],
            prompt_tokens=[len(s) for s in pre.token_ids],
            targets=targets,
            image_tokens=tokens,
        )

    def prepare(
        self,
        images: list,
        questions: list[str],
        tier: str,
        answers: list[str] | None = None,
        grad: bool = False,
    ) -> Prepared:
        pre = self.preprocess(images, questions, tier, answers)
        with torch.set_grad_enabled(grad):
            return self.connect(pre, self.encode_vision(pre.pixels()))

    # ---------------------------------------------------------------- stage 2: LLM
    def _run(self, layers, h, positions, valid, cache, top_k, counts, on_layer=None, mask=None):
        """Run `layers` over the last h.shape[1] positions; layers 0-2 always at the trained k.

        `on_layer(i, h_in, h_out)` sees every layer's input and output (block influence).
        """
        mask = attention_mask(valid, h.shape[1], h.dtype) if mask is None else mask
        pos_emb = self.llm.rotary_emb(h, positions)
        n_tokens = valid[:, -h.shape[1] :].sum().item()
        for i in layers:
            k = self.layer_top_k(i, top_k)
            h_in, h = h, run_layer(self.llm.layers[i], h, pos_emb, mask, cache, k)
            counts[i] += n_tokens * k
            if on_layer is not None:
                on_layer(i, h_in, h)
        return h

    @staticmethod
    def _positions(valid: torch.Tensor) -> torch.Tensor:
        """Rotary positions that start at 0 on each request's first real (not padding) token."""
        return (valid.long().cumsum(-1) - 1).clamp(min=0)

    def prefix(self, prepared: Prepared, side_token: torch.Tensor | None = None, side_sees=None) -> PrefixState:
        """Layers 0-2 over the prompt, once; the KV cache is kept for `finish`.

        `side_token` [B, d] rides along as one extra last position that attends only to the prompt
        positions `side_sees` [B, T] (bool) and itself; no prompt position sees it, and it leaves no
        trace in the state but `side_state`, its hidden state after layer 2. That is how a two-stage
        controller's budget token is served: inside the pass that runs anyway, for one token's share.
        """
        if side_token is not None:
            return self._prefix_with_side_token(prepared, side_token, side_sees)
        if self.fast is not None:
            return self.fast.prefix(prepared)
        valid = prepared.valid
        positions = self._positions(valid)
        counts = [0] * self.cfg.llm.layers
        cache = KVCache()
        with torch.no_grad():
            h = self._run(
                range(FIRST_KNOBBED_LAYER),
                prepared.embeds,
                positions,
                valid,
                cache,
                self.cfg.llm.top_k,
                counts,
            )
        per_request = [n * FIRST_KNOBBED_LAYER * self.cfg.llm.top_k for n in prepared.prompt_tokens]
        return PrefixState(prepared, h, cache, positions, per_request, counts)

    def _prefix_with_side_token(self, prepared: Prepared, side_token: torch.Tensor, side_sees) -> PrefixState:
        if self.fast is not None:
            raise NotImplementedError("a side token through the fast path's static buckets is not built yet")
        b, t = prepared.valid.shape
        if side_token.shape != (b, self.cfg.llm.d_model):
            raise InputError(f"side_token must be [{b}, {self.cfg.llm.d_model}], got {list(side_token.shape)}")
        sees = prepared.valid if side_sees is None else side_sees.to(torch.bool) & prepared.valid
        ones = torch.ones(b, 1, dtype=torch.bool, device=prepared.valid.device)
        valid = torch.cat([prepared.valid, ones], dim=1)
        h = torch.cat([prepared.embeds, side_token.to(prepared.embeds.dtype)[:, None]], dim=1)
        mask = attention_mask(valid, t + 1, h.dtype)
        mask[:, 0, t, :t] = mask[:, 0, t, :t].masked_fill(~sees, torch.finfo(h.dtype).min).masked_fill(sees, 0.0)
        positions = self._positions(valid)
        counts = [0] * self.cfg.llm.layers
        cache = KVCache()
        with torch.no_grad():
            h = self._run(
                range(FIRST_KNOBBED_LAYER), h, positions, valid, cache, self.cfg.llm.top_k, counts, None, mask
            )
        cache.layers = {i: (k[:, :, :t], v[:, :, :t]) for i, (k, v) in cache.layers.items()}
        per_request = [(n + 1) * FIRST_KNOBBED_LAYER * self.cfg.llm.top_k for n in prepared.prompt_tokens]
        return PrefixState(prepared, h[:, :t], cache, positions[:, :t], per_request, counts, side_state=h[:, t])

    def logits(self, h_last: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.llm.norm(h_last))

    def finish(
        self, state: PrefixState, top_k: int, blocks: int, max_new_tokens: int | None = None, ignore_eos: bool = False
    ) -> Generation:
        """Layers 3.. with the knobs, then greedy decoding with the same knobs.

        Never recomputes layers 0-2 of the prompt and never changes `state`, so one prefix can be
        finished with many configs.
        """
        self.check_knobs(top_k=top_k, blocks=blocks)
        gen = self.generate(state, self.layers_for(blocks), top_k, max_new_tokens, ignore_eos=ignore_eos)
        gen.blocks = blocks
        return gen

    def generate(
        self,
        state: PrefixState,
        layers: list[int],
        top_k: int,
        max_new_tokens: int | None = None,
        timer=None,
        ignore_eos: bool = False,
    ) -> Generation:
        """`finish` with an explicit layer list (layers 0-2 first); used by rankings and ablations.

        `ignore_eos` decodes exactly `max_new_tokens` tokens, so profiles compare configs at equal length.
        """
        if list(layers[:FIRST_KNOBBED_LAYER]) != list(range(FIRST_KNOBBED_LAYER)):
            raise KnobError(f"layers 0-{FIRST_KNOBBED_LAYER - 1} always run; got {layers}")
        max_new = max_new_tokens or self.cfg.max_new_tokens
        if self.fast is not None and not isinstance(state, PrefixState):
            return self.fast.generate(state, list(layers), top_k, max_new, timer, ignore_eos)
        knobbed = layers[FIRST_KNOBBED_LAYER:]
        eos = self.tokenizer.ids["eos"]
        b = state.hidden.shape[0]
        counts = list(state.expert_calls_by_layer)
        per_request = list(state.expert_calls)
        per_token_calls = FIRST_KNOBBED_LAYER * self.cfg.llm.top_k + len(knobbed) * top_k
        cache, valid, positions = state.cache.fork(), state.prepared.valid, state.positions
        stage = timer.stage if timer is not None else (lambda name: contextlib.nullcontext())
        with torch.no_grad(), stage("prefill"):
            h = self._run(knobbed, state.hidden, positions, valid, cache, top_k, counts)
            step_logits = [self.logits(h[:, -1])]
            nxt = step_logits[-1].argmax(-1)
        for i, n in enumerate(state.prepared.prompt_tokens):
            per_request[i] += n * len(knobbed) * top_k
        with torch.no_grad(), stage("decode"):
            generated = [[] for _ in range(b)]
            done = [False] * b
            decode_steps = [0] * b
            pos = positions[:, -1]
            while True:
                if greedy_step(nxt.tolist(), generated, done, eos, ignore_eos, max_new, decode_steps, per_request,
                               per_token_calls):  # fmt: skip
                    break
                pos = pos + 1
                valid = torch.cat([valid, torch.ones(b, 1, dtype=torch.bool, device=valid.device)], dim=1)
                h = self.llm.embed_tokens(nxt[:, None])
                h = self._run(layers, h, pos[:, None], valid, cache, top_k, counts)
                step_logits.append(self.logits(h[:, -1]))
                nxt = step_logits[-1].argmax(-1)
        return Generation(
            answers=[self.tokenizer.decode(g) for g in generated],
            token_ids=generated,
            layers_run=layers,
            top_k=top_k,
            blocks=len(knobbed),
            expert_calls=per_request,
            expert_calls_by_layer=counts,
            step_logits=step_logits,
            decode_steps=decode_steps,
        )

    def answer(
        self,
        images: list,
        questions: list[str],
        tier: str,
        top_k: int,
        blocks: int,
        max_new_tokens: int | None = None,
    ) -> Generation:
        """The one-call path: all stages for a batch sharing one config."""
        self.check_knobs(tier, top_k, blocks)
        return self.finish(self.prefix(self.prepare(images, questions, tier)), top_k, blocks, max_new_tokens)

    # ---------------------------------------------------------------- training-time forward
    def forward_logits(self, prepared: Prepared, layers: list[int], top_k: int, on_layer=None) -> torch.Tensor:
        """Teacher-forced logits [B, T, V] over all positions, with gradients (training, ranking)."""
        valid = prepared.valid
        counts = [0] * self.cfg.llm.layers
        h = self._run(layers, prepared.embeds, self._positions(valid), valid, None, top_k, counts, on_layer)
        return self.logits(h)

    def answer_loss(self, prepared: Prepared, layers: list[int], top_k: int, on_layer=None) -> torch.Tensor:
        """Mean cross-entropy of the answer tokens (and <eos>) given image and question."""
        if prepared.targets is None:
            raise ValueError("prepare(..., answers=...) is needed for a teacher-forced loss")
        logits = self.forward_logits(prepared, layers, top_k, on_layer)
        return torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
            prepared.targets[:, 1:].reshape(-1),
            ignore_index=-100,
        )
