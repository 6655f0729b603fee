"""Training, evaluation and serving of knob controllers.

>>> from agents import Args, evaluate, load_server, train
>>> out = train(Args(policy="two_stage", quick=True, controller_ms=1.0))  # the main job, pinned charge
>>> report = evaluate(out / "policy.zip", "tight,loose", episodes=200, controller_ms=1.0)
>>> served = load_server(out / "policy.zip").serve("cat.png", "what colour is the cat?", budget_ms=30.0)
"""

from agents.args import Args
from agents.pipeline import run, train
from agents.policy_eval import evaluate
from agents.serving import Served, SingleStageServer, TwoStageServer, load_policy, load_server

__all__ = [
    "Args",
    "Served",
    "SingleStageServer",
    "TwoStageServer",
    "evaluate",
    "load_policy",
    "load_server",
    "run",
    "train",
]
