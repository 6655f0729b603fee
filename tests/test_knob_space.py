"""The knob space comes from the model's preset: envs, networks, policies and servers follow any space.

`small` is the random tiny model with fewer knob values (top_k 1, 2, 8; blocks 5, 13: 3 x 3 x 2 = 18
configs, unequal sizes so a swapped axis shows), over the columns of the shared outcome table that
those configs are: its replayed outcomes must be exactly the full table's.
"""

import copy
import dataclasses

import numpy as np
import pytest
import torch
from conftest import _envs, fake_latency
from gymnasium import spaces
from gymnasium.utils.env_checker import check_env as gym_check_env
from sb3_contrib import MaskablePPO
from stable_baselines3.common.env_checker import check_env as sb3_check_env

from agents.serving import SingleStageServer, TwoStageServer
from envs.budgets import parse_distribution
from envs.guard import BudgetGuard
from envs.knob_env import LiveBackend, ReplayBackend, SingleStageKnobEnv, TwoStageKnobEnv
from envs.knobs import KnobSpace
from envs.latency import ConfigLatency, LatencyModel
from envs.outcomes import OutcomeTable
from envs.vlm.checkpoint import save_model
from envs.vlm.evaluate import Config, all_configs
from envs.vlm.presets import KnobValues, molmoe_1b, tiny
from policies.networks import SingleStageNet, TwoStageNet, set_guard
from policies.numpy_heads import SingleStageHeads, TwoStageHeads
from policies.sb3 import SingleStagePolicy, TwoStagePolicy, decide

SMALL = {"tier": ["low", "medium", "high"], "top_k": [1, 2, 8], "blocks": [5, 13]}
ENV_KINDS = [TwoStageKnobEnv, SingleStageKnobEnv]


# ------------------------------------------------------------------------------------------ the space
@pytest.mark.parametrize("lists", [tiny().knob_lists(), SMALL, {"tier": ["a"], "top_k": [3], "blocks": [1, 2, 4]}])
def test_config_index_and_knobs_round_trip_in_tier_major_order(lists):
    space = KnobSpace.from_lists(lists)
    assert space.nvec == (len(lists["tier"]), len(lists["top_k"]), len(lists["blocks"]))
    assert space.n_configs == int(np.prod(space.nvec)) and space.n_logits == sum(space.nvec)
    assert space.configs() == [Config(t, k, b) for t in lists["tier"] for k in lists["top_k"] for b in lists["blocks"]]
    for i in range(space.n_configs):
        tier, k, b = space.config_knobs(i)
        assert space.config_index(tier, k, b) == i
        assert space.config(i) == Config(lists["tier"][tier], lists["top_k"][k], lists["blocks"][b])
        assert i in range(space.n_configs)[space.tier_configs(tier)]
    assert KnobSpace.from_lists(space.to_lists()) == space and KnobSpace.of(space) is space
    parts = space.split(np.arange(space.n_logits))
    assert [len(p) for p in parts] == list(space.nvec) and parts[2][-1] == space.n_logits - 1


def test_the_space_is_the_presets():
    assert KnobSpace.from_config(tiny()).nvec == (3, 5, 5) and KnobSpace.from_config(tiny()).n_configs == 75
    big = KnobSpace.from_config(molmoe_1b())
    assert big.top_k == molmoe_1b().knobs.top_k and big.blocks == molmoe_1b().knobs.blocks


def test_bad_spaces_and_indices_are_refused():
    with pytest.raises(ValueError, match="'top_k' needs at least one value and no repeats"):
        KnobSpace.from_lists({**SMALL, "top_k": [2, 2]})
    with pytest.raises(ValueError, match="'blocks' needs"):
        KnobSpace.from_lists({**SMALL, "blocks": []})
    space = KnobSpace.from_lists(SMALL)
    with pytest.raises(IndexError, match=r"outside the space's sizes \(3, 3, 2\)"):
        space.config_index(0, 0, 2)
    with pytest.raises(IndexError, match="outside 0..17"):
        space.config_knobs(18)


# ------------------------------------------------------------------------------------------ a smaller space
@pytest.fixture(scope="module")
def small_world(world):
    """The shared world with the `SMALL` knob space: the same weights and features, the table's matching columns."""
    model, table, feats, samples = world
    small = copy.deepcopy(model)
    small.cfg = dataclasses.replace(model.cfg, knobs=KnobValues(dict(model.cfg.knobs.max_crops), (1, 2, 8), (5, 13)))
    small.cfg.validate()
    space = KnobSpace.from_config(small.cfg)
    cols = [table.configs.index(c) for c in space.configs()]
    sub = OutcomeTable(space.configs(), table.sample_ids, table.families, table.ok, table.score[:, cols],
                       table.exact[:, cols], table.latency[:, cols], table.parts[:, cols], table.meta)  # fmt: skip
    return small, sub, feats, samples, cols


@pytest.fixture(scope="module")
def small_dir(small_world, tmp_path_factory):
    return str(save_model(small_world[0], tmp_path_factory.mktemp("small") / "m"))


@pytest.fixture(params=["tiny", "small"])
def any_world(request):
    """Both worlds, as (world, knob space)."""
    w = request.getfixturevalue("world" if request.param == "tiny" else "small_world")[:4]
    return w, KnobSpace.from_config(w[0].cfg)


@pytest.mark.parametrize("cls", ENV_KINDS)
def test_envs_act_and_observe_in_the_models_knob_space(any_world, cls):
    world, space = any_world
    env, live = _envs(world, cls)
    assert env.space == live.space == space
    assert env.action_space == spaces.MultiDiscrete(space.nvec) == live.action_space
    assert env.observation_space["headroom"].shape == (space.n_configs,)
    if cls is TwoStageKnobEnv:
        assert env.observation_space["tier"].shape == (space.n_tier,)
    obs, _ = env.reset(seed=0)
    assert env.observation_space.contains(obs)
    masks = env.action_masks()
    assert masks.shape == (space.n_logits,)
    tier_mask, k_mask, b_mask = space.split(masks)
    assert tier_mask.all()
    if cls is TwoStageKnobEnv:  # stage 0 pins top_k and blocks to index 0, stage 1 the tier to the chosen one
        assert k_mask.tolist() == [True] + [False] * (space.n_top_k - 1) and b_mask.sum() == 1 and b_mask[0]
        obs, *_ = env.step([space.n_tier - 1, 0, 0])
        assert obs["tier"].tolist() == [0.0] * (space.n_tier - 1) + [1.0]
        tier_mask, k_mask, b_mask = space.split(env.action_masks())
        assert tier_mask.tolist() == [False] * (space.n_tier - 1) + [True] and k_mask.all() and b_mask.all()
    else:
        assert masks.all()


@pytest.mark.parametrize("cls", ENV_KINDS)
def test_a_smaller_space_replays_the_full_tables_outcomes_and_agrees_with_live(world, small_world, cls):
    _, table, _, _, cols = small_world
    env, live = _envs(small_world[:4], cls)
    space = env.space
    rng = np.random.default_rng(0)
    for seed in range(8):
        with_live = seed < 2  # the live model runs each request: a few suffice
        obs, _ = env.reset(seed=seed)
        tier, k, b = (int(rng.integers(n)) for n in space.nvec)
        steps = [[tier, 0, 0], [tier, k, b]] if cls is TwoStageKnobEnv else [[tier, k, b]]
        for action in steps:
            _, reward, done, _, info = env.step(action)
        assert done and info["config_index"] == space.config_index(tier, k, b)
        assert info["config"] == space.config(info["config_index"]) == table.configs[info["config_index"]]
        row = env.backend.valid[env._sample]
        full = cols[info["config_index"]]  # the same config's column in the 75-config table
        assert world[1].configs[full] == info["config"]
        added = env.added_latency()[info["config_index"]]
        assert info["latency_ms"] == pytest.approx(world[1].latency[row, full] + added)
        assert info["score"] == world[1].score[row, full]
        if with_live:
            live_obs, _ = live.reset(seed=seed)
            np.testing.assert_allclose(obs["headroom"], live_obs["headroom"], atol=1e-5)
            for action in steps:
                _, live_reward, _, _, live_info = live.step(action)
            assert live_info["config"] == info["config"] and live_info["score"] == info["score"]
            assert live_reward == pytest.approx(reward, abs=1e-5)


@pytest.mark.parametrize("cls", ENV_KINDS)
def test_env_checkers_pass_on_a_smaller_space(small_world, cls):
    env, _ = _envs(small_world[:4], cls)
    gym_check_env(env, skip_render_check=True)
    sb3_check_env(env, warn=True)


def test_replay_refuses_a_table_of_other_configs(world, small_world):
    model, table, feats, _ = world
    lm = LatencyModel.from_dict(fake_latency())
    small_space = KnobSpace.from_config(small_world[0].cfg)
    with pytest.raises(ValueError, match=r"table's 75 configs are not the knob space's 18 \(tier .* top_k \[1, 2, 8\]"):
        ReplayBackend(table, feats, lm, small_space)
    sub = small_world[1]
    shuffled = dataclasses.replace(sub, configs=sub.configs[::-1])  # the same configs in another order
    with pytest.raises(ValueError, match="in that order"):
        ReplayBackend(shuffled, feats, lm, small_space)
    assert len(ReplayBackend(sub, feats, lm, small_space.to_lists())) == len(sub.sample_ids)  # knob lists do too


def test_config_latency_follows_the_space(small_world):
    lm = LatencyModel.from_dict(fake_latency())
    space = KnobSpace.from_config(small_world[0].cfg)
    crops, tokens = np.array([1, 3, 7]), np.array([40, 90, 150])
    got = ConfigLatency(lm, space)(crops, tokens)
    want = [lm.predict(crops[t], tokens[t], k, b, 1)["total"] for t in range(3) for k in (1, 2, 8) for b in (5, 13)]
    np.testing.assert_allclose(got, want)


# ------------------------------------------------------------------------------------------ policies
@pytest.mark.parametrize("policy,kwargs", [(TwoStagePolicy, {"stage1": "prompt"}), (SingleStagePolicy, {})])
@pytest.mark.parametrize("knobs_from", ["vlm", "kwargs"])
def test_policies_build_act_save_and_load_in_a_smaller_space(small_world, small_dir, vlm_dir, tmp_path, policy,
                                                              kwargs, knobs_from):  # fmt: skip
    """The space comes from the VLM named (its preset) or from `policy_kwargs["knobs"]`; saved, it loads again."""
    cls = TwoStageKnobEnv if policy is TwoStagePolicy else SingleStageKnobEnv
    env, _ = _envs(small_world[:4], cls)
    space = env.space
    vlm = {"vlm": small_dir} if knobs_from == "vlm" else {"vlm": vlm_dir, "knobs": space.to_lists()}
    model = MaskablePPO(policy, env, n_steps=16, batch_size=8, n_epochs=1, seed=0, policy_kwargs={**vlm, **kwargs})
    net = model.policy.mlp_extractor.net
    assert net.space == space and model.policy.mlp_extractor.latent_dim_pi == space.n_logits == 8
    model.learn(16)
    model.save(tmp_path / "p.zip")
    loaded = MaskablePPO.load(tmp_path / "p.zip")
    assert loaded.policy.mlp_extractor.net.space == space and loaded.policy.knobs == space.to_lists()
    for seed in range(4):
        obs, _ = env.reset(seed=seed)
        done = False
        while not done:
            masks = env.action_masks()
            a1, _ = model.predict(obs, action_masks=masks, deterministic=True)
            a2, _ = loaded.predict(obs, action_masks=masks, deterministic=True)
            assert (a1 == a2).all() and (decide(loaded.policy, obs, masks) == a1).all()
            assert all(m[a] for m, a in zip(space.split(masks), a1, strict=True))
            obs, _, done, _, _ = env.step(a1)


def test_a_policy_whose_knobs_do_not_match_the_env_is_refused(small_world, vlm_dir):
    env, _ = _envs(small_world[:4], SingleStageKnobEnv)
    with pytest.raises(ValueError, match=r"does not match the knob space .* pass the environment's knob lists"):
        MaskablePPO(SingleStagePolicy, env, n_steps=16, policy_kwargs={"vlm": vlm_dir})  # the VLM has 75 configs


@pytest.mark.parametrize("stage1", ["budget", "router"])
def test_networks_and_numpy_heads_follow_a_smaller_space(small_world, stage1):
    small, _, feats, _, _ = small_world
    env, _ = _envs(small_world[:4])
    space = env.space
    routes = [feats.prompt[0].tolist(), feats.prompt[1].tolist()] if stage1 == "router" else None
    net = TwoStageNet(small, stage1, routes)
    assert net.space == space and net.stage2.top_k_head.out_features == 3 and net.stage2.blocks_head.out_features == 2
    assert net.added_ms.shape == net.guard_scores.shape == (space.n_configs,)
    heads, close = TwoStageHeads(net), {"atol": 1e-5, "rtol": 1e-5}
    with torch.no_grad():
        for seed in range(4):
            obs, _ = env.reset(seed=seed)
            logits, _ = net({k: torch.as_tensor(v)[None] for k, v in obs.items()})
            assert logits.shape == (1, space.n_logits) and (logits[0, space.n_tier :] == 0).all()
            tier_logits = heads.tier_logits(obs["budget"], obs["headroom"], obs["prompt"])
            torch.testing.assert_close(torch.as_tensor(tier_logits)[None], logits[:, : space.n_tier], **close)
            tier = seed % space.n_tier
            second = {k: torch.as_tensor(v)[None] for k, v in env.step([tier, 0, 0])[0].items()}
            token, room = heads.budget_token(obs["budget"], obs["headroom"], tier)
            assert room.shape == (2 * space.per_tier,)
            torch.testing.assert_close(torch.as_tensor(token)[None], net.stage2.embed(second), **close)
            state = net.stage2.budget_state(second)
            want = net(second)[0]
            torch.testing.assert_close(torch.as_tensor(heads.knob_logits(state[0].numpy(), room))[None],
                                       want[:, space.n_tier :], **close)  # fmt: skip
    single = SingleStageNet(small, "mlp")
    env, _ = _envs(small_world[:4], SingleStageKnobEnv)
    obs, _ = env.reset(seed=0)
    with torch.no_grad():
        want = single({k: torch.as_tensor(v)[None] for k, v in obs.items()})[0]
    assert want.shape == (1, space.n_logits)
    got = SingleStageHeads(single).logits(obs["budget"], obs["headroom"], obs["prompt"], obs["global_view"])
    torch.testing.assert_close(torch.as_tensor(got)[None], want, atol=1e-5, rtol=1e-5)


def test_guard_scores_must_cover_the_policys_configs(small_world):
    net = SingleStageNet(small_world[0], "mlp")
    set_guard(net, BudgetGuard(np.linspace(0.0, 1.0, 18), ms=0.1))
    assert net.guard_scores.shape == (18,)
    with pytest.raises(ValueError, match="guard scores 75 configs, the policy's knob space has 18"):
        set_guard(net, BudgetGuard(np.zeros(75), ms=0.1))


@pytest.mark.parametrize("server", [TwoStageServer, SingleStageServer])
def test_servers_serve_configs_of_the_policys_space_and_refuse_another_vlms(world, small_world, server):
    small, _, _, samples, _ = small_world
    net = (TwoStageNet if server is TwoStageServer else SingleStageNet)(small)
    lm = LatencyModel.from_dict(fake_latency())
    served = server(net, small, 20.0, lm).serve(samples[0].image, samples[0].question, 15.0)
    assert served.config in KnobSpace.from_config(small.cfg).configs()
    with pytest.raises(ValueError, match=r"the policy acts over knobs .*'top_k': \[1, 2, 8\].*the VLM has"):
        server(net, world[0], 20.0, lm)


def test_replay_and_live_backends_report_the_models_shapes(world):
    model, table, feats, samples = world
    lm = LatencyModel.from_dict(fake_latency())
    replay, live = ReplayBackend(table, feats, lm, model.cfg.knob_lists()), LiveBackend(model, samples, lm)
    assert replay.d_model == live.d_model == model.cfg.llm.d_model
    assert replay.kv_shape == live.kv_shape and replay.space == live.space
    assert replay.space.configs() == all_configs(model)
    env = TwoStageKnobEnv(replay, parse_distribution("uniform"), 20.0)
    assert env.observation_space["kv"].shape == live.kv_shape
