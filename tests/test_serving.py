"""The two-stage serving path: the budget token rides in the layers 0-2 pass, and decides as replay does."""

import numpy as np
import pytest
import torch
from conftest import _envs, fake_latency
from sb3_contrib import MaskablePPO
from torch import nn

from agents.serving import (
    SingleStageServer,
    TwoStageServer,
    load_server,
    single_stage_overhead_ms,
    two_stage_overhead_ms,
)
from envs.budgets import BudgetError
from envs.knob_env import SingleStageKnobEnv
from policies.sb3 import SingleStagePolicy, TwoStagePolicy, decide


def _policy(env, vlm_dir, stage1):
    model = MaskablePPO(TwoStagePolicy, env, n_steps=16, seed=0, policy_kwargs={"vlm": vlm_dir, "stage1": stage1})
    net = model.policy.mlp_extractor.net
    torch.manual_seed(1)
    for part in (net.stage1, net.stage2.budget_token, net.stage2.trunk, net.stage2.top_k_head, net.stage2.blocks_head):
        for m in part.modules():
            if isinstance(m, nn.Linear):  # decisions that vary with budget and request
                nn.init.normal_(m.weight, std=2.0 / m.in_features**0.5 * 3)
    return model


@pytest.mark.slow
@pytest.mark.parametrize("stage1", ["budget", "prompt"])
def test_served_decisions_and_answers_equal_the_live_environments(world, vlm_dir, stage1):
    tiny, _, _, samples = world
    _, env = _envs(world, controller_ms=0.7)
    model = _policy(env, vlm_dir, stage1)
    model.policy.mlp_extractor.net.added_ms.fill_(0.7)  # the server's headroom must count it as the env's does
    server = TwoStageServer(model.policy.mlp_extractor.net, tiny, env.full_ms, env.backend.latency_model)
    configs = set()
    for seed in range(12):
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
    server = TwoStageServer(
        _policy(env, vlm_dir, "budget").policy.mlp_extractor.net, tiny, env.full_ms, env.backend.latency_model
    )
    got = two_stage_overhead_ms(server, samples[:3], [5.0, 12.0, 30.0], repeats=2)
    assert got["requests"] == 6 and got["networks_ms"] > 0
    assert got["total_ms"] == pytest.approx(got["networks_ms"] + max(got["budget_token_prefill_ms"], 0.0))
    assert got["machine_speed"] > 0 and got["profile_ms"] == pytest.approx(got["total_ms"] / got["machine_speed"])
    with pytest.raises(BudgetError, match="positive finite"):
        server.serve(samples[0].image, samples[0].question, float("nan"))


@pytest.mark.slow
@pytest.mark.parametrize("fusion", ["mlp", "transformer"])  # numpy copy / torch
def test_single_stage_served_decisions_equal_the_live_environments(world, vlm_dir, fusion):
    tiny, _, _, samples = world
    _, env = _envs(world, SingleStageKnobEnv, controller_ms=0.3, global_ms=1.0)
    model = MaskablePPO(SingleStagePolicy, env, n_steps=16, seed=0, policy_kwargs={"vlm": vlm_dir, "fusion": fusion})
    net = model.policy.mlp_extractor.net
    torch.manual_seed(0)
    for m in net.modules():
        if isinstance(m, nn.Linear):  # decisions that vary with budget and request
            nn.init.normal_(m.weight, std=6.0 / m.in_features**0.5)
    net.added_ms.copy_(torch.as_tensor(env.added_latency()))
    server = SingleStageServer(net, tiny, env.full_ms, env.backend.latency_model)
    assert (server.heads is None) == (fusion == "transformer")
    got = single_stage_overhead_ms(server, samples[:2], [5.0, 30.0], repeats=2)
    assert got["requests"] == 4 and got["total_ms"] > 0
    configs = set()
    for seed in range(10):
        obs, info = env.reset(seed=seed)
        *_, out = env.step(decide(model.policy, obs, env.action_masks()))
        s = samples[info["sample"]]
        served = server.serve(s.image, s.question, info["budget_ms"])
        assert served.config == out["config"]
        c = served.config
        assert served.answer == tiny.answer([s.image], [s.question], c.tier, c.top_k, c.blocks).answers[0]
        configs.add(c)
    assert len(configs) > 1


def test_answer_script_serves_a_saved_policy_and_refuses_what_it_cannot(world, vlm_dir, tmp_path, capsys):
    """`answer.py --policy`: the knobs a saved controller picks, and clear errors."""
    import json
    import shutil

    from PIL import Image

    from scripts.answer import main as answer_main

    tiny, _, _, samples = world
    shutil.copytree(vlm_dir, tmp_path / "m")  # a model directory with a profile beside the weights
    (tmp_path / "run").mkdir()
    (tmp_path / "m" / "latency_cpu.json").write_text(json.dumps({"reference_full_ms": 25.0, "model": fake_latency()}))
    _, env = _envs(world)
    model = _policy(env, str(tmp_path / "m"), "budget")
    model.save(tmp_path / "run" / "policy.zip")
    Image.fromarray(np.asarray(samples[0].image)).save(tmp_path / "img.png")
    argv = ["--policy", str(tmp_path / "run" / "policy.zip"), "--image", str(tmp_path / "img.png"),
            "--question", samples[0].question, "--warmup", "0"]  # fmt: skip
    assert answer_main([*argv, "--budget-ms", "12", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    expect = load_server(tmp_path / "run" / "policy.zip").serve(samples[0].image, samples[0].question, 12.0)
    assert (out["tier"], out["top_k"], out["blocks"]) == (expect.config.tier, expect.config.top_k, expect.config.blocks)
    assert out["answer"] == expect.answer and out["latency_ms"]["total"] > 0
    assert answer_main([*argv, "--budget-ms", "0"]) == 2 and "positive finite" in capsys.readouterr().err
    (tmp_path / "run" / "args.json").write_text(json.dumps({"policy": "single_stage", "encoder": "light"}))
    single = MaskablePPO(SingleStagePolicy, _envs(world, SingleStageKnobEnv)[1], n_steps=16,
                         policy_kwargs={"vlm": str(tmp_path / "m")})  # fmt: skip
    single.save(tmp_path / "run" / "policy.zip")
    assert answer_main([*argv, "--budget-ms", "12"]) == 2 and "light encoder" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["two_stage", "single_stage"])
def test_the_budget_guard_serves_as_the_environment_does_and_is_saved_with_the_policy(world, vlm_dir, kind, tmp_path):
    from envs.guard import BudgetGuard
    from envs.knobs import KnobSpace
    from policies.networks import guard_of, set_guard

    tiny, _, _, samples = world
    from envs.budgets import Penalty

    n_configs = KnobSpace.from_config(tiny.cfg).n_configs
    guard = BudgetGuard(np.linspace(0.0, 1.0, n_configs), ms=0.01, penalty=Penalty("relative", 2.0))
    if kind == "two_stage":
        _, env = _envs(world, controller_ms=2.0, guard=guard)
        model, cls = _policy(env, vlm_dir, "budget"), TwoStageServer
        with torch.no_grad():  # the low tier, where some configs fit these budgets: repairs happen within it
            model.policy.mlp_extractor.net.stage1.pi[-1].bias[0] += 100.0
    else:
        _, env = _envs(world, SingleStageKnobEnv, controller_ms=2.0, global_ms=1.0, guard=guard)
        model = MaskablePPO(SingleStagePolicy, env, n_steps=16, seed=0, policy_kwargs={"vlm": vlm_dir})
        cls = SingleStageServer
    net = model.policy.mlp_extractor.net
    net.added_ms.copy_(torch.as_tensor(env.added_latency()))
    assert guard_of(net) is None  # no guard until one is set
    set_guard(net, guard)
    model.save(tmp_path / "p.zip")
    loaded = guard_of(MaskablePPO.load(tmp_path / "p.zip").policy.mlp_extractor.net)
    np.testing.assert_allclose(loaded.scores, guard.scores)
    assert loaded.ms == pytest.approx(0.01) and loaded.penalty == guard.penalty and loaded.repair
    server = cls(net, tiny, env.full_ms, env.backend.latency_model)
    guarded = repaired = 0
    for seed in range(16):
        obs, info = env.reset(seed=seed)
        done = False
        while not done:
            obs, _, done, _, out = env.step(decide(model.policy, obs, env.action_masks()))
        s = samples[info["sample"]]
        served = server.serve(s.image, s.question, info["budget_ms"])
        assert served.config == out["config"]
        repaired += out["repaired"]
        if out["guarded"]:
            guarded += 1
            c = served.config
            assert served.answer == tiny.answer([s.image], [s.question], c.tier, c.top_k, c.blocks).answers[0]
            assert "controller" in served.parts_ms and served.parts_ms["vision"] > 0
    assert 0 < guarded < 16 and repaired > 0
    set_guard(net, BudgetGuard(guard.scores, ms=0.01, repair=False))
    assert not guard_of(net).repair
    got = (two_stage_overhead_ms if kind == "two_stage" else single_stage_overhead_ms)(
        server, samples[:2], [5.0, 30.0], repeats=2
    )
    assert 0 < got["guard_ms"] < got["total_ms"] and got["guard_profile_ms"] == pytest.approx(
        got["guard_ms"] / got["machine_speed"]
    )
