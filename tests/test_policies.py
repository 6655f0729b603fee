"""Controller networks and their SB3 policies: shapes, masking, save/load, a PPO update."""

import numpy as np
import pytest
import torch
from conftest import _envs
from sb3_contrib import MaskablePPO

from envs.knob_env import SingleStageKnobEnv, TwoStageKnobEnv
from envs.knobs import KnobSpace
from policies.networks import SemanticRouter, SingleStageNet, Stage1Budget, Stage2Scheduler, TwoStageNet
from policies.numpy_heads import SingleStageHeads, TwoStageHeads
from policies.sb3 import SingleStagePolicy, TwoStagePolicy, decide


def _obs_batch(env, n=4):
    obs = [env.reset(seed=i)[0] for i in range(n)]
    return {k: torch.as_tensor(np.stack([o[k] for o in obs])) for k in obs[0]}


def test_stage1_option_a_is_about_10k_parameters(tiny):
    n = sum(p.numel() for p in Stage1Budget(KnobSpace.from_config(tiny.cfg), 96).parameters())
    assert 5_000 <= n <= 15_000


def test_two_stage_net_routes_by_stage_and_freezes_vlm_layers(world, tiny):
    env, _ = _envs(world)
    net = TwoStageNet(tiny, "prompt")
    first = _obs_batch(env)
    logits, value = net(first)
    assert logits.shape == (4, 13) and value.shape == (4, 1)
    assert (logits[:, 3:] == 0).all() and (logits[:, :3] != 0).any()
    env.reset(seed=0)
    second = env.step([1, 0, 0])[0]
    batch = {k: torch.as_tensor(v)[None] for k, v in second.items()}
    logits, _ = net(batch)
    assert (logits[:, :3] == 0).all() and (logits[:, 3:] != 0).any()
    assert not any(p.requires_grad for p in net.stage2.layers.parameters())
    torch.testing.assert_close(net.stage2.layers[1].mlp.gate.weight, tiny.llm.layers[1].mlp.gate.weight)
    # the budget changes stage-2 decisions: the budget token is read through the VLM layers
    other = dict(batch, budget=batch["budget"] + 1.0)
    assert not torch.allclose(net(batch)[0], net(other)[0])


def test_stage1_reads_each_tiers_best_headroom_and_stage2_only_the_chosen_tiers(world, tiny):
    env, _ = _envs(world)
    net = TwoStageNet(tiny, "budget")
    batch = _obs_batch(env)
    room = batch["headroom"].reshape(4, 3, 25)
    x = net.stage1.inputs(batch)
    assert x.shape == (4, 9)
    torch.testing.assert_close(x[:, 3:6], room.amax(-1))
    assert (x[:, 6:] == (room.amax(-1) >= 0).float()).all()
    env.reset(seed=0)
    second = {k: torch.as_tensor(v)[None] for k, v in env.step([1, 0, 0])[0].items()}
    other_tier, own_tier = second["headroom"].clone(), second["headroom"].clone()
    other_tier[:, :25] += 1.0  # the low tier's configs: not the chosen tier
    own_tier[:, 25:50] += 1.0
    base = net(second)[0]
    torch.testing.assert_close(net(dict(second, headroom=other_tier))[0], base)
    assert not torch.allclose(net(dict(second, headroom=own_tier))[0], base)


def test_semantic_router_routes_to_nearest_centroid():
    prompts = np.concatenate([np.random.default_rng(0).normal(m, 0.01, (20, 4)) for m in (-1, 0, 1)])
    routes = SemanticRouter.fit_routes(prompts, 3)
    r = SemanticRouter(KnobSpace.from_lists({"tier": ["low", "high"], "top_k": [1], "blocks": [2]}), 4, routes)
    ids = r.route(torch.tensor(prompts, dtype=torch.float32)).numpy()
    assert len(set(ids[:20])) == len(set(ids[20:40])) == len(set(ids[40:])) == 1 and len(set(ids)) == 3


@pytest.mark.parametrize("cls,policy,kwargs", [
    (TwoStageKnobEnv, TwoStagePolicy, {"stage1": "budget"}),
    (TwoStageKnobEnv, TwoStagePolicy, {"stage1": "prompt"}),
    (SingleStageKnobEnv, SingleStagePolicy, {"fusion": "mlp"}),
    (SingleStageKnobEnv, SingleStagePolicy, {"fusion": "transformer"}),
])  # fmt: skip
def test_maskable_ppo_learns_saves_and_loads(world, vlm_dir, tmp_path, cls, policy, kwargs):
    env, _ = _envs(world, cls)
    model = MaskablePPO(policy, env, n_steps=16, batch_size=8, n_epochs=1, seed=0,
                        policy_kwargs={"vlm": vlm_dir, **kwargs})  # fmt: skip
    before = [p.detach().clone() for p in model.policy.parameters() if p.requires_grad]
    model.learn(32)
    after = [p for p in model.policy.parameters() if p.requires_grad]
    assert any(not torch.equal(a, b) for a, b in zip(before, after, strict=True))
    model.save(tmp_path / "p.zip")
    loaded = MaskablePPO.load(tmp_path / "p.zip")
    for seed in range(5):
        obs, _ = env.reset(seed=seed)
        while True:
            masks = env.action_masks()
            a1, _ = model.predict(obs, action_masks=masks, deterministic=True)
            a2, _ = loaded.predict(obs, action_masks=masks, deterministic=True)
            assert (a1 == a2).all() and masks[:3][a1[0]] and masks[3:8][a1[1]] and masks[8:][a1[2]]
            assert (decide(loaded.policy, obs, masks) == a1).all()  # the serving path acts the same
            obs, _, done, _, _ = env.step(a1)
            if done:
                break


def test_stage2_reads_the_prefix_cache_exactly_like_recomputing_layers_0_2(tiny, images, questions):
    """With every prompt position exposed, the budget token's state after layer 2 equals running the
    VLM's layers 0-2 over [prompt; budget token]: reusing the prefix cache changes nothing but cost."""
    net = Stage2Scheduler(tiny)
    pre = tiny.preprocess(images[:1], questions[:1], "medium")
    with torch.no_grad():
        prepared = tiny.connect(pre, tiny.encode_vision(pre.pixels()))
        state = tiny.prefix(prepared)
        t = prepared.embeds.shape[1]
        kv = torch.stack([torch.stack(state.cache.layers[i], dim=1) for i in range(3)], dim=1)  # [1, 3, 2, H, T, hd]
        obs = {"budget": torch.tensor([[0.3, -0.2, 0.5]]), "tier": torch.tensor([[0.0, 1.0, 0.0]]), "kv": kv,
               "kv_mask": torch.ones(1, t), "position": torch.tensor([[float(t)]]),
               "headroom": torch.linspace(-1, 1, 75)[None]}  # fmt: skip
        reused = net.budget_state(obs)
        budget = net.embed(obs)[:, None]
        h = torch.cat([prepared.embeds, budget], dim=1)
        valid = torch.ones(1, t + 1, dtype=torch.bool)
        recomputed = tiny._run(range(3), h, tiny._positions(valid), valid, None, 8, [0] * 16)[:, -1]
    torch.testing.assert_close(reused, recomputed, atol=1e-5, rtol=1e-5)
    # masked positions are not read: zeroing them changes nothing
    obs["kv_mask"][:, :5] = 0
    masked = net.budget_state(obs)
    obs["kv"][..., :5, :] = 0
    torch.testing.assert_close(net.budget_state(obs), masked)
    assert not torch.allclose(masked, reused)


def test_stage2_costs_one_token_through_three_layers(world, tiny):
    """The controller never re-runs the prompt: MoE calls see one token per request."""
    env, _ = _envs(world)
    env.reset(seed=0)
    obs = {k: torch.as_tensor(v)[None] for k, v in env.step([2, 0, 0])[0].items()}
    net = Stage2Scheduler(tiny)
    seen = []
    hooks = [
        layer.self_attn.q_proj.register_forward_hook(lambda m, i, o: seen.append(i[0].shape[:-1].numel()))
        for layer in net.layers
    ]
    net(obs)
    for h in hooks:
        h.remove()
    assert seen == [1, 1, 1]  # tokens through layers 0, 1, 2


@pytest.mark.parametrize("stage1", ["budget", "prompt", "router"])
def test_numpy_heads_compute_what_the_torch_network_does(world, tiny, stage1):
    """The server's numpy copies (policies/numpy_heads.py) of stage 1, the token embedding and the heads."""
    env, _ = _envs(world)
    routes = SemanticRouter.fit_routes(world[2].prompt, 3) if stage1 == "router" else None
    net, close = TwoStageNet(tiny, stage1, routes), {"atol": 1e-5, "rtol": 1e-5}
    heads = TwoStageHeads(net)
    with torch.no_grad():
        for seed in range(6):
            obs, _ = env.reset(seed=seed)
            batch = {k: torch.as_tensor(v)[None] for k, v in obs.items()}
            logits = heads.tier_logits(obs["budget"], obs["headroom"], obs["prompt"])
            torch.testing.assert_close(torch.as_tensor(logits)[None], net(batch)[0][:, :3], **close)
            tier = seed % 3
            second = {k: torch.as_tensor(v)[None] for k, v in env.step([tier, 0, 0])[0].items()}
            token, room = heads.budget_token(obs["budget"], obs["headroom"], tier)
            torch.testing.assert_close(torch.as_tensor(token)[None], net.stage2.embed(second), **close)
            state = net.stage2.budget_state(second)
            logits = heads.knob_logits(state[0].numpy(), room)
            torch.testing.assert_close(torch.as_tensor(logits)[None], net(second)[0][:, 3:], **close)


def test_single_stage_numpy_copy_computes_what_the_torch_network_does(world, tiny):
    env, _ = _envs(world, SingleStageKnobEnv)
    net = SingleStageNet(tiny, "mlp")
    heads = SingleStageHeads(net)
    with torch.no_grad():
        for seed in range(4):
            obs, _ = env.reset(seed=seed)
            want = net({k: torch.as_tensor(v)[None] for k, v in obs.items()})[0]
            got = heads.logits(obs["budget"], obs["headroom"], obs["prompt"], obs["global_view"])
            torch.testing.assert_close(torch.as_tensor(got)[None], want, atol=1e-5, rtol=1e-5)
    with pytest.raises(TypeError, match="transformer"):
        SingleStageHeads(SingleStageNet(tiny, "transformer"))
