"""Controller networks and their SB3 policies: shapes, masking, save/load, a PPO update."""

import numpy as np
import pytest
import torch
from conftest import _envs
from sb3_contrib import MaskablePPO

from envs.knob_env import SingleStageKnobEnv, TwoStageKnobEnv
from envs.vlm.checkpoint import save_model
from policies.networks import SemanticRouter, Stage1Budget, TwoStageNet
from policies.sb3 import SingleStagePolicy, TwoStagePolicy, decide


@pytest.fixture(scope="module")
def vlm_dir(tiny, tmp_path_factory):
    return str(save_model(tiny, tmp_path_factory.mktemp("vlm") / "m"))


def _obs_batch(env, n=4):
    obs = [env.reset(seed=i)[0] for i in range(n)]
    return {k: torch.as_tensor(np.stack([o[k] for o in obs])) for k in obs[0]}


def test_stage1_option_a_is_about_10k_parameters(tiny):
    n = sum(p.numel() for p in Stage1Budget(96).parameters())
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


def test_semantic_router_routes_to_nearest_centroid():
    prompts = np.concatenate([np.random.default_rng(0).normal(m, 0.01, (20, 4)) for m in (-1, 0, 1)])
    routes = SemanticRouter.fit_routes(prompts, 3)
    r = SemanticRouter(4, routes)
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
