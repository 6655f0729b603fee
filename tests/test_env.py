"""The knob environments: replay == live with profile latency, masks, rewards, checkers."""

import numpy as np
import pytest
from conftest import _envs
from gymnasium.utils.env_checker import check_env as gym_check_env
from stable_baselines3.common.env_checker import check_env as sb3_check_env

from envs.budgets import Penalty
from envs.features import request_features
from envs.knob_env import SingleStageKnobEnv, TwoStageKnobEnv


@pytest.mark.parametrize("cls", [TwoStageKnobEnv, SingleStageKnobEnv])
def test_live_and_replay_agree_under_the_same_seed(world, cls):
    replay, live = _envs(world, cls, penalty=Penalty("relative", 0.5), controller_ms=0.25)
    rng = np.random.default_rng(0)
    for episode in range(6):
        (o1, _), (o2, _) = replay.reset(seed=episode), live.reset(seed=episode)
        done = False
        while not done:
            for key in o1:
                np.testing.assert_allclose(o1[key], o2[key], atol=1e-5, rtol=1e-5, err_msg=key)
            mask = replay.action_masks()
            assert (mask == live.action_masks()).all()
            action = [rng.choice(np.flatnonzero(m)) for m in replay.space.split(mask)]
            o1, r1, done, _, i1 = replay.step(action)
            o2, r2, done2, _, i2 = live.step(action)
            assert done == done2
            assert r1 == pytest.approx(r2, abs=1e-5)
        assert i1["config"] == i2["config"] and i1["score"] == i2["score"]
        assert i1["latency_ms"] == pytest.approx(i2["latency_ms"], abs=1e-3)


@pytest.mark.parametrize("cls,kw", [(TwoStageKnobEnv, {}), (SingleStageKnobEnv, {"global_ms": 2.0})])
def test_headroom_is_the_budget_over_each_configs_predicted_latency(world, cls, kw):
    model, _, _, samples = world
    env, _ = _envs(world, cls, controller_ms=0.5, **kw)
    lm, knobs = env.backend.latency_model, model.cfg.knob_lists()
    seen = set()
    for seed in range(8):
        obs, _ = env.reset(seed=seed)
        s = samples[env.backend.valid[env._sample]]
        crops, tokens = model.request_shapes(s.image, s.question)
        predicted = np.array([lm.predict(crops[t], tokens[t], k, b, 1)["total"] for t in range(3)
                              for k in knobs["top_k"] for b in knobs["blocks"]]) + env.added_latency()  # fmt: skip
        np.testing.assert_allclose(obs["headroom"], np.log(env._budget / predicted), atol=1e-6)
        assert ((obs["headroom"] >= 0) == (predicted <= env._budget)).all()
        seen.add(int((obs["headroom"] >= 0).sum()))
        if cls is TwoStageKnobEnv:  # the same headroom at both steps
            np.testing.assert_array_equal(env.step([1, 0, 0])[0]["headroom"], obs["headroom"])
    assert len(seen) > 2  # budgets where none, some and other numbers of configs fit


def test_two_stage_masks_pin_the_undecided_knobs(world):
    env, _ = _envs(world)
    env.reset(seed=1)
    m = env.action_masks()
    assert m.tolist() == [True] * 3 + [True, False, False, False, False] * 2
    obs, r, done, _, info = env.step([2, 0, 0])
    assert obs["stage"][0] == 1 and obs["tier"].tolist() == [0, 0, 1] and r == 0.0 and not done
    assert obs["kv_mask"].sum() > 16 and obs["position"][0] > 16  # global view and question positions
    assert np.abs(obs["kv"]).sum() > 0
    assert env.action_masks().tolist() == [False, False, True] + [True] * 10
    _, r, done, _, info = env.step([2, 4, 4])
    assert done and info["config"].tier == "high" and info["config"].top_k == 8 and info["config"].blocks == 13


def test_reward_is_score_minus_penalty_and_controller_overhead_counts(world):
    model, table, feats, samples = world
    env, _ = _envs(world, controller_ms=3.0, penalty=Penalty("indicator", 2.0))
    env.reset(seed=3)
    sample, budget = env._sample, env._budget
    env.step([1, 2, 3])
    _, r, _, _, info = env.step([1, 2, 3])
    cfg = env.space.config_index(1, 2, 3)
    latency = float(table.latency[sample, cfg]) + 3.0
    assert info["latency_ms"] == pytest.approx(latency)
    assert info["controller_ms"] == pytest.approx(3.0)
    assert info["violation"] == (latency > budget)
    assert r == pytest.approx(table.score[sample, cfg] - 2.0 * (latency > budget))
    assert set(info["latency_parts"]) >= {"vision", "prefill", "decode", "controller", "total"}


def test_single_stage_pays_the_global_crop_unless_low_tier_reuses_it(world):
    model, table, feats, samples = world
    env, _ = _envs(world, SingleStageKnobEnv, global_ms=5.0)
    env.reset(seed=4)
    s = env._sample
    _, _, _, _, low = env.step([0, 4, 4])
    env.reset(seed=4)
    _, _, _, _, high = env.step([2, 4, 4])
    assert low["latency_ms"] == pytest.approx(table.latency[s, env.space.config_index(0, 4, 4)])
    assert high["latency_ms"] == pytest.approx(table.latency[s, env.space.config_index(2, 4, 4)] + 5.0)
    light, _ = _envs(world, SingleStageKnobEnv, global_ms=1.0, reuse_low=False)  # a light encoder: never reused
    assert (light.added_latency() == 1.0).all()


def test_budgets_follow_the_distribution(world):
    env, _ = _envs(world)
    budgets = [env.reset(seed=i)[1]["budget_ms"] for i in range(200)]
    assert 0.2 * 20 <= min(budgets) and max(budgets) <= 1.2 * 20 and np.std(budgets) > 2


def test_live_features_match_the_cache(world):
    model, table, feats, samples = world
    f = request_features(model, samples[2].image, samples[2].question)
    np.testing.assert_allclose(f.kv["medium"], feats.kv[2, 1], atol=1e-5)
    assert f.position["medium"] == feats.position[2, 1]
    np.testing.assert_allclose(f.prompt, feats.prompt[2], atol=1e-6)


@pytest.mark.parametrize("cls", [TwoStageKnobEnv, SingleStageKnobEnv])
def test_env_checkers_pass(world, cls):
    env, _ = _envs(world, cls)
    gym_check_env(env, skip_render_check=True)
    sb3_check_env(env, warn=True)


def test_bad_penalty():
    with pytest.raises(ValueError, match="unknown penalty"):
        Penalty("quadratic")
    with pytest.raises(ValueError, match="weight"):
        Penalty("indicator", -1)


def test_feature_cache_key_follows_the_weights_not_the_thread_count(tiny):
    import torch

    from envs.features import cache_key

    meta = {"dataset": {"kind": "synthvqa", "seed": 1}}
    threads = torch.get_num_threads()
    try:
        keys = []
        for n in (1, 2):
            torch.set_num_threads(n)
            keys.append(cache_key(tiny, meta))
    finally:
        torch.set_num_threads(threads)
    assert keys[0] == keys[1] and keys[0] != cache_key(tiny, {"dataset": {"kind": "synthvqa", "seed": 2}})
    w = tiny.llm.layers[5].mlp.gate.weight
    with torch.no_grad():
        before = w[0, 0].clone()
        w[0, 0] += 1e-3
        changed = cache_key(tiny, meta)
        w[0, 0] = before
    assert changed != keys[0] and cache_key(tiny, meta) == keys[0]
