"""The budget guard: requests no config fits once the controller has run are served a fallback config at once."""

import numpy as np
import pytest
from conftest import _envs

from agents.evaluation import feasible
from envs.budgets import Penalty
from envs.guard import BudgetGuard
from envs.knob_env import SingleStageKnobEnv, TwoStageKnobEnv
from envs.knobs import KnobSpace
from envs.vlm.presets import tiny as tiny_preset

SPACE = KnobSpace.from_config(tiny_preset())  # the knob space of the `world` fixture's model
N_CONFIGS = SPACE.n_configs


def test_guard_fires_only_when_nothing_fits_and_picks_the_best_expected_reward():
    guard = BudgetGuard(np.array([0.1, 0.9, 0.5, 0.7]), ms=0.5)  # the indicator penalty, weight 1
    assert guard.fires(np.array([-0.1, -0.01, -2.0, -1.0])) and not guard.fires(np.array([-1.0, 0.0, -2.0, -3.0]))
    predicted = np.array([1.0, 3.0, 1.2, 2.0])
    assert guard.pick(predicted, 2.6) == 3  # the 0.9 config needs 3.5 ms; 0.7 fits in 2.5
    assert guard.pick(predicted, 3.5) == 1
    assert guard.pick(predicted, 1.75) == 2  # 1.5 and 1.7 fit: the better of 0.1 and 0.5
    assert guard.pick(predicted, 1.2) == 1  # nothing fits: every config pays the same penalty, the best score
    relative = BudgetGuard(guard.scores, ms=0.5, penalty=Penalty("relative", 1.0))
    assert relative.pick(predicted, 1.2) == 2  # 0.5 - 0.42 beats 0.1 - 0.25, 0.9 - 1.92 and 0.7 - 1.08


def test_repair_serves_the_best_expected_config_that_fits_where_the_chosen_one_does_not():
    guard = BudgetGuard(np.array([0.1, 0.9, 0.5, 0.7, 0.3]), ms=0.5)
    headroom = np.array([0.2, -0.1, 0.0, -0.3, 0.5])
    assert guard.repaired(0, headroom) == 0 and guard.repaired(2, headroom) == 2  # they fit: unchanged
    assert guard.repaired(1, headroom) == 2  # 0, 2 and 4 fit: the best of 0.1, 0.5 and 0.3
    assert guard.repaired(3, headroom[3:], first=3) == 4  # only configs 3.. may be served: 4
    assert guard.repaired(1, headroom[:2]) == 0
    assert guard.repaired(1, np.full(5, -1.0)) == 1  # nothing fits: the controller's choice stands
    assert BudgetGuard(guard.scores, ms=0.5, repair=False).repaired(1, headroom) == 1


@pytest.mark.parametrize("cls", [TwoStageKnobEnv, SingleStageKnobEnv])
def test_envs_repair_a_config_that_does_not_fit_within_what_the_policy_can_still_serve(world, cls):
    _, table, _, _ = world
    guard = BudgetGuard(np.linspace(0.0, 1.0, N_CONFIGS), ms=0.05)  # the most expensive configs score best
    env, _ = _envs(world, cls, controller_ms=2.0, guard=guard)
    plain, _ = _envs(world, cls, controller_ms=2.0, guard=BudgetGuard(guard.scores, ms=0.05, repair=False))
    # the dearest config of a tier; two-stage may only repair within it (low: 0..24), single-stage anywhere
    action, allowed = ([0, 4, 4], SPACE.tier_configs(0)) if cls is TwoStageKnobEnv else ([2, 4, 4], slice(0, N_CONFIGS))
    repaired = 0
    for seed in range(80):
        obs, info = env.reset(seed=seed)
        plain.reset(seed=seed)
        room, chosen = obs["headroom"][allowed], allowed.stop - 1
        done = plain_done = False
        while not done:
            obs, reward, done, _, out = env.step(np.array(action))
        while not plain_done:
            _, plain_reward, plain_done, _, plain_out = plain.step(np.array(action))
        assert plain_out["guarded"] or plain_out["config_index"] == chosen
        if out["guarded"] or room[-1] >= 0 or room.max() < 0:  # served as without repair
            assert not out["repaired"] and out["config_index"] == plain_out["config_index"] and reward == plain_reward
            continue
        repaired += 1
        expect = int(np.flatnonzero(room >= 0).max())  # the best expected score that fits
        row = env.backend.valid[env._sample]
        assert out["repaired"] and out["config_index"] == expect  # predicted to fit (decode length may differ)
        assert out["latency_ms"] == pytest.approx(table.latency[row, expect] + env.added_latency()[expect])
        assert reward == pytest.approx(table.score[row, expect] - float(out["violation"]))
    assert 0 < repaired < 80


def test_guard_scores_are_the_tables_mean_scores(world):
    _, table, _, _ = world
    guard = BudgetGuard.from_table(table, 0.02)
    np.testing.assert_allclose(guard.scores, table.valid().score.mean(axis=0))
    assert guard.scores.shape == (N_CONFIGS,) and guard.ms == 0.02


@pytest.mark.parametrize(
    "scores,ms,match",
    [([0.1, np.nan], 0.1, "finite expected score"), ([[0.1]], 0.1, "finite expected score"),
     ([0.1, 0.2], -1.0, ">= 0"), ([0.1, 0.2], np.inf, ">= 0")],
)  # fmt: skip
def test_bad_guards_are_refused(scores, ms, match):
    with pytest.raises(ValueError, match=match):
        BudgetGuard(np.array(scores), ms)


@pytest.mark.parametrize("cls", [TwoStageKnobEnv, SingleStageKnobEnv])
def test_guarded_requests_get_the_fallback_for_the_guards_time_and_others_are_unchanged(world, cls):
    _, table, _, _ = world
    guard = BudgetGuard(np.linspace(0.0, 1.0, N_CONFIGS), ms=0.05, repair=False)  # expensive configs score best
    env, _ = _envs(world, cls, controller_ms=8.0, guard=guard)
    plain, _ = _envs(world, cls, controller_ms=8.0)
    guarded = 0
    for seed in range(80):
        obs, info = env.reset(seed=seed)
        plain_obs, _ = plain.reset(seed=seed)
        np.testing.assert_array_equal(obs["headroom"], plain_obs["headroom"])
        assert info["guarded"] == env.guarded == (obs["headroom"].max() < 0)
        steps, done = 0, False
        while not done:  # the most expensive config, which never fits a guarded request
            obs, reward, done, _, out = env.step(np.array([2, 4, 4]))
            steps += 1
        if env.guarded:
            guarded += 1
            row = env.backend.valid[env._sample]
            expect = guard.pick(env.backend.predicted_latency(env._sample), info["budget_ms"])
            assert steps == 1 and out["guarded"] and out["config_index"] == expect
            assert out["controller_ms"] == pytest.approx(0.05)
            assert out["latency_ms"] == pytest.approx(table.latency[row, expect] + 0.05)
            assert reward == pytest.approx(table.score[row, expect] - float(out["latency_ms"] > info["budget_ms"]))
        else:
            while True:
                _, plain_reward, plain_done, _, plain_out = plain.step(np.array([2, 4, 4]))
                if plain_done:
                    break
            assert reward == plain_reward and out["config_index"] == plain_out["config_index"]
            assert out["controller_ms"] == pytest.approx(8.0) and not out["guarded"]
    assert 0 < guarded < 80  # both kinds of request occur


def test_training_envs_skip_guarded_requests_and_refuse_budgets_the_guard_always_serves(world):
    guard = BudgetGuard(np.zeros(N_CONFIGS), ms=0.05)
    env, _ = _envs(world, controller_ms=8.0, guard=guard, skip_guarded=True)
    assert not any(env.reset(seed=seed)[1]["guarded"] for seed in range(40))
    always, _ = _envs(world, controller_ms=1e6, guard=guard, skip_guarded=True)
    with pytest.raises(ValueError, match="too tight to train on"):
        always.reset(seed=0)


def test_reachable_budgets_count_the_guards_time_not_the_controllers(world):
    _, table, _, _ = world
    guard = BudgetGuard(np.zeros(N_CONFIGS), ms=0.05)
    env, _ = _envs(world, controller_ms=8.0, guard=guard)
    plain, _ = _envs(world, controller_ms=8.0)
    differ = 0
    for seed in range(80):
        env.reset(seed=seed)
        plain.reset(seed=seed)
        cheapest = table.latency[env.backend.valid[env._sample]].min()
        assert feasible(env, with_controller=True) == (cheapest + 0.05 <= env._budget)
        assert feasible(plain, with_controller=True) == (cheapest + 8.0 <= env._budget)
        differ += feasible(env, with_controller=True) != feasible(plain, with_controller=True)
    assert differ > 0


def test_policies_saved_before_repair_existed_load_with_repair_off(tiny):
    import torch

    from policies.networks import SingleStageNet, guard_of, set_guard

    net = SingleStageNet(tiny, "mlp")
    set_guard(net, BudgetGuard(np.linspace(0.0, 1.0, N_CONFIGS), ms=0.1))
    state = net.state_dict()
    assert float(state["guard_repair"]) == 1.0
    del state["guard_repair"]  # as saved before repair existed
    old = SingleStageNet(tiny, "mlp")
    old.load_state_dict(state)  # strict: the missing buffer is supplied
    loaded = guard_of(old)
    assert loaded is not None and not loaded.repair and loaded.ms == pytest.approx(0.1)
    with pytest.raises(RuntimeError, match="Unexpected"):
        old.load_state_dict({**net.state_dict(), "stray": torch.zeros(1)})
