"""The two-stage serving path: the budget token rides in the layers 0-2 pass, and decides as replay does."""

import pytest
import torch
from conftest import _envs
from sb3_contrib import MaskablePPO
from torch import nn

from agents.serving import TwoStageServer, two_stage_overhead_ms
from envs.budgets import BudgetError
from policies.sb3 import TwoStagePolicy, decide


def _policy(env, vlm_dir, stage1):
    model = MaskablePPO(TwoStagePolicy, env, n_steps=16, seed=0, policy_kwargs={"vlm": vlm_dir, "stage1": stage1})
    net = model.policy.mlp_extractor.net
    torch.manual_seed(0)
    for part in (net.stage1, net.stage2.budget_token, net.stage2.trunk, net.stage2.top_k_head, net.stage2.blocks_head):
        for m in part.modules():
            if isinstance(m, nn.Linear):  # decisions that vary with budget and request
                nn.init.normal_(m.weight, std=2.0 / m.in_features**0.5 * 3)
    return model


@pytest.mark.parametrize("stage1", ["budget", "prompt"])
def test_served_decisions_and_answers_equal_the_live_environments(world, vlm_dir, stage1):
    tiny, _, _, samples = world
    _, env = _envs(world)
    model = _policy(env, vlm_dir, stage1)
    server = TwoStageServer(model.policy.mlp_extractor.net, tiny, env.full_ms)
    configs = set()
    for seed in range(6):
        obs, info = env.reset(seed=seed)
        obs, *_ = env.step(decide(model.policy, obs, env.action_masks()))
        *_, out = env.step(decide(model.policy, obs, env.action_masks()))
        s = samples[info["sample"]]
        served = server.serve(s.image, s.question, info["budget_ms"])
        assert served.config == out["config"]
        c = served.config
        assert served.answer == tiny.answer([s.image], [s.question], c.tier, c.top_k, c.blocks).answers[0]
        assert served.parts_ms["controller"] > 0 and served.total_ms >= sum(served.parts_ms.values()) * 0.99
        configs.add(c)
    assert len(configs) > 1  # the check could fail: decisions differ between requests


def test_overhead_is_measured_and_a_bad_budget_is_refused(world, vlm_dir):
    tiny, _, _, samples = world
    _, env = _envs(world)
    server = TwoStageServer(_policy(env, vlm_dir, "budget").policy.mlp_extractor.net, tiny, env.full_ms)
    got = two_stage_overhead_ms(server, samples[:3], [5.0, 12.0, 30.0], repeats=2)
    assert got["requests"] == 6 and got["networks_ms"] > 0
    assert got["total_ms"] == pytest.approx(got["networks_ms"] + max(got["budget_token_prefill_ms"], 0.0))
    with pytest.raises(BudgetError, match="positive finite"):
        server.serve(samples[0].image, samples[0].question, float("nan"))
