"""Latency model, outcome table (sharding, resume after kill -9, bad samples, Ray), oracle and baselines."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from conftest import fake_latency

from envs.budgets import Penalty
from envs.latency import PARTS, ConfigLatency, LatencyModel, median_ms, profile_latency
from envs.oracle import (
    best_static_config,
    expected_scores,
    max_config,
    oracle_configs,
    pareto_front,
    random_feasible_configs,
)
from envs.outcomes import OutcomeTable, build_outcomes, dataset_samples, export_jsonl, read_rows, retime_outcomes
from envs.tasks.data import export_manifest
from envs.tasks.synthvqa import SynthVQA, dataset_spec
from envs.vlm.checkpoint import build_model, save_model
from envs.vlm.evaluate import Config

CONFIGS = [Config("low", 8, 13), Config("low", 1, 5), Config("high", 2, 7), Config("high", 8, 13)]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tiny):
    return str(save_model(tiny, tmp_path_factory.mktemp("m") / "tiny"))


def test_median_ms_times_only_the_calls_after_warm_up(monkeypatch):
    import envs.latency as latency

    clock, calls = iter([0.0, 0.004, 1.0, 1.001, 2.0, 2.009]), []
    monkeypatch.setattr(latency.time, "perf_counter", lambda: next(clock))
    assert median_ms(lambda: calls.append(1), repeats=3, warmup=2) == pytest.approx(4.0)  # of 4, 1, 9 ms
    assert len(calls) == 5


def test_latency_model_recovers_linear_costs():
    rows = [{"crops": c, "prompt_tokens": 20 + 22 * c, "preprocess": {"median_ms": 1 + 0.5 * c},
             "vision": {"median_ms": 2 + 3 * c}, "connector": {"median_ms": 0.1 * c},
             "prefix": {"median_ms": 4 + 0.01 * (20 + 22 * c)}} for c in (1, 5, 10, 13)]  # fmt: skip
    configs = [{"top_k": k, "blocks": 5, "prompt_tokens": t, "prefill_rest": {"median_ms": k + 0.1 * t},
                "decode_per_token": {"median_ms": 2.0 * k}} for k in (1, 8) for t in (40, 130, 300)]  # fmt: skip
    lm = LatencyModel.fit({"stages": rows, "configs": configs})
    assert lm.per_crop["vision"] == pytest.approx((2, 3))
    assert lm.prefill_rest["8|5"] == pytest.approx((8, 0.1))
    p = lm.predict(crops=5, prompt_tokens=130, top_k=8, blocks=5, decode_steps=2, controller_ms=1.5)
    assert p["vision"] == pytest.approx(17) and p["decode"] == pytest.approx(32)
    assert p["prefill"] == pytest.approx(4 + 1.3 + 8 + 13)
    assert p["total"] == pytest.approx(sum(p[k] for k in PARTS))
    with pytest.raises(ValueError, match="no config top_k=3"):
        lm.predict(5, 130, 3, 5, 1)


def test_config_latency_predicts_every_config_as_the_latency_model_does(tiny):
    from conftest import fake_latency

    lm, knobs = LatencyModel.from_dict(fake_latency()), tiny.cfg.knob_lists()
    crops, tokens = [1, 5, 10], [34, 122, 232]
    got = ConfigLatency(lm, knobs, decode_steps=2)(np.array([crops, crops]), np.array([tokens, tokens]))
    assert got.shape == (2, 75)
    expect = [lm.predict(crops[t], tokens[t], k, b, 2)["total"] for t in range(3) for k in knobs["top_k"]
              for b in knobs["blocks"]]  # fmt: skip
    np.testing.assert_allclose(got[1], expect, rtol=1e-12)
    with pytest.raises(ValueError, match="no configs"):
        ConfigLatency(lm, {**knobs, "top_k": [3]})


@pytest.mark.slow
def test_profile_has_every_stage_and_config(tiny):
    prof = profile_latency(tiny, repeats=1, warmup=0, new_tokens=2, progress=False)
    assert len(prof["configs"]) == 75 and len(prof["stages"]) == 12
    crops = {r["tier"]: r["crops"] for r in prof["stages"] if r["image"] == 0}
    assert crops["low"] < crops["medium"] < crops["high"]
    lm = LatencyModel.from_dict(prof["model"])
    assert set(lm.prefill_rest) == {f"{k}|{b}" for k in (1, 2, 4, 6, 8) for b in (5, 7, 9, 11, 13)}


def _dataset(n):
    return dataset_spec(9, n)


@pytest.mark.slow
def test_table_rows_scores_and_latency(model_dir, tmp_path):
    out = build_outcomes(model_dir, _dataset(5), tmp_path / "t", fake_latency(), CONFIGS, shard_size=2,
                         batch_size=3, progress=False)  # fmt: skip
    rows = list(read_rows(out))
    assert [(r["sample"], r["config"]) for r in rows] == [(i, j) for i in range(5) for j in range(4)]
    lm = LatencyModel.from_dict(fake_latency())
    for r in rows:
        p = lm.predict(r["crops"], r["prompt_tokens"], r["top_k"], r["blocks"], r["decode_steps"])
        assert r["latency_ms"]["total"] == pytest.approx(p["total"], abs=1e-3)
        assert 0.0 <= r["score"] <= 1.0
    table = OutcomeTable.load(out)
    assert table.score.shape == (5, 4) and table.ok.all()
    assert (table.latency[:, 3] > table.latency[:, 1]).all()  # full high config costs more than cheap low
    packed = OutcomeTable.load(table.save_npz(tmp_path / "t.npz"))
    assert np.array_equal(packed.score, table.score) and np.array_equal(packed.latency, table.latency)
    assert packed.configs == table.configs and packed.sample_ids == table.sample_ids
    np.testing.assert_allclose(packed.parts, table.parts, rtol=1e-3)
    export = export_jsonl(out, tmp_path / "rows.jsonl").read_text().splitlines()
    assert [json.loads(x)["config"] for x in export[:4]] == [0, 1, 2, 3]


@pytest.mark.slow
def test_retime_applies_another_profile_without_touching_answers(model_dir, tmp_path):
    src = build_outcomes(model_dir, _dataset(5), tmp_path / "t", fake_latency(), CONFIGS, shard_size=2,
                         batch_size=3, progress=False)  # fmt: skip
    slower = fake_latency()
    slower["decode_per_token"] = {kb: 2 * v for kb, v in slower["decode_per_token"].items()}
    out = retime_outcomes(src, tmp_path / "r", slower)
    a, b = OutcomeTable.load(src), OutcomeTable.load(out)
    assert np.array_equal(a.score, b.score) and a.sample_ids == b.sample_ids
    decode = PARTS.index("decode")
    np.testing.assert_allclose(b.parts[..., decode], 2 * a.parts[..., decode], rtol=1e-3)
    np.testing.assert_allclose(b.latency - a.latency, a.parts[..., decode], atol=1e-3)
    assert json.loads((out / "meta.json").read_text())["latency_model"] == json.loads(json.dumps(slower))
    same = OutcomeTable.load(retime_outcomes(src, tmp_path / "same", fake_latency()))
    assert np.array_equal(same.latency, a.latency)
    for taken in (src, out):
        with pytest.raises(ValueError, match="new directory"):
            retime_outcomes(src, taken, slower)
    (src / "shards" / "shard_00001.jsonl").unlink()
    with pytest.raises(ValueError, match="incomplete"):
        retime_outcomes(src, tmp_path / "r2", slower)
    assert not (tmp_path / "r2").exists()  # refused before anything is written


@pytest.mark.parametrize("content", [None, "not json", '{"stages": {}}', "[1, 2]"])
def test_build_outcomes_refuses_a_missing_or_foreign_profile_on_both_paths(content, tmp_path, capsys):
    from scripts.build_outcomes import main

    profile = tmp_path / "profile.json"
    if content is not None:
        profile.write_text(content)
    for argv in (["--seed", "2", "--n", "3"], ["--retime", str(tmp_path / "src")]):
        assert main([*argv, "--out", str(tmp_path / "out"), "--profile", str(profile)]) == 2
        err = capsys.readouterr().err
        assert "error:" in err and str(profile) in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_bad_sample_is_recorded_and_does_not_stop_the_sweep(model_dir, tmp_path):
    path = export_manifest(list(SynthVQA(4, 3)), tmp_path / "data")
    (tmp_path / "data" / "images" / "synthvqa-4-1.png").write_text("broken")
    out = build_outcomes(model_dir, {"kind": "manifest", "path": str(path)}, tmp_path / "t", fake_latency(),
                         CONFIGS, shard_size=10, progress=False)  # fmt: skip
    table = OutcomeTable.load(out)
    assert table.ok.tolist() == [True, False, True]
    failed = [r for r in read_rows(out) if r["status"] == "failed"]
    assert len(failed) == 4 and all("cannot read" in r["reason"] for r in failed)
    assert table.valid().score.shape == (2, 4)


@pytest.mark.slow
def test_resume_after_kill_9_gives_exactly_the_clean_table(model_dir, tmp_path):
    clean = build_outcomes(model_dir, _dataset(8), tmp_path / "clean", fake_latency(), CONFIGS, shard_size=2,
                           progress=False)  # fmt: skip
    killed = tmp_path / "killed"
    code = (
        "import json,sys; from envs.outcomes import build_outcomes; from envs.vlm.evaluate import Config\n"
        f"build_outcomes({model_dir!r}, {_dataset(8)!r}, {str(killed)!r}, json.loads(sys.argv[1]),"
        f" [Config(**c) for c in json.loads(sys.argv[2])], shard_size=2, progress=False)"
    )
    proc = subprocess.Popen([sys.executable, "-c", code, json.dumps(fake_latency()),
                             json.dumps([c.__dict__ for c in CONFIGS])])  # fmt: skip
    deadline = time.time() + 120
    while not list((killed / "shards").glob("shard_*.jsonl")) and time.time() < deadline:
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done_before = len(list((killed / "shards").glob("shard_*.jsonl")))
    assert 1 <= done_before < 4, "the kill should land mid-run"
    (killed / "shards" / ".shard_00003.jsonl.999.tmp").write_text('{"torn')  # a torn write of the dead run
    build_outcomes(model_dir, _dataset(8), killed, fake_latency(), CONFIGS, shard_size=2, progress=False)
    a, b = list(read_rows(clean)), list(read_rows(killed))
    assert a == b
    assert len({(r["sample"], r["config"]) for r in b}) == len(b) == 32
    assert not list((killed / "shards").glob(".*.tmp"))


def test_a_table_for_another_dataset_is_refused(model_dir, tmp_path):
    build_outcomes(model_dir, _dataset(2), tmp_path / "t", fake_latency(), CONFIGS[:1], progress=False)
    with pytest.raises(ValueError, match="another model, dataset"):
        build_outcomes(model_dir, _dataset(3), tmp_path / "t", fake_latency(), CONFIGS[:1], progress=False)


def test_a_table_of_other_weights_or_an_older_generator_is_refused(model_dir, tmp_path):
    import shutil

    weights = shutil.copytree(model_dir, tmp_path / "m")
    build_outcomes(str(weights), _dataset(2), tmp_path / "t", fake_latency(), CONFIGS[:1], progress=False)
    save_model(build_model("tiny", seed=1), weights)  # retrained in place: same path, other weights
    with pytest.raises(ValueError, match="another model"):
        build_outcomes(str(weights), _dataset(2), tmp_path / "t", fake_latency(), CONFIGS[:1], progress=False)
    with pytest.raises(ValueError, match="SynthVQA version 1"):
        dataset_samples({"kind": "synthvqa", "seed": 9, "n": 2})  # a table from before versions were recorded


@pytest.mark.slow
def test_ray_executor_gives_the_same_table(model_dir, tmp_path):
    ray = pytest.importorskip("ray")
    local = build_outcomes(model_dir, _dataset(4), tmp_path / "local", fake_latency(), CONFIGS, shard_size=2,
                           progress=False)  # fmt: skip
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        remote = build_outcomes(model_dir, _dataset(4), tmp_path / "ray", fake_latency(), CONFIGS, shard_size=2,
                                executor="ray", progress=False)  # fmt: skip
    finally:
        ray.shutdown()
    assert list(read_rows(local)) == list(read_rows(remote))


def _table(score, latency):
    score, latency = np.asarray(score, np.float32), np.asarray(latency, np.float32)
    n, c = score.shape
    configs = [Config("high", 8, 13 - j) for j in range(c)]
    return OutcomeTable(configs, [str(i) for i in range(n)], ["f"] * n, np.ones(n, bool), score, score, latency,
                        np.zeros((n, c, len(PARTS)), np.float32), {})  # fmt: skip


def test_oracle_best_fitting_config_ties_to_cheapest_and_falls_back_to_cheapest():
    t = _table([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0], [1.0, 1.0, 1.0]], [[30, 20, 10], [30, 20, 10], [30, 20, 10]])
    assert oracle_configs(t, [25, 25, 5]).tolist() == [1, 2, 2]  # tie -> cheaper; none scores -> cheapest; none fits
    assert oracle_configs(t, [100, 100, 100]).tolist() == [1, 0, 2]


def test_oracle_where_nothing_fits_maximises_reward_under_the_penalty():
    t = _table([[0.0, 1.0, 0.0], [1.0, 1.0, 0.0]], [[30, 20, 10], [30, 20, 10]])
    assert oracle_configs(t, [5, 5]).tolist() == [2, 2]  # no penalty given: the cheapest
    assert oracle_configs(t, [5, 5], Penalty("indicator")).tolist() == [1, 1]  # best score, ties to cheaper
    # relative overshoot at 5 ms: config 1 (score 1, 3x over) beats config 2 (score 0, 1x over) at weight 0.1
    assert oracle_configs(t, [5, 5], Penalty("relative", 1.0)).tolist() == [2, 2]
    assert oracle_configs(t, [5, 5], Penalty("relative", 0.1)).tolist() == [1, 1]
    assert oracle_configs(t, [25, 25], Penalty("indicator")).tolist() == [1, 1]  # something fits: unchanged


def test_expected_scores_average_the_nearest_other_samples():
    """Two clusters of requests: each sample's expected score is its cluster's mean without itself."""
    rng = np.random.default_rng(0)
    features = np.concatenate([rng.normal(0, 0.01, (4, 3)), rng.normal(5, 0.01, (4, 3))])
    score = np.concatenate([rng.integers(0, 2, (4, 2)), rng.integers(0, 2, (4, 2))]).astype(np.float32)
    got = expected_scores(score, features, k=3)
    for i in range(8):
        mates = [j for j in range(8) if j // 4 == i // 4 and j != i]
        np.testing.assert_allclose(got[i], score[mates].mean(0))
    only = expected_scores(score, features, k=3, rows=np.array([0, 1, 2, 3]))  # neighbours from cluster 0 only
    np.testing.assert_allclose(only[5], score[:4][np.argsort(((features[:4] - features[5]) ** 2).sum(1))[:3]].mean(0))
    with pytest.raises(ValueError, match="two samples"):
        expected_scores(score, features, rows=np.array([0]))


@pytest.mark.parametrize("shrink", [0.0, 0.25, 0.5, 1.0])
def test_shrunk_expected_scores_lie_between_the_neighbours_and_the_overall_mean(shrink):
    rng = np.random.default_rng(1)
    features, score = rng.normal(size=(12, 3)), rng.random((12, 5))
    local, overall = expected_scores(score, features, k=4), score.mean(0)
    got = expected_scores(score, features, k=4, shrink=shrink)
    np.testing.assert_allclose(got, overall + shrink * (local - overall))
    if shrink == 0.0:  # every request then gets the same labels: those of the best static config
        np.testing.assert_allclose(got, np.broadcast_to(overall, got.shape))


@pytest.mark.parametrize("shrink", [-0.1, 1.5])
def test_bad_shrink_is_refused(shrink):
    with pytest.raises(ValueError, match=r"shrink must lie in \[0, 1\]"):
        expected_scores(np.zeros((4, 2)), np.zeros((4, 3)), k=2, shrink=shrink)


def test_baselines():
    t = _table([[1, 0.5, 0], [0.5, 0.5, 0.5], [0, 1, 0]], [[30, 20, 10]] * 3)
    assert max_config(t) == 0
    assert best_static_config(t, np.full(3, 100.0)) == 1  # mean scores 0.5, 0.67, 0.17
    assert best_static_config(t, np.full(3, 25.0)) == 1  # config 0 violates every budget
    rng = np.random.default_rng(0)
    picks = np.stack([random_feasible_configs(t, np.full(3, 25.0), rng) for _ in range(200)])
    assert set(np.unique(picks)) == {1, 2}
    assert (random_feasible_configs(t, np.full(3, 1.0), rng) == 2).all()
    r = t.score - Penalty()(t.latency, np.full((3, 1), 25.0))
    assert r[0].tolist() == [0.0, 0.5, 0.0]
    slow_but_right = _table([[1, 0.6, 0]] * 3, [[30, 20, 10]] * 3)
    assert best_static_config(slow_but_right, np.full(3, 25.0)) == 1  # the indicator penalty forbids overshoot
    assert best_static_config(slow_but_right, np.full(3, 25.0), Penalty("relative", 0.1)) == 0  # a mild one allows


def test_pareto_front():
    acc = np.array([0.5, 0.6, 0.4, 0.9, 0.55])
    lat = np.array([10.0, 20.0, 15.0, 40.0, 30.0])
    assert pareto_front(acc, lat).tolist() == [0, 1, 3]
