"""Gymnasium environments: choose (tier, top_k, blocks) for a request under its latency budget.

Two-stage: a 2-step episode. Step 0 sees the budget and the prompt and picks the tier; the env
then runs crops -> ViT -> connector (and, live, layers 0-2 once); step 1 sees a summary of the LLM
input and picks top_k and blocks; the env finishes the request and scores it.
Single-stage: a 1-step episode; the global crop is encoded first (controller overhead, reused when
tier = low) and one action picks all three knobs.

Both observe the budget's `headroom` over each config: log(budget / the config's predicted latency
for this request, controller time included), from the request's shapes and the latency profile, known
before any vision work: the configs that fit are the ones with headroom >= 0.
Both act in the model's knob space (`envs/knobs.py`): `MultiDiscrete(space.nvec)` over (tier, top_k,
blocks) with `action_masks()` for MaskablePPO: only the knobs a step decides are open; the others are
pinned to index 0 (step 0) or to the chosen tier (step 1). Observation widths follow the backend: its
knob space (headroom per config, tier one-hot) and its model (prompt width, stage-2 keys/values).
Backends: `ReplayBackend` reads an outcome table and cached features (fast); `LiveBackend` runs the
VLM, with latency from a profile's latency model or measured end to end (`measure=True`).
reward = score - penalty(latency, budget), latency including controller overhead.
With a `BudgetGuard` (`envs/guard.py`), a request whose headroom is negative for every config is
served by the guard's fallback config, for the guard's time instead of the controller's, and the
episode ends at its first step whatever the action; `skip_guarded` leaves such requests out (for
training: the policy never decides them). The guard also repairs a chosen config that does not fit
where another one the policy could still serve does (two-stage: of the chosen tier), `info["repaired"]`.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import gymnasium as gym
import numpy as np
from gymnasium import spaces

from envs.budgets import N_BUDGET_FEATURES, BudgetDistribution, Penalty, budget_features
from envs.features import CorruptCacheError, FeatureCache, cache_key, kv_shape, prefix_kv, prompt_embedding, summarise
from envs.guard import BudgetGuard
from envs.knobs import KnobSpace
from envs.latency import PARTS, ConfigLatency, LatencyModel, StageTimer, timed_prefix
from envs.outcomes import OutcomeTable, dataset_samples
from envs.vlm.evaluate import all_configs
from envs.vlm.metrics import vqa_soft_accuracy


class ReplayBackend:
    """Outcomes and features recorded beforehand: an episode costs a few array lookups.

    `knobs`: the model's knob space (or its knob lists); the table must hold exactly its configs."""

    def __init__(self, table: OutcomeTable, features: FeatureCache, latency_model: LatencyModel,
                 knobs: KnobSpace | dict):  # fmt: skip
        space = KnobSpace.of(knobs)
        if table.configs != space.configs():
            raise ValueError(
                f"the outcome table's {len(table.configs)} configs are not the knob space's {space.n_configs} "
                f"(tier {list(space.tier)} x top_k {list(space.top_k)} x blocks {list(space.blocks)}, in that "
                "order): build the table for this model's knobs (scripts/build_outcomes.py)"
            )
        if len(features.prompt) != len(table.sample_ids) or features.kv.shape[1] != space.n_tier:
            raise ValueError("the feature cache does not describe the outcome table's samples and tiers")
        self.table, self.features, self.latency_model, self.space = table, features, latency_model, space
        self.valid = np.flatnonzero(table.ok)
        self.predicted = ConfigLatency(latency_model, space)(features.crops, features.position)  # [n, configs]

    @property
    def d_model(self) -> int:
        """Width of the prompt and global-view features."""
        return self.features.prompt.shape[1]

    @property
    def kv_shape(self) -> tuple[int, ...]:
        """Shape of one tier's stage-2 keys/values (`features.kv_shape`)."""
        return tuple(self.features.kv.shape[2:])

    def __len__(self) -> int:
        return len(self.valid)

    def prompt(self, i: int) -> np.ndarray:
        return self.features.prompt[self.valid[i]]

    def global_view(self, i: int) -> np.ndarray:
        return self.features.global_view[self.valid[i]]

    def predicted_latency(self, i: int) -> np.ndarray:
        return self.predicted[self.valid[i]]

    def stage2(self, i: int, tier: int) -> tuple[np.ndarray, np.ndarray, int]:
        j = self.valid[i]
        return self.features.kv[j, tier], self.features.kv_mask[j, tier], int(self.features.position[j, tier])

    def outcome(self, i: int, cfg: int) -> tuple[float, dict[str, float]]:
        j = self.valid[i]
        parts = dict(zip(PARTS, self.table.parts[j, cfg].tolist(), strict=True))
        parts["total"] = float(self.table.latency[j, cfg])
        return float(self.table.score[j, cfg]), parts


class LiveBackend:
    """Runs the VLM per episode. The latency model predicts the headroom, and the latency unless
    `measure` (then measured end to end)."""

    def __init__(self, model, samples: list, latency_model: LatencyModel, measure: bool = False):
        self.model, self.samples, self.latency_model, self.measure = model, samples, latency_model, measure
        self.space = KnobSpace.from_config(model.cfg)
        self.predictor = ConfigLatency(latency_model, self.space)
        self._state = None

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def d_model(self) -> int:
        return self.model.cfg.llm.d_model

    @property
    def kv_shape(self) -> tuple[int, ...]:
        return kv_shape(self.model.cfg)

    def prompt(self, i: int) -> np.ndarray:
        return prompt_embedding(self.model, self.samples[i].question)

    def predicted_latency(self, i: int) -> np.ndarray:
        return self.predictor(*self.model.request_shapes(self.samples[i].image, self.samples[i].question))

    def global_view(self, i: int) -> np.ndarray:
        s = self.samples[i]
        pre, prepared, _ = timed_prefix(self.model, s.image, s.question, self.space.tier[0], StageTimer(),
                                        run_prefix=False)  # fmt: skip
        return summarise(self.model, prepared, pre)[1][0]

    def stage2(self, i: int, tier: int) -> tuple[np.ndarray, np.ndarray, int]:
        s, timer = self.samples[i], StageTimer(self.model.device)
        # layers 0-2 run once, here, before stage 2 decides; stage 2 reads their cached keys/values
        pre, prepared, state = timed_prefix(self.model, s.image, s.question, self.space.tier[tier], timer)
        self._state = (i, tier, state, timer)
        kv, mask, position = prefix_kv(self.model, state, pre)
        return kv[0], mask[0], int(position[0])

    def outcome(self, i: int, cfg: int) -> tuple[float, dict[str, float]]:
        tier, ki, bi = self.space.config_knobs(cfg)
        k, b = self.space.top_k[ki], self.space.blocks[bi]
        if self._state is None or self._state[:2] != (i, tier):
            self.stage2(i, tier)
        _, _, state, timer = self._state
        gen = self.model.generate(state, self.model.layers_for(b), k, timer=timer)
        self._state = None
        s = self.samples[i]
        score = vqa_soft_accuracy(gen.answers[0], s.answers)
        if not self.measure:
            p = state.prepared
            return score, self.latency_model.predict(p.n_crops[0], p.prompt_tokens[0], k, b, gen.decode_steps[0])
        parts = dict(timer.ms)
        parts["total"] = sum(parts[p] for p in PARTS)
        return score, parts


class _KnobEnv(gym.Env):
    metadata = {"render_modes": []}

    def __init__(self, backend, budgets: BudgetDistribution, full_ms: float, penalty: Penalty | None = None,
                 controller_ms: float = 0.0, guard: BudgetGuard | None = None, skip_guarded: bool = False):  # fmt: skip
        super().__init__()
        if len(backend) == 0:
            raise ValueError("the environment has no samples")
        self.backend, self.budgets, self.full_ms = backend, budgets, float(full_ms)
        self.penalty, self.controller_ms = penalty or Penalty(), float(controller_ms)
        self.guard, self.skip_guarded = guard, skip_guarded
        self.space: KnobSpace = backend.space
        self.action_space = spaces.MultiDiscrete(self.space.nvec)
        self._sample, self._budget, self.guarded = 0, 1.0, False

    def _new_request(self, tries: int = 1000):
        """A (sample, budget) pair and its headroom; with `skip_guarded`, one the guard does not serve."""
        for _ in range(tries):
            self._sample = int(self.np_random.integers(len(self.backend)))
            self._budget = float(self.budgets.sample(self.np_random, 1, self.full_ms)[0])
            self._predicted = self.backend.predicted_latency(self._sample)
            self._room = np.log(self._budget / (self._predicted + self.added_latency())).astype(np.float32)
            self.guarded = self.guard is not None and self.guard.fires(self._room)
            if not (self.guarded and self.skip_guarded):
                return
        raise ValueError(f"the guard serves every one of {tries} requests drawn: budgets too tight to train on")

    def added_latency(self) -> np.ndarray:
        """Controller time added to each config's latency (oracle labels use it too)."""
        return np.full(self.space.n_configs, self.controller_ms)

    def _finish(self, cfg: int, allowed: slice | None = None):
        """Score the request served with the controller's config `cfg` (repaired by the guard if it does
        not fit and one of the `allowed` configs, default all, does), or with the guard's fallback if it
        serves the request."""
        allowed = slice(0, self.space.n_configs) if allowed is None else allowed
        chosen = cfg
        if self.guarded:
            cfg, added = self.guard.pick(self._predicted, self._budget), self.guard.ms
        else:
            cfg = cfg if self.guard is None else self.guard.repaired(cfg, self._room[allowed], allowed.start)
            added = float(self.added_latency()[cfg])
        score, parts = self.backend.outcome(self._sample, cfg)
        parts = dict(parts)
        parts["controller"] = parts.get("controller", 0.0) + added
        latency = parts["total"] + added
        parts["total"] = latency
        config = self.space.config(cfg)
        reward = score - self.penalty(latency, self._budget)
        info = {"score": score, "latency_ms": latency, "latency_parts": parts, "budget_ms": self._budget,
                "violation": latency > self._budget, "config": config, "config_index": cfg,
                "controller_ms": parts["controller"], "sample": self._sample, "guarded": self.guarded,
                "repaired": not self.guarded and cfg != chosen}  # fmt: skip
        return reward, info


class TwoStageKnobEnv(_KnobEnv):
    """Two decisions per request: the tier from the budget (and prompt), then top_k and blocks from a summary
    of the LLM input that tier produces."""

    def __init__(self, backend, budgets, full_ms, penalty=None, controller_ms: float = 0.0, d_model: int | None = None,
                 kv: tuple[int, ...] | None = None, guard=None, skip_guarded: bool = False):  # fmt: skip
        """`d_model`, `kv`: the prompt's width and the stage-2 keys/values' shape (`features.kv_shape`);
        default: the backend's."""
        super().__init__(backend, budgets, full_ms, penalty, controller_ms, guard, skip_guarded)
        f32 = np.float32
        d_model = backend.d_model if d_model is None else d_model
        kv = backend.kv_shape if kv is None else kv
        self.observation_space = spaces.Dict({
            "stage": spaces.Box(0, 1, (1,), f32),
            "budget": spaces.Box(-np.inf, np.inf, (N_BUDGET_FEATURES,), f32),
            "headroom": spaces.Box(-np.inf, np.inf, (self.space.n_configs,), f32),
            "prompt": spaces.Box(-np.inf, np.inf, (d_model,), f32),
            "tier": spaces.Box(0, 1, (self.space.n_tier,), f32),
            "kv": spaces.Box(-np.inf, np.inf, tuple(kv), f32),
            "kv_mask": spaces.Box(0, 1, (kv[3],), f32),
            "position": spaces.Box(0, np.inf, (1,), f32),
        })  # fmt: skip
        self._stage, self._tier = 0, 0

    def _obs(self):
        tier = np.zeros(self.space.n_tier, np.float32)
        shape = self.observation_space["kv"].shape
        kv, mask, position = np.zeros(shape, np.float32), np.zeros(shape[3], np.float32), 0
        if self._stage == 1:
            tier[self._tier] = 1
            kv, mask, position = self._stage2
        return {"stage": np.array([self._stage], np.float32),
                "budget": budget_features(self._budget, self.full_ms), "headroom": self._room.copy(),
                "prompt": np.array(self._prompt, np.float32), "tier": tier,
                "kv": np.array(kv, np.float32), "kv_mask": np.array(mask, np.float32),
                "position": np.array([position], np.float32)}  # fmt: skip

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self._new_request()
        self._stage, self._tier = 0, 0
        self._prompt = self.backend.prompt(self._sample)
        return self._obs(), {"budget_ms": self._budget, "sample": self._sample, "guarded": self.guarded}

    def action_masks(self) -> np.ndarray:
        n_tier, n_top_k, n_blocks = self.space.nvec
        tier = np.zeros(n_tier, bool)
        pinned = np.zeros(n_top_k, bool), np.zeros(n_blocks, bool)
        if self._stage == 0:
            tier[:] = True
            pinned[0][0] = pinned[1][0] = True
            return np.concatenate([tier, *pinned])
        tier[self._tier] = True
        return np.concatenate([tier, np.ones(n_top_k, bool), np.ones(n_blocks, bool)])

    def step(self, action):
        action = np.asarray(action).reshape(-1)
        if self._stage == 0 and self.guarded:  # served before stage 1 would have run
            reward, info = self._finish(0)
            return self._obs(), reward, True, False, info
        if self._stage == 0:
            self._tier = int(action[0])
            self._stage2 = self.backend.stage2(self._sample, self._tier)
            self._stage = 1
            return self._obs(), 0.0, False, False, {"tier": self.space.tier[self._tier]}
        cfg = self.space.config_index(self._tier, int(action[1]), int(action[2]))
        reward, info = self._finish(cfg, self.space.tier_configs(self._tier))  # its crops are encoded: repair within it
        return self._obs(), reward, True, False, info


class SingleStageKnobEnv(_KnobEnv):
    """One decision per request: all three knobs from the budget, the prompt and the global crop's features."""

    def __init__(self, backend, budgets, full_ms, penalty=None, controller_ms: float = 0.0, d_model: int | None = None,
                 global_ms: float = 0.0, reuse_low: bool = True, guard=None, skip_guarded: bool = False):  # fmt: skip
        """`global_ms`: the cost of encoding the global view first, paid unless tier = low reuses it
        (`reuse_low`: the VLM's own encoder; a distilled light encoder's features cannot be reused).
        The guard decides before the global view is encoded, so its requests do not pay for it.
        `d_model`: the prompt's and global view's width; default: the backend's."""
        self.global_ms, self.reuse_low = float(global_ms), reuse_low
        super().__init__(backend, budgets, full_ms, penalty, controller_ms, guard, skip_guarded)
        f32 = np.float32
        d_model = backend.d_model if d_model is None else d_model
        self.observation_space = spaces.Dict({
            "budget": spaces.Box(-np.inf, np.inf, (N_BUDGET_FEATURES,), f32),
            "headroom": spaces.Box(-np.inf, np.inf, (self.space.n_configs,), f32),
            "prompt": spaces.Box(-np.inf, np.inf, (d_model,), f32),
            "global_view": spaces.Box(-np.inf, np.inf, (d_model,), f32),
        })  # fmt: skip

    def _obs(self):
        return {
            "budget": budget_features(self._budget, self.full_ms),
            "headroom": self._room.copy(),
            "prompt": np.array(self._prompt, np.float32),
            "global_view": np.array(self._global, np.float32),
        }

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self._new_request()
        self._prompt = self.backend.prompt(self._sample)
        self._global = self.backend.global_view(self._sample)
        return self._obs(), {"budget_ms": self._budget, "sample": self._sample, "guarded": self.guarded}

    def action_masks(self) -> np.ndarray:
        return np.ones(self.space.n_logits, bool)

    def step(self, action):
        action = np.asarray(action).reshape(-1)
        reward, info = self._finish(self.space.config_index(int(action[0]), int(action[1]), int(action[2])))
        return self._obs(), reward, True, False, info

    def added_latency(self) -> np.ndarray:
        """The global crop is encoded before the decision; tier = low reuses it, other tiers pay it."""
        added = super().added_latency()
        added[self.space.tier_configs(0).stop if self.reuse_low else 0 :] += self.global_ms
        return added


def replay_backend(model, table_path, latency_model: LatencyModel, cache_dir=None,
                   first: int | None = None) -> ReplayBackend:  # fmt: skip
    """A replay backend over an outcome table (its `first` samples only, if given); features are computed
    once and cached on disk."""
    table = OutcomeTable.load(table_path)
    table = table if first is None else table.head(first)
    space = KnobSpace.from_config(model.cfg)
    if table.configs != all_configs(model):
        raise ValueError(f"{table_path} was built for other knob values than model {model.cfg.name}")
    cache_dir = Path(cache_dir or os.environ.get("KNOB_RL_CACHE", Path.home() / ".cache" / "knob-rl"))
    path = cache_dir / f"features-{cache_key(model, table.meta)}.npz"
    features = None
    if path.exists():
        try:
            features = FeatureCache.load(path)
            n, tiers = len(table.sample_ids), space.n_tier
            if len(features.prompt) != n or features.kv.shape[:2] != (n, tiers):
                raise CorruptCacheError(f"feature cache {path} holds arrays of other shapes than {table_path} needs")
        except CorruptCacheError as e:
            warnings.warn(f"{e}; rebuilding it", stacklevel=2)
            path.unlink(missing_ok=True)
            features = None
    if features is None:
        features = FeatureCache.build(model, dataset_samples(table.meta["dataset"]))
        path.parent.mkdir(parents=True, exist_ok=True)
        features.save(path)
    return ReplayBackend(table, features, latency_model, space)


def make_env(kind: str, backend, budgets: BudgetDistribution, full_ms: float, cfg, penalty=None,
             controller_ms: float = 0.0, global_ms: float = 0.0, reuse_low: bool = True, guard=None,
             skip_guarded: bool = False):  # fmt: skip
    """`cfg`: the VLM's config (observation shapes follow its widths; the knob space is the backend's)."""
    d_model = cfg.llm.d_model
    if kind == "two_stage":
        return TwoStageKnobEnv(backend, budgets, full_ms, penalty, controller_ms, d_model, kv_shape(cfg), guard,
                               skip_guarded)  # fmt: skip
    if kind == "single_stage":
        return SingleStageKnobEnv(backend, budgets, full_ms, penalty, controller_ms, d_model, global_ms, reuse_low,
                                  guard, skip_guarded)  # fmt: skip
    raise ValueError(f"unknown environment kind {kind!r}; choose two_stage or single_stage")
