"""Controller networks in plain torch (usable without SB3). Each returns action logits over the
model's knob space (`envs/knobs.py`: `MultiDiscrete(space.nvec)`, tier, top_k and blocks logits
concatenated, `space.n_logits` numbers) and a state value. Head and input widths follow the space.

Two-stage: stage 1 picks the tier before any vision work, from the budget (option A, a small MLP),
the budget and the pooled prompt embedding (option B), or the budget and the prompt's
semantic route (the nearest of k-means clusters of training prompts). Stage 2 runs a budget token
through the VLM's own layers 0-2 (frozen) against the keys and values those layers cached for the
prompt during the prefix (`envs/features.py`), so the prompt is never recomputed; the budget
token's hidden state feeds a scheduler MLP with a top_k head and a blocks head.
Single-stage: fuses the global-crop feature, the pooled prompt and the budget by an MLP or a small
Transformer, with three heads.
Every decision also reads the budget's headroom (envs/knob_env.py: log(budget / predicted latency)
per config) and its sign, so which configs fit is a feature, not a boundary to learn: stage 1 sees
each tier's best headroom, stage 2 the chosen tier's configs, single-stage every config.
"""

from __future__ import annotations

import copy

import numpy as np
import torch
from torch import nn

from envs.budgets import N_BUDGET_FEATURES, PENALTY_KINDS, Penalty
from envs.guard import BudgetGuard
from envs.knobs import KnobSpace
from envs.vlm.presets import FIRST_KNOBBED_LAYER
from envs.vlm.staged import one_token_layer


def with_fits(headroom: torch.Tensor) -> torch.Tensor:
    """[..., n] headroom -> [..., 2n]: the headroom and whether each config fits (headroom >= 0)."""
    return torch.cat([headroom, (headroom >= 0).to(headroom.dtype)], dim=-1)


def by_tier(headroom: torch.Tensor, n_tier: int) -> torch.Tensor:
    """[B, configs] -> [B, tiers, top_k * blocks] (configs are numbered tier-major)."""
    return headroom.reshape(headroom.shape[0], n_tier, -1)


def stage1_budget(obs, n_tier: int) -> torch.Tensor:
    """What stage 1 knows of the budget: its features and each tier's best headroom (and sign)."""
    return torch.cat([obs["budget"], with_fits(by_tier(obs["headroom"], n_tier).amax(-1))], dim=-1)


def tier_room(obs) -> torch.Tensor:
    """The chosen tier (one-hot `obs["tier"]`)'s headroom over its top_k x blocks configs, with signs:
    [B, 2 * space.per_tier]."""
    tier = obs["tier"]
    return with_fits((by_tier(obs["headroom"], tier.shape[1]) * tier[:, :, None]).sum(1))


def stage1_width(space: KnobSpace) -> int:
    """Stage 1's budget input: the budget features, and each tier's best headroom and its sign."""
    return N_BUDGET_FEATURES + 2 * space.n_tier


def room_width(space: KnobSpace) -> int:
    """`tier_room`'s width: one tier's headroom and signs."""
    return 2 * space.per_tier


def mlp(sizes: list[int]) -> nn.Sequential:
    layers: list[nn.Module] = []
    for a, b in zip(sizes[:-1], sizes[1:], strict=True):
        layers += [nn.Linear(a, b), nn.Tanh()]
    return nn.Sequential(*layers[:-1])


# ------------------------------------------------------------------------------------------ stage 1
class Stage1Budget(nn.Module):
    """Option A: the budget alone decides the tier."""

    def __init__(self, space: KnobSpace, d_model: int, hidden: int = 96):
        super().__init__()
        self.space, n_in = space, stage1_width(space)
        self.pi, self.v = mlp([n_in, hidden, hidden, space.n_tier]), mlp([n_in, 32, 1])

    def inputs(self, obs) -> torch.Tensor:
        return stage1_budget(obs, self.space.n_tier)

    def forward(self, obs):
        x = self.inputs(obs)
        return self.pi(x), self.v(x)


class Stage1Prompt(nn.Module):
    """Option B: budget and pooled prompt embedding."""

    def __init__(self, space: KnobSpace, d_model: int, hidden: int = 128):
        super().__init__()
        self.space, n_in = space, stage1_width(space) + d_model
        self.norm = nn.LayerNorm(d_model)
        self.pi, self.v = mlp([n_in, hidden, hidden, space.n_tier]), mlp([n_in, hidden, 1])

    def inputs(self, obs) -> torch.Tensor:
        return torch.cat([stage1_budget(obs, self.space.n_tier), self.norm(obs["prompt"])], dim=-1)

    def forward(self, obs):
        x = self.inputs(obs)
        return self.pi(x), self.v(x)


class SemanticRouter(nn.Module):
    """Option B as a router: the prompt's nearest route (k-means centroid) and the budget decide."""

    def __init__(self, space: KnobSpace, d_model: int, routes: list[list[float]], hidden: int = 64):
        super().__init__()
        self.space = space
        self.register_buffer("centroids", torch.tensor(routes, dtype=torch.float32))
        n_in = stage1_width(space) + len(routes)
        self.pi, self.v = mlp([n_in, hidden, space.n_tier]), mlp([n_in, hidden, 1])

    def route(self, prompt: torch.Tensor) -> torch.Tensor:
        return torch.cdist(prompt, self.centroids).argmin(dim=-1)

    def inputs(self, obs) -> torch.Tensor:
        onehot = nn.functional.one_hot(self.route(obs["prompt"]), len(self.centroids)).float()
        return torch.cat([stage1_budget(obs, self.space.n_tier), onehot], dim=-1)

    def forward(self, obs):
        x = self.inputs(obs)
        return self.pi(x), self.v(x)

    @staticmethod
    def fit_routes(prompts: np.ndarray, n_routes: int = 8, iters: int = 50, seed: int = 0) -> list[list[float]]:
        """k-means (k-means++ start) of training prompts' embeddings."""
        rng = np.random.default_rng(seed)
        x = np.asarray(prompts, dtype=np.float64)
        uniq = np.unique(x, axis=0)
        n_routes = min(n_routes, len(uniq))
        centres = [uniq[rng.integers(len(uniq))]]
        for _ in range(1, n_routes):
            d = np.min([((uniq - c) ** 2).sum(1) for c in centres], axis=0)
            centres.append(uniq[rng.choice(len(uniq), p=d / d.sum())] if d.sum() > 0 else uniq[0])
        c = np.stack(centres)
        for _ in range(iters):
            assign = ((x[:, None] - c[None]) ** 2).sum(-1).argmin(1)
            c = np.stack([x[assign == j].mean(0) if (assign == j).any() else c[j] for j in range(n_routes)])
        return c.tolist()


# ------------------------------------------------------------------------------------------ stage 2
class Stage2Scheduler(nn.Module):
    """A budget token through the VLM's layers 0-2 (frozen copies) against the prefix's cached keys/values.

    This is what running layers 0-2 over [prompt positions; budget token] computes at the budget
    token: the prompt's entries do not depend on it (causal attention), so they come from the cache
    the request's prefix already filled, and the controller pays for one token through 3 layers
    (`one_token_layer`). Served, the token rides in the pass of layers 0-2 instead (agents/serving.py).
    `space`: the knob space its heads cover; default: the VLM's.
    """

    def __init__(self, vlm, hidden: int = 128, space: KnobSpace | None = None):
        super().__init__()
        d = vlm.cfg.llm.d_model
        self.space = space = space or KnobSpace.from_config(vlm.cfg)
        room = room_width(space)
        self.layers = nn.ModuleList(copy.deepcopy(vlm.llm.layers[i]) for i in range(FIRST_KNOBBED_LAYER))
        self.rotary = copy.deepcopy(vlm.llm.rotary_emb)
        self.top_k = vlm.cfg.llm.top_k
        for p in self.layers.parameters():
            p.requires_grad_(False)
        self.budget_token = nn.Linear(N_BUDGET_FEATURES + space.n_tier + room, d)
        self.norm = nn.LayerNorm(d)
        self.trunk = nn.Sequential(nn.Linear(d + room, hidden), nn.Tanh())  # the room again, unblurred
        self.top_k_head, self.blocks_head = nn.Linear(hidden, space.n_top_k), nn.Linear(hidden, space.n_blocks)
        self.v = mlp([d, hidden, 1])

    def embed(self, obs) -> torch.Tensor:
        """The budget token's input embedding [B, d], from the budget, the chosen tier and its room."""
        return self.budget_token(torch.cat([obs["budget"], obs["tier"], tier_room(obs)], dim=-1))

    def budget_state(self, obs) -> torch.Tensor:
        """The budget token's hidden state after layer 2: [B, d]. obs["kv"] is [B, layers, 2, H, L, hd]."""
        h = self.embed(obs)
        kv, valid = obs["kv"].to(h.dtype), obs["kv_mask"] > 0.5
        mask = torch.zeros(h.shape[0], valid.shape[1] + 1, dtype=h.dtype, device=h.device)
        mask[:, :-1].masked_fill_(~valid, torch.finfo(h.dtype).min)
        cos, sin = self.rotary(h[:, None], obs["position"].long())
        for i, layer in enumerate(self.layers):
            h = one_token_layer(layer, h, cos[:, 0], sin[:, 0], kv[:, i, 0], kv[:, i, 1], mask, self.top_k)
        return h

    def forward(self, obs):
        return self.heads(self.budget_state(obs), tier_room(obs))

    def _logits(self, z: torch.Tensor, room: torch.Tensor) -> torch.Tensor:
        t = self.trunk(torch.cat([z, room], dim=-1))
        return torch.cat([self.top_k_head(t), self.blocks_head(t)], dim=-1)

    def knob_logits(self, state: torch.Tensor, room: torch.Tensor) -> torch.Tensor:
        """top_k and blocks logits from the budget token's state after layer 2 and the tier's room
        (`tier_room`); serving: no value."""
        return self._logits(self.norm(state), room)

    def heads(self, state: torch.Tensor, room: torch.Tensor):
        """top_k and blocks logits and the value from the budget token's state after layer 2."""
        z = self.norm(state)
        return self._logits(z, room), self.v(z)

    def train(self, mode: bool = True):
        super().train(mode)
        self.layers.eval()  # frozen: no dropout or other training behaviour
        return self


def register_serving_buffers(net: nn.Module, n_configs: int) -> None:
    """What a server needs to act as the environment did, saved with the policy: `added_ms`, the
    controller time the environment added to each config's latency (a server adds it to its
    predictions, so headroom means what it meant in training), and the budget guard's expected
    scores, time (-1: no guard), penalty (kind index in `PENALTY_KINDS`, weight) and repair (1: on)."""
    net.register_buffer("added_ms", torch.zeros(n_configs))
    net.register_buffer("guard_scores", torch.zeros(n_configs))
    net.register_buffer("guard_ms", torch.tensor(-1.0))
    net.register_buffer("guard_penalty", torch.tensor([0.0, 1.0]))
    net.register_buffer("guard_repair", torch.tensor(0.0))
    net.register_load_state_dict_pre_hook(_saved_before_repair)


def _saved_before_repair(module, state_dict, prefix, *_):
    """Policies saved before the guard could repair load with repair off, as they were trained."""
    state_dict.setdefault(prefix + "guard_repair", torch.tensor(0.0))


def set_guard(net: nn.Module, guard: BudgetGuard | None) -> None:
    n_configs = net.guard_scores.numel()
    if guard is not None and len(guard.scores) != n_configs:
        raise ValueError(f"the guard scores {len(guard.scores)} configs, the policy's knob space has {n_configs}")
    net.guard_scores.copy_(torch.as_tensor(guard.scores if guard else np.zeros(n_configs)))
    net.guard_ms.fill_(guard.ms if guard else -1.0)
    penalty = guard.penalty if guard else Penalty()
    net.guard_penalty.copy_(torch.tensor([PENALTY_KINDS.index(penalty.kind), penalty.weight]))
    net.guard_repair.fill_(float(bool(guard and guard.repair)))


def guard_of(net: nn.Module) -> BudgetGuard | None:
    """The budget guard the policy was trained and evaluated with, if any."""
    ms = float(net.guard_ms)
    if ms < 0:
        return None
    kind, weight = net.guard_penalty.tolist()
    penalty = Penalty(PENALTY_KINDS[int(kind)], weight)
    return BudgetGuard(net.guard_scores.double().numpy(), ms, penalty, bool(net.guard_repair > 0))


class TwoStageNet(nn.Module):
    """Routes each observation to stage 1 or stage 2 by its stage flag. `space`: the knob space it
    acts in; default: the VLM's."""

    def __init__(self, vlm, stage1: str = "budget", routes: list[list[float]] | None = None,
                 space: KnobSpace | None = None):  # fmt: skip
        super().__init__()
        d = vlm.cfg.llm.d_model
        self.space = space = space or KnobSpace.from_config(vlm.cfg)
        if stage1 == "budget":
            self.stage1 = Stage1Budget(space, d)
        elif stage1 == "prompt":
            self.stage1 = Stage1Prompt(space, d)
        elif stage1 == "router":
            if not routes:
                raise ValueError("the semantic router needs routes (SemanticRouter.fit_routes)")
            self.stage1 = SemanticRouter(space, d, routes)
        else:
            raise ValueError(f"unknown stage-1 variant {stage1!r}; choose budget, prompt or router")
        self.stage2 = Stage2Scheduler(vlm, space=space)
        register_serving_buffers(self, space.n_configs)

    def forward(self, obs):
        stage2 = obs["stage"][:, 0] > 0.5
        n_tier = self.space.n_tier
        if stage2.all() or not stage2.any():  # serving (batch 1) and most batches: no row selection
            lg, v = (self.stage2 if stage2[0] else self.stage1)(obs)
            return nn.functional.pad(lg, (n_tier, 0) if stage2[0] else (0, self.space.n_logits - n_tier)), v
        b = stage2.shape[0]
        logits = obs["budget"].new_zeros(b, self.space.n_logits)
        value = obs["budget"].new_zeros(b, 1)
        if (~stage2).any():
            sub = {k: v[~stage2] for k, v in obs.items()}
            lg, v = self.stage1(sub)
            logits[~stage2, :n_tier], value[~stage2] = lg, v
        if stage2.any():
            sub = {k: v[stage2] for k, v in obs.items()}
            lg, v = self.stage2(sub)
            logits[stage2, n_tier:], value[stage2] = lg, v
        return logits, value


class SingleStageNet(nn.Module):
    """Global-crop feature + pooled prompt + budget -> (tier, top_k, blocks) heads. `space`: the knob
    space it acts in; default: the VLM's."""

    def __init__(self, vlm, fusion: str = "mlp", hidden: int = 128, space: KnobSpace | None = None):
        super().__init__()
        d = vlm.cfg.llm.d_model
        self.fusion = fusion
        self.space = space = space or KnobSpace.from_config(vlm.cfg)
        self.norm_g, self.norm_p = nn.LayerNorm(d), nn.LayerNorm(d)
        n_budget = N_BUDGET_FEATURES + 2 * space.n_configs
        if fusion == "mlp":
            self.body = nn.Sequential(
                nn.Linear(2 * d + n_budget, hidden), nn.Tanh(), nn.Linear(hidden, hidden), nn.Tanh()
            )
        elif fusion == "transformer":
            self.proj_g, self.proj_p = nn.Linear(d, hidden), nn.Linear(d, hidden)
            self.proj_b = nn.Linear(n_budget, hidden)
            self.cls = nn.Parameter(torch.zeros(1, 1, hidden))
            layer = nn.TransformerEncoderLayer(hidden, 4, 2 * hidden, dropout=0.0, batch_first=True)
            self.body = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        else:
            raise ValueError(f"unknown fusion {fusion!r}; choose mlp or transformer")
        self.pi = nn.Linear(hidden, space.n_logits)
        self.v = nn.Linear(hidden, 1)
        register_serving_buffers(self, space.n_configs)

    def forward(self, obs):
        g, p = self.norm_g(obs["global_view"]), self.norm_p(obs["prompt"])
        budget = torch.cat([obs["budget"], with_fits(obs["headroom"])], dim=-1)
        if self.fusion == "mlp":
            z = self.body(torch.cat([g, p, budget], dim=-1))
        else:
            toks = torch.stack([self.proj_g(g), self.proj_p(p), self.proj_b(budget)], dim=1)
            z = self.body(torch.cat([self.cls.expand(len(toks), -1, -1), toks], dim=1))[:, 0]
        return self.pi(z), self.v(z)
