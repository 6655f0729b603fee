"""A static-shape execution path behind the same staged API: static KV cache, prompt buckets, graphs.

On a GPU the plain path is bound by kernel launches: a layer costs about the same whatever the
token count or top-k, so the knobs barely change latency (docs/model.md). Here every phase of a
request runs over fixed shapes, so it can be captured once and replayed:

  vision  (crops)                   ViT up to the deepest layer read
  prefix  (batch, bucket)           layers 0-2 over the left-padded prompt, keys/values into the cache
  rest    (batch, bucket, k, layers) the knobbed layers over the prompt, logits of the last position
  decode  (batch, bucket, k, layers) one token through every layer, written at a cache slot

Prompts are left-padded to a multiple of `bucket` tokens; padding is masked exactly as in the plain
path, so answers and logits match it. The cache has `bucket + max_new_tokens` slots per bucket;
decode step n writes slot bucket + n, and masks are computed inside the phase from a slot index,
so nothing on the host changes between replays.

`graphs=True` captures each phase in a CUDA graph on first use (CUDA only). `compile_layers=True`
runs each decoder layer through `torch.compile` (inductor fuses norms, rotary, routing; works on CPU
too), which composes with graphs. With neither it runs eagerly: the CPU tests check that path, and
the compiled one, against the plain path.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from envs.vlm.decode import Generation, greedy_step
from envs.vlm.presets import FIRST_KNOBBED_LAYER
from envs.vlm.staged import run_layer


class StaticKVCache:
    """Preallocated keys/values [B, H, slots, head_dim] per layer, written in place at `write_slots`.

    `write_slots` is a tensor attribute swapped per phase; a captured graph reads its contents.
    """

    def __init__(self, n_layers: int, batch: int, heads: int, head_dim: int, slots: int, dtype, device):
        shape = (batch, heads, slots, head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.write_slots = torch.zeros(1, dtype=torch.long, device=device)

    def update(self, key, value, layer_idx, *args, **kwargs):
        self.keys[layer_idx].index_copy_(2, self.write_slots, key.to(self.keys[layer_idx].dtype))
        self.values[layer_idx].index_copy_(2, self.write_slots, value.to(self.values[layer_idx].dtype))
        return self.keys[layer_idx], self.values[layer_idx]


def slot_mask(query_slots: torch.Tensor, valid_slots: torch.Tensor, dtype) -> torch.Tensor:
    """Additive mask [B, 1, Q, S]: a query sees valid slots up to its own (and always itself)."""
    k = torch.arange(valid_slots.shape[1], device=valid_slots.device)
    allowed = (k[None, :] <= query_slots[:, None])[None] & valid_slots[:, None, :]
    allowed = allowed | (k[None, :] == query_slots[:, None])[None]
    return torch.zeros(allowed.shape, dtype=dtype, device=valid_slots.device).masked_fill(
        ~allowed, torch.finfo(dtype).min
    )[:, None]


class Phase:
    """A function over static buffers: run eagerly, or captured in a CUDA graph on first call."""

    def __init__(self, fn, graphs: bool, pool=None):
        self.fn, self.graphs, self.pool = fn, graphs, pool
        self.graph, self.out = None, None

    def __call__(self):
        if not self.graphs:
            return self.fn()
        if self.graph is None:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(2):  # warm-up: allocator, cuBLAS workspaces, compiled kernels
                    self.fn()
            torch.cuda.current_stream().wait_stream(side)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph, pool=self.pool):
                self.out = self.fn()
        self.graph.replay()
        return self.out


@dataclass
class _Bucket:
    """Static buffers shared by every phase of one (batch, prompt bucket)."""

    cache: StaticKVCache
    embeds: torch.Tensor  # [B, T, d] prefix input
    hidden: torch.Tensor  # [B, T, d] rest input (hidden states after layer 2)
    valid_slots: torch.Tensor  # [B, S] bool: prompt validity, then True for every decode slot
    prompt_positions: torch.Tensor  # [B, T] rotary positions of the prompt
    prompt_slots: torch.Tensor  # [T] = arange(T)
    token: torch.Tensor  # [B, 1] decode input id
    slot: torch.Tensor  # [1] decode write slot
    position: torch.Tensor  # [B, 1] decode rotary position
    epoch: int = 0  # bumped by every prefix; a state is valid while its epoch matches


@dataclass
class FastPrefixState:
    """What `FastPath.prefix` hands to `finish`; mirrors `PrefixState` (hidden unpadded)."""

    prepared: object
    hidden: torch.Tensor
    cache: StaticKVCache
    positions: torch.Tensor
    expert_calls: list[int]
    expert_calls_by_layer: list[int]
    bucket_key: tuple[int, int] = (0, 0)
    epoch: int = 0


class FastPath:
    def __init__(self, model, bucket: int = 64, graphs: bool = False, compile_layers: bool = False):
        if graphs and model.device.type != "cuda":
            raise ValueError("graphs=True needs the model on a CUDA device")
        if bucket < 1:
            raise ValueError("bucket must be >= 1 token")
        self.model, self.bucket, self.graphs = model, bucket, graphs
        self.layer_fn = run_layer
        if compile_layers:  # one compiled graph per (phase shape, top-k, cache buffers): allow them all
            torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 1024)
            torch._dynamo.config.accumulated_recompile_limit = max(
                torch._dynamo.config.accumulated_recompile_limit, 4096
            )
            self.layer_fn = torch.compile(run_layer, dynamic=False)
        self.pool = torch.cuda.graph_pool_handle() if graphs else None
        self.buckets: dict[tuple[int, int], _Bucket] = {}
        self.phases: dict[tuple, Phase] = {}

    # ------------------------------------------------------------------ buffers
    def bucket_len(self, tokens: int) -> int:
        length = -(-tokens // self.bucket) * self.bucket
        limit = self.model.cfg.llm.max_positions - self.model.cfg.max_new_tokens
        return min(length, max(tokens, limit))

    def _bucket(self, batch: int, length: int) -> _Bucket:
        key = (batch, length)
        if key not in self.buckets:
            m, lm = self.model, self.model.cfg.llm
            slots = length + m.cfg.max_new_tokens
            dev, dt = m.device, m.dtype
            cache = StaticKVCache(lm.layers, batch, lm.heads, lm.d_model // lm.heads, slots, dt, dev)
            self.buckets[key] = _Bucket(
                cache=cache,
                embeds=torch.zeros(batch, length, lm.d_model, dtype=dt, device=dev),
                hidden=torch.zeros(batch, length, lm.d_model, dtype=dt, device=dev),
                valid_slots=torch.ones(batch, slots, dtype=torch.bool, device=dev),
                prompt_positions=torch.zeros(batch, length, dtype=torch.long, device=dev),
                prompt_slots=torch.arange(length, device=dev),
                token=torch.zeros(batch, 1, dtype=torch.long, device=dev),
                slot=torch.full((1,), length, dtype=torch.long, device=dev),
                position=torch.zeros(batch, 1, dtype=torch.long, device=dev),
            )
        return self.buckets[key]

    # ------------------------------------------------------------------ phase bodies
    def _layers(self, bk: _Bucket, h, positions, query_slots, layers, top_k):
        m = self.model
        mask = slot_mask(query_slots, bk.valid_slots, h.dtype)
        pos_emb = m.llm.rotary_emb(h, positions)
        for i in layers:
            h = self.layer_fn(m.llm.layers[i], h, pos_emb, mask, bk.cache, m.layer_top_k(i, top_k))
        return h

    def _phase(self, key: tuple, fn) -> Phase:
        if key not in self.phases:
            self.phases[key] = Phase(fn, self.graphs, self.pool)
        return self.phases[key]

    def _prefix_fn(self, bk: _Bucket):
        def fn():
            bk.cache.write_slots = bk.prompt_slots
            return self._layers(bk, bk.embeds, bk.prompt_positions, bk.prompt_slots, range(FIRST_KNOBBED_LAYER), 0)

        return fn

    def _rest_fn(self, bk: _Bucket, knobbed: tuple[int, ...], top_k: int):
        def fn():
            bk.cache.write_slots = bk.prompt_slots
            h = self._layers(bk, bk.hidden, bk.prompt_positions, bk.prompt_slots, knobbed, top_k)
            return self.model.logits(h[:, -1])

        return fn

    def _decode_fn(self, bk: _Bucket, layers: tuple[int, ...], top_k: int):
        def fn():
            bk.cache.write_slots = bk.slot
            h = self.model.llm.embed_tokens(bk.token)
            h = self._layers(bk, h, bk.position, bk.slot, layers, top_k)
            return self.model.logits(h[:, -1])

        return fn

    # ------------------------------------------------------------------ staged API
    def encode_vision(self, pixels: torch.Tensor) -> torch.Tensor:
        """The ViT over [n, 3, S, S]; captured per crop count when graphs are on."""
        if not self.graphs:
            return self.model._encode_vision_plain(pixels)
        key = ("vision", pixels.shape[0])
        if key not in self.phases:
            buf = torch.zeros(pixels.shape, dtype=self.model.dtype, device=self.model.device)
            phase = self._phase(key, lambda: self.model._encode_vision_plain(buf))
            phase.buffer = buf
        phase = self.phases[key]
        phase.buffer.copy_(pixels)
        return phase().clone()

    def prefix(self, prepared) -> FastPrefixState:
        m = self.model
        b, t = prepared.valid.shape
        length = self.bucket_len(t)
        bk = self._bucket(b, length)
        pad = length - t
        bk.embeds[:, :pad].zero_()
        bk.embeds[:, pad:].copy_(prepared.embeds)
        bk.valid_slots[:, :pad] = False
        bk.valid_slots[:, pad:length].copy_(prepared.valid)
        bk.valid_slots[:, length:] = True
        bk.prompt_positions.copy_((bk.valid_slots[:, :length].long().cumsum(-1) - 1).clamp(min=0))
        with torch.no_grad():
            h = self._phase(("prefix", b, length), self._prefix_fn(bk))()
        bk.epoch += 1
        n_tokens = sum(prepared.prompt_tokens)
        counts = [n_tokens * m.layer_top_k(i, 0) for i in range(m.cfg.llm.layers)]
        per_request = [n * FIRST_KNOBBED_LAYER * m.cfg.llm.top_k for n in prepared.prompt_tokens]
        return FastPrefixState(
            prepared, h[:, pad:].clone(), bk.cache, bk.prompt_positions[:, pad:].clone(), per_request, counts,
            (b, length), bk.epoch,
        )  # fmt: skip

    def generate(self, state: FastPrefixState, layers, top_k: int, max_new: int, timer, ignore_eos: bool):
        """The fast twin of `KnobVLM.generate` (same bookkeeping, same greedy loop)."""
        m = self.model
        bk = self.buckets[state.bucket_key]
        if state.epoch != bk.epoch:
            raise RuntimeError(
                "this prefix state's cache was overwritten by a later prefix of the same shape on the fast "
                "path; finish a state before starting the next one"
            )
        if max_new > m.cfg.max_new_tokens:
            raise ValueError(f"the fast path has cache slots for {m.cfg.max_new_tokens} new tokens, not {max_new}")
        b, length = state.bucket_key
        t = state.hidden.shape[1]
        knobbed = tuple(layers[FIRST_KNOBBED_LAYER:])
        eos = m.tokenizer.ids["eos"]
        counts = list(state.expert_calls_by_layer)
        per_request = list(state.expert_calls)
        per_token_calls = FIRST_KNOBBED_LAYER * m.cfg.llm.top_k + len(knobbed) * top_k
        stage = timer.stage if timer is not None else (lambda name: contextlib.nullcontext())
        with torch.no_grad(), stage("prefill"):
            bk.hidden[:, : length - t].zero_()
            bk.hidden[:, length - t :].copy_(state.hidden)
            logits = self._phase(("rest", b, length, top_k, knobbed), self._rest_fn(bk, knobbed, top_k))()
            step_logits = [logits.clone()]
            nxt = logits.argmax(-1)
        n_tokens = sum(state.prepared.prompt_tokens)
        for i in knobbed:
            counts[i] += n_tokens * top_k
        for i, n in enumerate(state.prepared.prompt_tokens):
            per_request[i] += n * len(knobbed) * top_k
        decode = self._phase(("decode", b, length, top_k, tuple(layers)), self._decode_fn(bk, tuple(layers), top_k))
        with torch.no_grad(), stage("decode"):
            generated = [[] for _ in range(b)]
            done = [False] * b
            decode_steps = [0] * b
            bk.position.copy_(state.positions[:, -1:])
            step = 0
            while True:
                if greedy_step(nxt.tolist(), generated, done, eos, ignore_eos, max_new, decode_steps, per_request,
                               per_token_calls):  # fmt: skip
                    break
                for i in layers:
                    counts[i] += b * m.layer_top_k(i, top_k)
                bk.token.copy_(nxt[:, None])
                bk.slot.fill_(length + step)
                bk.position.add_(1)
                step += 1
                logits = decode()
                step_logits.append(logits.clone())
                nxt = logits.argmax(-1)
        return Generation(
            answers=[m.tokenizer.decode(g) for g in generated],
            token_ids=generated,
            layers_run=list(layers),
            top_k=top_k,
            blocks=len(knobbed),
            expert_calls=per_request,
            expert_calls_by_layer=counts,
            step_logits=step_logits,
            decode_steps=decode_steps,
        )
