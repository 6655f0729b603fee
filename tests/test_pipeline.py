"""The main job end to end on a small world, and its bad-input errors."""

import json

import numpy as np
import pytest
import torch
from conftest import _envs, fake_latency

from agents.args import Args
from agents.imitation import collect, oracle_action, oracle_scores
from agents.pipeline import run
from agents.selection import KeepBestOnValidation, gain_threshold
from envs.assets import Assets
from envs.outcomes import OutcomeTable, build_outcomes
from envs.tasks.synthvqa import dataset_spec
from envs.vlm.checkpoint import save_model
from envs.vlm.evaluate import all_configs
from scripts.train_ppo import main as train_main


@pytest.fixture(scope="module")
def assets(tiny, tmp_path_factory):
    """A model directory laid out like the shipped one: profile and train/test/val outcome tables beside it."""
    root = save_model(tiny, tmp_path_factory.mktemp("assets") / "tiny")
    (root / "latency_cpu.json").write_text(json.dumps({"model": fake_latency(), "reference_full_ms": 25.0}))
    (root / "outcomes").mkdir()
    for split, seed in (("train", 30), ("test", 31), ("val", 32)):
        out = build_outcomes(str(root), dataset_spec(seed, 8), root / "tables" / split,
                             fake_latency(), all_configs(tiny), progress=False)  # fmt: skip
        OutcomeTable.load(out).save_npz(root / "outcomes" / f"{split}.npz")
    return root


def small(root, tmp, **kw):
    args = Args(model=str(root), out=tmp, bc_episodes=60, bc_epochs=3, ppo_steps=256, n_envs=2, eval_episodes=30,
                eval_budgets="tight,loose", select_every=128, select_episodes=10, **kw)  # fmt: skip
    return args


@pytest.mark.slow  # the `assets` fixture builds three outcome tables
@pytest.mark.parametrize(
    "policy,variant,encoder", [("two_stage", "budget", "vlm"), ("single_stage", "mlp", "vlm"),
                               ("single_stage", "transformer", "light")]
)  # fmt: skip
def test_main_job_writes_policy_report_and_plots(assets, tmp_path, policy, variant, encoder, monkeypatch):
    monkeypatch.setenv("KNOB_RL_CACHE", str(tmp_path / "cache"))
    out = run(small(assets, tmp_path / "run", policy=policy, variant=variant, encoder=encoder))
    for f in ("policy.zip", "policy_bc.zip", "eval.json", "eval.md", "eval.png", "args.json"):
        assert (out / f).is_file(), f
    report = json.loads((out / "eval.json").read_text())
    assert set(report["results"]) == {"tight", "loose"}
    for block in report["results"].values():
        assert {"ppo", "bc_only", "oracle", "best_static", "max_config", "random_feasible"} <= set(block)
        for name in ("ppo", "oracle", "max_config"):
            assert 0 <= block[name]["accuracy"] <= 1 and 0 <= block[name]["violation_rate"] <= 1
        assert block["oracle"]["violation_rate"] <= block["max_config"]["violation_rate"]
        assert block["ppo"]["controller_ms"] > 0 and block["oracle"]["controller_ms"] == 0
    assert report["meta"]["peak_memory_mb"] > 0 and "PPO - BC mean reward" in (out / "eval.md").read_text()
    for dist, block in report["results"].items():  # paired against the BC start and the best static config
        paired = block["_paired"]
        assert set(paired) == {"ppo - bc_only", "ppo - best_static", "bc_only - best_static"}, dist
        diff = block["ppo"]["mean_reward"] - block["best_static"]["mean_reward"]
        assert paired["ppo - best_static"]["mean"] == pytest.approx(diff) and paired["ppo - best_static"]["se"] >= 0
    assert "ppo - best_static" in (out / "eval.md").read_text()
    sel = report["meta"]["selection"]  # validation checks: the BC start, then every 512 steps (one rollout)
    assert [step for step, *_ in sel["history"]] == [0, 512] and sel["kept_step"] in (0, 512)
    assert sel["validation_requests"] == 8 and sel["min_gain_se"] == pytest.approx(1.96, abs=1e-3)  # 2 checks
    saved = sorted(p.name for p in (out / "checkpoints").iterdir())  # every select_every (128) steps
    assert saved == [f"ppo_{n}_steps.zip" for n in (128, 256, 384, 512)]
    c = report["meta"]["controller"]
    assert report["meta"]["guard_ms"] == c["guard_charged_ms"] and 0 < c["guard_charged_ms"] < c["charged_ms"]
    assert all(0 <= b["ppo"]["guarded_fraction"] <= 1 and b["oracle"]["guarded_fraction"] == 0
               for b in report["results"].values())  # fmt: skip
    assert "budget guard" in (out / "eval.md").read_text()
    if encoder == "vlm":  # the serving path's cost, on the profile's clock
        assert c["charged_ms"] == report["meta"]["controller_ms"] == c["profile_ms"] > 0
        assert c["requests"] == 8 * (6 if policy == "two_stage" else 3)  # 8 train requests, repeated
        assert c["profile_ms"] == pytest.approx(c["total_ms"] / c["machine_speed"])
        assert "on the profile's clock" in (out / "eval.md").read_text()
    else:  # no server for a light encoder: its decisions' wall time
        assert c["charged_ms"] == c["decide_ms"] > 0
    assert list((out / "tb").rglob("events.out.tfevents*"))
    view = report["meta"]["global_view"]
    assert view["reused_at_low_tier"] == (encoder == "vlm") and view["ms"] > 0
    if encoder == "light":
        assert 0 <= view["distillation_relative_error"] < 1


@pytest.mark.slow  # the `assets` fixture builds three outcome tables
def test_oracle_demonstrations_reach_the_oracle_reward(assets, tmp_path, monkeypatch):
    monkeypatch.setenv("KNOB_RL_CACHE", str(tmp_path / "cache"))
    from envs.budgets import Penalty, parse_distribution

    a = Assets(str(assets))
    env = a.env("two_stage", a.train, parse_distribution("uniform"), Penalty(), controller_ms=1.0)
    demos = collect(env, 20, gamma=1.0)
    assert demos.actions.shape == (40, 3) and demos.masks.shape == (40, 13)
    assert (demos.actions[0::2, 1:] == 0).all()  # stage 0 pins top_k and blocks
    assert (demos.actions[0::2, 0] == demos.actions[1::2, 0]).all()
    env.reset(seed=3)
    tier, k, b = oracle_action(env)
    table, row = env.backend.table, env.backend.valid[env._sample]
    lat = table.latency[row] + 1.0
    fits = lat <= env._budget
    cfg = (tier * 5 + k) * 5 + b
    if fits.any():
        assert fits[cfg] and table.score[row, cfg] == table.score[row][fits].max()
    expected = oracle_scores(env.backend, "expected")
    assert expected.shape == table.score.shape and ((expected >= 0) & (expected <= 1)).all()
    tier, k, b = oracle_action(env, expected)
    cfg = (tier * 5 + k) * 5 + b
    if fits.any():  # the best expected score among the configs that fit
        assert fits[cfg] and expected[row, cfg] == expected[row][fits].max()
    with pytest.raises(ValueError, match="unknown oracle"):
        oracle_scores(env.backend, "psychic")


@pytest.mark.parametrize("argv,match", [
    (["--policy", "three_stage"], "unknown policy"),
    (["--policy", "two_stage", "--variant", "mlp"], "unknown two_stage variant"),
])  # fmt: skip
def test_bad_arguments(argv, match, capsys):
    with pytest.raises(SystemExit):
        train_main(argv)
    assert match in capsys.readouterr().err


@pytest.mark.parametrize("argv,guard,quick", [([], True, False), (["--no-guard", "--quick"], False, True)])
def test_boolean_flags_keep_their_defaults_and_can_be_turned_off(argv, guard, quick):
    from scripts.train_ppo import parse

    args = parse(argv)
    assert (args.guard, args.quick) == (guard, quick)


def test_ppo_hyperparameters_and_the_pinned_charge_are_flags():
    from scripts.train_ppo import parse

    args = parse(["--n-steps", "128", "--batch-size", "64", "--n-epochs", "2", "--gamma", "0.9", "--ent-coef", "0.01",
                  "--controller-ms", "1.5"])  # fmt: skip
    assert (args.n_steps, args.batch_size, args.n_epochs, args.gamma, args.ent_coef) == (128, 64, 2, 0.9, 0.01)
    assert args.pinned and args.controller_ms == 1.5 and args.charged_guard_ms() == 1.5  # the guard: the same
    assert parse(["--controller-ms", "1.5", "--guard-ms", "0.25"]).charged_guard_ms() == 0.25
    default = parse([])
    assert not default.pinned and default.controller_ms is None and default.charged_guard_ms() is None
    assert (default.n_steps, default.batch_size, default.n_epochs, default.gamma, default.ent_coef) == (
        256, 256, 4, 1.0, 0.003)  # fmt: skip


@pytest.mark.parametrize("argv,match", [
    (["--guard-ms", "0.2"], "only beside a pinned controller_ms"),
    (["--controller-ms", "-1"], "controller_ms must be >= 0"),
])  # fmt: skip
def test_bad_pinned_charges_are_refused(argv, match, capsys):
    from scripts.train_ppo import parse

    with pytest.raises(SystemExit):
        parse(argv)
    assert match in capsys.readouterr().err


@pytest.mark.parametrize("extra,match", [
    (["--guard-ms", "0.1"], "--guard-ms pins the guard's time only beside --controller-ms"),
    (["--controller-ms", "-2"], "--controller-ms must be >= 0 ms"),
])  # fmt: skip
def test_evaluate_refuses_bad_pinned_charges(extra, match, tmp_path, capsys):
    from scripts.evaluate import main as evaluate_main

    with pytest.raises(SystemExit):
        evaluate_main(["--policy", str(tmp_path / "p.zip"), "--seed", "1", "--out", str(tmp_path / "o.json"), *extra])
    assert match in capsys.readouterr().err


@pytest.mark.slow  # the `assets` fixture builds three outcome tables
def test_bad_budget_distribution_is_reported(assets, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("KNOB_RL_CACHE", str(tmp_path / "cache"))
    code = train_main(["--model", str(assets), "--out", str(tmp_path / "r"), "--train-budgets", "gaussian",
                       "--quick"])  # fmt: skip
    assert code == 2 and "unknown budget distribution 'gaussian'" in capsys.readouterr().err


@pytest.mark.slow  # the `assets` fixture builds three outcome tables
def test_evaluate_and_compare_scripts(assets, tmp_path, monkeypatch, capsys):
    from scripts.compare import main as compare_main
    from scripts.evaluate import main as evaluate_main

    monkeypatch.setenv("KNOB_RL_CACHE", str(tmp_path / "cache"))
    run_dir = run(small(assets, tmp_path / "run"))
    trace = tmp_path / "trace.json"
    trace.write_text(json.dumps([10, 20, 40]))
    out = tmp_path / "ev.json"
    argv = ["--policy", str(run_dir / "policy.zip"), "--budgets", f"tight,trace:{trace}", "--seed", "33", "--n", "4",
            "--episodes", "10", "--out", str(out)]  # fmt: skip
    assert evaluate_main(argv) == 0
    rep = json.loads(out.read_text())
    assert set(rep["results"]) == {"tight", f"trace:{trace}"}
    assert {"policy", "bc_only", "oracle", "best_static"} <= set(rep["results"]["tight"])
    assert list((tmp_path / "cache" / "outcomes").glob("synthvqa-33-4-*/table.npz"))
    assert {"policy - bc_only", "policy - best_static", "bc_only - best_static"} == set(
        rep["results"]["tight"]["_paired"]
    )
    pinned = []  # a pinned charge: two evaluations of one seed agree exactly
    for name in ("p1.json", "p2.json"):
        assert evaluate_main([*argv[:-1], str(tmp_path / name), "--controller-ms", "0.5", "--guard-ms", "0.1"]) == 0
        pinned.append(json.loads((tmp_path / name).read_text()))
    assert pinned[0]["meta"]["controller"] == {"pinned": True, "charged_ms": 0.5, "guard_charged_ms": 0.1}
    untimed = [{**p, "meta": {k: v for k, v in p["meta"].items() if k not in ("minutes", "peak_memory_mb")}}
               for p in pinned]  # fmt: skip
    assert untimed[0] == untimed[1]  # wall time and memory are measured: the only fields allowed to differ
    assert pinned[0]["meta"]["minutes"] > 0 and pinned[0]["meta"]["peak_memory_mb"] > 0
    assert compare_main([str(run_dir), str(run_dir), "--out", str(tmp_path / "cmp")]) == 0
    assert (tmp_path / "cmp" / "compare.png").is_file()
    table = (tmp_path / "cmp" / "compare.md").read_text().splitlines()
    paired = json.loads((run_dir / "eval.json").read_text())["results"]["tight"]["_paired"]["ppo - best_static"]
    tight = next(line for line in table if "| tight |" in line).split(" | ")
    assert tight[8] == f"{paired['mean']:+.3f} ({paired['se']:.3f})"  # the paired margin, beside the static reward
    bad = [*argv[:3], "gaussian", *argv[4:]]
    assert evaluate_main(bad) == 2 and "unknown budget distribution" in capsys.readouterr().err
    (tmp_path / "empty.json").write_text("[]")
    assert evaluate_main([*argv[:3], f"trace:{tmp_path / 'empty.json'}", *argv[4:]]) == 2
    assert evaluate_main(["--policy", str(tmp_path / "nope.zip"), *argv[2:]]) == 2
    assert "policy file not found" in capsys.readouterr().err


def test_violation_rate_counts_only_budgets_the_cheapest_config_fits(world):
    """Always taking each request's cheapest config violates exactly the budgets nothing fits."""
    from agents.evaluation import config_chooser, run_episodes, summarize

    env, _ = _envs(world)
    table, rows = env.backend.table, env.backend.valid
    r = run_episodes(env, config_chooser(lambda e: int(np.argmin(table.latency[rows[e._sample]]))), 80, seed=0)
    s = summarize(r)
    assert 0 < s["feasible_fraction"] < 1  # some budgets are below every config's latency
    assert s["violation_rate_feasible"] == 0.0
    assert s["violation_rate"] == pytest.approx(1 - s["feasible_fraction"])
    # with controller time, budgets within it above the cheapest config are lost, but not unreachable
    env.controller_ms = 3.0
    r = run_episodes(env, config_chooser(lambda e: int(np.argmin(table.latency[rows[e._sample]]))), 80, seed=0)
    s = summarize(r)
    lost = r["feasible"] & ~r["reachable"]
    assert lost.any() and s["violation_rate_reachable"] == 0.0 and s["violation_rate_feasible"] > 0
    assert r["violation"][lost].all()


def test_keep_best_on_validation_restores_the_best_checked_parameters(world, vlm_dir):
    """Scripted validation rewards: the parameters seen at the best check come back at the end."""
    from sb3_contrib import MaskablePPO

    from envs.knob_env import SingleStageKnobEnv
    from policies.sb3 import SingleStagePolicy

    env, _ = _envs(world, SingleStageKnobEnv)
    model = MaskablePPO(SingleStagePolicy, env, n_steps=16, batch_size=8, n_epochs=2, learning_rate=1e-2, seed=0,
                        policy_kwargs={"vlm": vlm_dir})  # fmt: skip
    rewards, snapshots = iter([0.2, 0.1, 0.9, 0.3, 0.5]), []

    def score(m):
        snapshots.append({k: v.clone() for k, v in m.policy.state_dict().items()})
        return next(rewards)

    keep = KeepBestOnValidation(score, every=16)
    model.learn(64, callback=keep)
    assert [step for step, *_ in keep.history] == [0, 16, 32, 48, 64] and keep.best_step == 32
    best, last = snapshots[2], snapshots[-1]
    assert any(not torch.equal(best[k], last[k]) for k in best)  # training moved on after the best check
    for k, v in model.policy.state_dict().items():
        torch.testing.assert_close(v, best[k])


def test_keep_best_on_validation_refuses_checks_below_the_start_on_any_distribution(world, vlm_dir):
    """Per-distribution rewards: the best mean is not kept where it loses to the start on one distribution."""
    from sb3_contrib import MaskablePPO

    from envs.knob_env import SingleStageKnobEnv
    from policies.sb3 import SingleStagePolicy

    env, _ = _envs(world, SingleStageKnobEnv)
    model = MaskablePPO(SingleStagePolicy, env, n_steps=16, batch_size=8, n_epochs=2, learning_rate=1e-2, seed=0,
                        policy_kwargs={"vlm": vlm_dir})  # fmt: skip
    rewards = iter([[0.3, 0.5], [0.9, 0.4], [0.4, 0.6], [0.35, 0.5], [0.2, 0.9]])
    keep = KeepBestOnValidation(lambda m: next(rewards), every=16)
    model.learn(64, callback=keep)
    assert [c for *_, c in keep.history] == [True, False, True, True, False]
    assert keep.best_step == 32 and keep.best == pytest.approx(0.5)


@pytest.mark.parametrize(
    "gain,per_request,replaces", [(0.002, 1, False), (0.05, 1, True), (0.05, 10, False), (0.1, 10, True)]
)
def test_keep_best_on_validation_keeps_the_start_where_the_gain_is_within_paired_noise(
    world, vlm_dir, gain, per_request, replaces
):
    """Per-episode rewards: a check better on every distribution replaces the start only with a gain of at least
    two paired standard errors. Episodes differ by +-0.3: about 0.021 for 800 independent episodes, about 0.068
    when they come 10 at a time from 80 requests that share the sign of their difference."""
    from sb3_contrib import MaskablePPO

    from envs.knob_env import SingleStageKnobEnv
    from policies.sb3 import SingleStagePolicy

    env, _ = _envs(world, SingleStageKnobEnv)
    model = MaskablePPO(SingleStagePolicy, env, n_steps=16, batch_size=8, n_epochs=2, learning_rate=1e-2, seed=0,
                        policy_kwargs={"vlm": vlm_dir})  # fmt: skip
    start = np.random.default_rng(0).random((2, 400))
    requests = np.arange(800).reshape(2, 400) // per_request
    noise = np.where(requests % 2 == 0, 0.3, -0.3)  # zero mean on each distribution
    checks = iter([start, start + noise + gain, start - 0.01])
    keep = KeepBestOnValidation(lambda m: (next(checks), requests), every=16)
    model.learn(32, callback=keep)
    assert [c for *_, c in keep.history] == [True, replaces, False]
    assert keep.best_step == (16 if replaces else 0)
    assert keep.best == pytest.approx(start.mean() + (gain if replaces else 0.0))


@pytest.mark.parametrize("alpha,checks,z", [(0.05, 1, 1.645), (0.05, 2, 1.960), (0.05, 8, 2.498), (0.01, 8, 3.023)])
def test_gain_threshold_splits_alpha_over_the_checks(alpha, checks, z):
    assert gain_threshold(alpha, checks) == pytest.approx(z, abs=1e-3)


@pytest.mark.parametrize("alpha", [0.0, 1.0, -0.1, float("nan")])
def test_select_alpha_outside_the_open_unit_interval_is_refused(alpha):
    with pytest.raises(ValueError, match="select_alpha"):
        Args(select_alpha=alpha)


def test_clustered_standard_error_is_the_plain_one_for_single_episodes_and_grows_with_shared_requests():
    from agents.evaluation import clustered_se

    gain = np.random.default_rng(1).normal(size=1000)
    plain = clustered_se(gain, np.arange(1000))
    assert plain == pytest.approx(gain.std(ddof=1) / np.sqrt(1000))
    shared = np.repeat(gain[:100], 10)  # 100 requests, 10 identical episodes each
    assert clustered_se(shared, np.arange(1000) // 10) == pytest.approx(gain[:100].std(ddof=1) / np.sqrt(100))


def test_paired_differences_pair_episodes_and_refuse_runs_of_other_episodes():
    from agents.evaluation import clustered_se, paired_differences

    rng = np.random.default_rng(2)
    requests = rng.integers(50, size=400)
    static = {"reward": rng.random(400), "request": requests}
    ppo = {"reward": static["reward"] + 0.1 + 0.05 * rng.normal(size=400), "request": requests}
    got = paired_differences({"ppo": ppo, "best_static": static}, [("ppo", "best_static"), ("ppo", "bc_only")])
    assert list(got) == ["ppo - best_static"]  # bc_only did not run: no pair
    gain = ppo["reward"] - static["reward"]
    assert got["ppo - best_static"]["mean"] == pytest.approx(gain.mean())
    assert got["ppo - best_static"]["se"] == pytest.approx(clustered_se(gain, requests))
    assert got["ppo - best_static"]["se"] < 0.01  # paired: the shared episode noise cancels
    other = {"reward": static["reward"], "request": np.roll(requests, 1)}
    with pytest.raises(ValueError, match="different episodes"):
        paired_differences({"ppo": ppo, "best_static": other}, [("ppo", "best_static")])


@pytest.mark.slow  # the `assets` fixture builds three outcome tables
def test_a_backend_over_the_first_requests_replays_them_as_the_whole_table_does(assets, tiny, tmp_path):
    """--quick reads the first validation and test requests only; their features and outcomes are the full
    table's, cached under another key (the dataset spec names the subset)."""
    from envs.knob_env import replay_backend
    from envs.latency import LatencyModel

    latency = LatencyModel.from_dict(fake_latency())
    full = replay_backend(tiny, assets / "outcomes" / "test.npz", latency, cache_dir=tmp_path)
    head = replay_backend(tiny, assets / "outcomes" / "test.npz", latency, cache_dir=tmp_path, first=5)
    assert len(full) == 8 and len(head) == 5 and head.table.meta["dataset"]["n"] == 5
    assert {k: v for k, v in head.table.meta["dataset"].items() if k != "n"} == {
        k: v for k, v in full.table.meta["dataset"].items() if k != "n"
    }
    assert len(list(tmp_path.glob("features-*.npz"))) == 2
    for i in range(5):
        np.testing.assert_array_equal(head.prompt(i), full.prompt(i))
        np.testing.assert_allclose(head.stage2(i, 2)[0], full.stage2(i, 2)[0], atol=1e-5)
        assert head.outcome(i, 74) == full.outcome(i, 74)
    assert (
        replay_backend(tiny, assets / "outcomes" / "test.npz", latency, cache_dir=tmp_path, first=50).table.meta
        == full.table.meta
    )  # more than the table holds: the whole table


@pytest.mark.slow  # the `assets` fixture builds three outcome tables
def test_quick_assets_hold_the_first_200_validation_and_400_test_requests(assets, monkeypatch):
    import envs.assets

    asked, real = {}, envs.assets.replay_backend

    def recording(model, path, latency, first=None):
        asked[path.stem] = first
        return real(model, path, latency, first=first)

    monkeypatch.setattr(envs.assets, "replay_backend", recording)
    quick = Assets(str(assets), quick=True)
    assert asked == {}  # a split is read when first asked for
    assert len(quick.test) == 8 and quick.val is not None and quick.train is not None  # the fixture holds 8
    assert asked == {"train": None, "val": 200, "test": 400}
    asked.clear()
    full = Assets(str(assets))
    assert full.train is not None and full.val is not None and full.test is not None
    assert asked == {"train": None, "val": None, "test": None}
