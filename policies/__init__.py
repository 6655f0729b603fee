"""The controllers' networks and their Stable-Baselines3 policies (MaskablePPO).

>>> from sb3_contrib import MaskablePPO
>>> from policies import TwoStagePolicy
>>> model = MaskablePPO(TwoStagePolicy, env, policy_kwargs={"vlm": "tiny"})  # env: a KnobRL/TwoStage-v0 env
"""

from policies.light_encoder import LightEncoder
from policies.networks import SemanticRouter, SingleStageNet, TwoStageNet
from policies.sb3 import POLICIES, SingleStagePolicy, TwoStagePolicy, decide

__all__ = [
    "POLICIES",
    "LightEncoder",
    "SemanticRouter",
    "SingleStageNet",
    "SingleStagePolicy",
    "TwoStageNet",
    "TwoStagePolicy",
    "decide",
]
