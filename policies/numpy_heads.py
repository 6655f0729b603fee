"""Numpy copies of the controllers' small layers, for serving one request at a time.

At batch 1 each torch op costs its dispatch overhead whatever its size, and stage 1 plus the
stage-2 heads are a few dozen such ops; the same arithmetic in numpy dispatches more cheaply. The
controller's time counts inside every request's latency, so the server runs these copies. The
two-stage budget token's pass through layers 0-2 stays in torch: it rides in the VLM's own pass;
so does the single-stage Transformer fusion.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from policies.networks import SemanticRouter, SingleStageNet, Stage1Prompt, TwoStageNet


class Dense:
    """A numpy copy of a Linear, a LayerNorm, a Tanh, or a Sequential of them."""

    def __init__(self, module: nn.Module):
        mods = list(module) if isinstance(module, nn.Sequential) else [module]
        self.ops = []
        for m in mods:
            if isinstance(m, nn.Linear):
                self.ops.append(("linear", m.weight.detach().numpy().T.copy(), m.bias.detach().numpy().copy()))
            elif isinstance(m, nn.LayerNorm):
                self.ops.append(("norm", m.weight.detach().numpy().copy(), m.bias.detach().numpy().copy(), m.eps))
            elif isinstance(m, nn.Tanh):
                self.ops.append(("tanh",))
            else:
                raise TypeError(f"no numpy copy of {type(m).__name__}")

    def __call__(self, x: np.ndarray) -> np.ndarray:
        for op in self.ops:
            if op[0] == "linear":
                x = x @ op[1] + op[2]
            elif op[0] == "tanh":
                x = np.tanh(x)
            else:
                mean, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
                x = (x - mean) / np.sqrt(var + op[3]) * op[1] + op[2]
        return x


def with_fits(headroom: np.ndarray) -> np.ndarray:
    """As `policies.networks.with_fits`."""
    return np.concatenate([headroom, (headroom >= 0).astype(np.float32)])


class TwoStageHeads:
    """Stage 1, the budget token's embedding and the stage-2 heads of a `TwoStageNet`, for one request."""

    def __init__(self, net: TwoStageNet):
        s1, s2 = net.stage1, net.stage2
        self.n_tier = net.space.n_tier
        self.pi = Dense(s1.pi)
        self.prompt_norm = Dense(s1.norm) if isinstance(s1, Stage1Prompt) else None
        self.centroids = s1.centroids.numpy().copy() if isinstance(s1, SemanticRouter) else None
        self.token, self.norm, self.trunk = Dense(s2.budget_token), Dense(s2.norm), Dense(s2.trunk)
        self.n_top_k = s2.top_k_head.out_features
        heads = nn.Linear(s2.top_k_head.in_features, self.n_top_k + s2.blocks_head.out_features)
        with torch.no_grad():  # the top_k and blocks heads as one matrix
            heads.weight.copy_(torch.cat([s2.top_k_head.weight, s2.blocks_head.weight]))
            heads.bias.copy_(torch.cat([s2.top_k_head.bias, s2.blocks_head.bias]))
        self.heads = Dense(heads)

    @property
    def reads_prompt(self) -> bool:
        return self.prompt_norm is not None or self.centroids is not None

    def tier(self, budget: np.ndarray, headroom: np.ndarray, prompt: np.ndarray | None = None) -> int:
        return int(self.tier_logits(budget, headroom, prompt).argmax())

    def tier_logits(self, budget: np.ndarray, headroom: np.ndarray, prompt: np.ndarray | None = None) -> np.ndarray:
        """Stage 1 (`networks.stage1_budget` and the variant's inputs): budget features, headroom [configs],
        prompt [d]."""
        x = [budget, with_fits(headroom.reshape(self.n_tier, -1).max(-1))]
        if self.prompt_norm is not None:
            x.append(self.prompt_norm(prompt))
        elif self.centroids is not None:
            onehot = np.zeros(len(self.centroids), np.float32)
            onehot[((self.centroids - prompt) ** 2).sum(-1).argmin()] = 1
            x.append(onehot)
        return self.pi(np.concatenate(x))

    def budget_token(self, budget: np.ndarray, headroom: np.ndarray, tier: int) -> tuple[np.ndarray, np.ndarray]:
        """The budget token's input embedding [d] and the chosen tier's room [2 * configs per tier]
        (`networks.tier_room`)."""
        onehot = np.zeros(self.n_tier, np.float32)
        onehot[tier] = 1
        room = with_fits(headroom.reshape(self.n_tier, -1)[tier])
        return self.token(np.concatenate([budget, onehot, room])), room

    def knobs(self, state: np.ndarray, room: np.ndarray) -> tuple[int, int]:
        """top_k and blocks indices from the budget token's state after layer 2 [d]."""
        logits = self.knob_logits(state, room)
        return int(logits[: self.n_top_k].argmax()), int(logits[self.n_top_k :].argmax())

    def knob_logits(self, state: np.ndarray, room: np.ndarray) -> np.ndarray:
        return self.heads(self.trunk(np.concatenate([self.norm(state), room])))


class SingleStageHeads:
    """A `SingleStageNet` with MLP fusion, for one request: (tier, top_k, blocks) logits [space.n_logits]."""

    def __init__(self, net: SingleStageNet):
        if net.fusion != "mlp":
            raise TypeError(f"no numpy copy of the {net.fusion} fusion")
        self.norm_g, self.norm_p, self.body, self.pi = (
            Dense(net.norm_g),
            Dense(net.norm_p),
            Dense(net.body),
            Dense(net.pi),
        )

    def logits(
        self, budget: np.ndarray, headroom: np.ndarray, prompt: np.ndarray, global_view: np.ndarray
    ) -> np.ndarray:
        x = np.concatenate([self.norm_g(global_view), self.norm_p(prompt), budget, with_fits(headroom)])
        return self.pi(self.body(x))
