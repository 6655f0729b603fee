"""The knob-selection environments and the VLM they drive; importing `envs` registers the Gymnasium ids.

>>> import gymnasium as gym
>>> import envs
>>> env = gym.make("KnobRL/TwoStage-v0")  # or envs.make_knob_env("two_stage", split="val", budgets="tight")
>>> vlm = envs.load_model("tiny")  # the embedded model, to ask directly (`vlm.answer`, scripts/answer.py)
"""

from envs.assets import Assets, load_assets
from envs.budgets import BudgetDistribution, Penalty, parse_distribution
from envs.guard import BudgetGuard
from envs.knob_env import LiveBackend, ReplayBackend, SingleStageKnobEnv, TwoStageKnobEnv
from envs.registration import ENV_IDS, make_knob_env, register_envs
from envs.vlm.checkpoint import load_model

register_envs()

__all__ = [
    "ENV_IDS",
    "Assets",
    "BudgetDistribution",
    "BudgetGuard",
    "LiveBackend",
    "Penalty",
    "ReplayBackend",
    "SingleStageKnobEnv",
    "TwoStageKnobEnv",
    "load_assets",
    "load_model",
    "make_knob_env",
    "parse_distribution",
]
