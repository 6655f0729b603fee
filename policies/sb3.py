"""SB3 (MaskablePPO) policies around the torch networks.

The network maps the observation dict straight to MultiDiscrete logits and a value, so SB3's
action and value nets are identities. `policy_kwargs` choose the variant, name the VLM whose
layers 0-2 stage 2 copies and, optionally, the knob lists it acts over (default: the VLM's);
`_get_constructor_parameters` returns them so a saved policy loads again.
"""

from __future__ import annotations

import warnings

import gymnasium as gym
import numpy as np
import torch
from sb3_contrib.common.maskable.policies import MaskableActorCriticPolicy
from stable_baselines3.common.torch_layers import BaseFeaturesExtractor
from torch import nn

from envs.knobs import KnobSpace
from envs.vlm.checkpoint import load_model
from policies.networks import SingleStageNet, TwoStageNet


class PassThrough(BaseFeaturesExtractor):
    """Hands the observation dict to the network unchanged."""

    def __init__(self, observation_space: gym.spaces.Dict):
        super().__init__(observation_space, features_dim=1)

    def forward(self, obs):
        return obs


class _Extractor(nn.Module):
    """SB3's `mlp_extractor` contract: latent_pi = logits, latent_vf = value."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net
        self.latent_dim_pi, self.latent_dim_vf = net.space.n_logits, 1

    def forward(self, obs):
        return self.net(obs)

    def forward_actor(self, obs):
        return self.net(obs)[0]

    def forward_critic(self, obs):
        return self.net(obs)[1]


def _load_vlm(vlm: str):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return load_model(vlm)


class _KnobPolicy(MaskableActorCriticPolicy):
    def __init__(self, observation_space, action_space, lr_schedule, vlm: str = "tiny", knobs: dict | None = None,
                 **kwargs):  # fmt: skip
        """`knobs`: the knob lists (`KnobSpace.to_lists()`) the policy acts over; default: the VLM's."""
        self.vlm, self.knobs = vlm, knobs
        kwargs.setdefault("features_extractor_class", PassThrough)
        kwargs["share_features_extractor"] = True
        super().__init__(observation_space, action_space, lr_schedule, **kwargs)

    def _make_net(self) -> nn.Module:
        raise NotImplementedError

    def _knob_space(self, vlm) -> KnobSpace:
        """The policy's knob space, checked against the action space it was built for."""
        space = KnobSpace.from_config(vlm.cfg) if self.knobs is None else KnobSpace.from_lists(self.knobs)
        if tuple(int(n) for n in self.action_space.nvec) != space.nvec:
            raise ValueError(
                f"the action space {self.action_space} does not match the knob space {space.to_lists()} "
                f"(sizes {space.nvec}): pass the environment's knob lists as policy_kwargs['knobs']"
            )
        self.knobs = space.to_lists()
        return space

    def _build(self, lr_schedule) -> None:
        self.mlp_extractor = _Extractor(self._make_net())
        self.action_net, self.value_net = nn.Identity(), nn.Identity()
        self.optimizer = self.optimizer_class(
            [p for p in self.parameters() if p.requires_grad], lr=lr_schedule(1), **self.optimizer_kwargs
        )

    def _get_constructor_parameters(self) -> dict:
        data = super()._get_constructor_parameters()
        data.update(self._variant())
        return data

    def _variant(self) -> dict:
        return {"vlm": self.vlm, "knobs": self.knobs}


class TwoStagePolicy(_KnobPolicy):
    """MaskablePPO policy of the two-stage environment: a `TwoStageNet` over the VLM named by `vlm`
    (`stage1`: budget | prompt | router)."""

    def __init__(self, *args, stage1: str = "budget", routes: list | None = None, **kwargs):
        self.stage1, self.routes = stage1, routes
        super().__init__(*args, **kwargs)

    def _make_net(self):
        vlm = _load_vlm(self.vlm)
        return TwoStageNet(vlm, self.stage1, self.routes, space=self._knob_space(vlm))

    def _variant(self):
        return {**super()._variant(), "stage1": self.stage1, "routes": self.routes}


class SingleStagePolicy(_KnobPolicy):
    """MaskablePPO policy of the single-stage environment: a `SingleStageNet` over the VLM named by `vlm`
    (`fusion`: mlp | transformer)."""

    def __init__(self, *args, fusion: str = "mlp", **kwargs):
        self.fusion = fusion
        super().__init__(*args, **kwargs)

    def _make_net(self):
        vlm = _load_vlm(self.vlm)
        return SingleStageNet(vlm, self.fusion, space=self._knob_space(vlm))

    def _variant(self):
        return {**super()._variant(), "fusion": self.fusion}


POLICIES = {"two_stage": TwoStagePolicy, "single_stage": SingleStagePolicy}


def decide(policy: _KnobPolicy, obs: dict, masks: np.ndarray) -> np.ndarray:
    """The deterministic action for one observation: the serving path, without SB3's predict wrapper.

    Its wall time is the controller overhead the environments charge.
    """
    device = policy.device  # a property that walks the parameters: read it once
    with torch.no_grad():
        batch = {k: torch.as_tensor(v, device=device)[None] for k, v in obs.items()}
        net = policy.mlp_extractor.net
        logits, _ = net(batch)
        logits = logits[0].masked_fill(~torch.as_tensor(masks, device=device), -torch.inf)
        return np.array([int(part.argmax()) for part in torch.split(logits, net.space.nvec)])
