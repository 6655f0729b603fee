"""Knob-elastic training (a few steps), resuming, and the accuracy report."""

import json

import numpy as np
import pytest
import torch
from conftest import load_benchmark

from diagnostics.eval_vlm import main as eval_main
from envs.tasks.synthvqa import dataset_spec
from envs.vlm.checkpoint import build_model, load_dir, save_model
from envs.vlm.evaluate import Config, accuracy_table, sweep
from training.aids.norm_cap import AnswerNormPenalty
from training.args import TrainArgs
from training.batches import StepMaker, family_mix, sample_knobs, step_inputs
from training.trainer import lr_at, train
from training.vision_probe import VisionProbe


def test_sample_knobs_cover_the_knob_space():
    cfg = build_model("tiny", device="meta").cfg
    args = TrainArgs(p_full=0.2, full_steps=10)
    rng = np.random.default_rng(0)
    assert all(len(sample_knobs(rng, cfg, args, step)[2]) == 16 for step in range(10))  # full config first
    seen = [sample_knobs(rng, cfg, args, 10 + i) for i in range(400)]
    assert {t for t, _, _ in seen} == {"low", "medium", "high"}
    assert {k for _, k, _ in seen} == {1, 2, 4, 6, 8}
    assert {len(layers) - 3 for _, _, layers in seen} == {5, 7, 9, 11, 13}
    for _, _, layers in seen:
        assert layers[:3] == [0, 1, 2] and layers == sorted(set(layers)) and max(layers) <= 15
    subsets = {tuple(layers) for _, _, layers in seen if len(layers) == 8}
    assert len(subsets) > 10  # random subsets, not a fixed ranking
    full = sum(k == 8 and len(layers) == 16 for _, k, layers in seen) / len(seen)
    assert 0.15 < full < 0.35


def test_lr_schedule():
    args = TrainArgs(steps=100, warmup=10, lr=1e-3, min_lr=1e-4)
    assert lr_at(0, args) == pytest.approx(1e-4)
    assert lr_at(9, args) == pytest.approx(1e-3)
    assert lr_at(100, args) == pytest.approx(1e-4)


@pytest.mark.slow
def test_train_resumes_and_ships(tmp_path):
    common = dict(out=tmp_path / "run", batch_size=3, val_every=1000, val_n=5, ranking_n=3, ckpt_every=1)
    train(TrainArgs(steps=2, **common))
    first = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    assert first["step"] == 2
    out = train(TrainArgs(steps=3, ship=tmp_path / "shipped", **common))
    assert torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)["step"] == 3
    model = load_dir(tmp_path / "shipped")
    assert model.ranking.method == "adalora" and sorted(model.ranking.order) == list(range(3, 16))
    shipped_probe = torch.load(tmp_path / "shipped" / "probe.pt", weights_only=True)  # a later --init continues it
    assert all(torch.equal(v, torch.load(out / "probe.pt", weights_only=True)[k]) for k, v in shipped_probe.items())
    assert load_dir(out).cfg.name == "tiny"
    trained = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)["model"]["lm_head.weight"]
    assert not torch.equal(trained, first["model"]["lm_head.weight"])  # the third step changed weights


@pytest.mark.slow
def test_sweep_matches_single_calls(tiny):
    from envs.tasks.synthvqa import SynthVQA

    samples = list(SynthVQA(9, 4))
    configs = [Config("low", 8, 13), Config("high", 1, 5), Config("low", 2, 7)]
    answers, em, vqa = sweep(tiny, samples, configs, batch_size=3, progress=False)
    for j, c in enumerate(configs):
        for i, s in enumerate(samples):
            assert answers[i][j] == tiny.answer([s.image], [s.question], c.tier, c.top_k, c.blocks).answers[0]
    rows = accuracy_table([s.family for s in samples], configs, em)
    assert [r["tier"] for r in rows] == ["low", "high", "low"]
    assert set(rows[0]["by_family"]) == {s.family for s in samples}


@pytest.mark.slow
def test_eval_script_writes_report_and_heat_map(tmp_path):
    out = tmp_path / "eval.json"
    assert eval_main(["--model", "tiny", "--seed", "9", "--n", "5", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert len(report["configs"]) == 75
    assert {"tier", "top_k", "blocks", "accuracy", "by_family"} <= set(report["configs"][0])
    assert all(0 <= r["accuracy"] <= 1 for r in report["configs"])
    assert out.with_suffix(".png").stat().st_size > 10_000


@pytest.mark.slow
def test_eval_from_an_outcome_table_equals_running_the_model(tiny, tmp_path):
    from test_outcomes import fake_latency

    from envs.outcomes import build_outcomes
    from envs.vlm.checkpoint import save_model
    from envs.vlm.evaluate import all_configs

    model_dir = str(save_model(tiny, tmp_path / "m"))
    table = build_outcomes(model_dir, dataset_spec(9, 4), tmp_path / "t", fake_latency(),
                           all_configs(tiny), progress=False)  # fmt: skip
    common = ["--model", model_dir, "--seed", "9", "--n", "4"]
    assert eval_main([*common, "--out", str(tmp_path / "run.json")]) == 0
    assert eval_main([*common, "--out", str(tmp_path / "table.json"), "--outcomes", str(table)]) == 0
    run, from_table = (json.loads((tmp_path / f).read_text())["configs"] for f in ("run.json", "table.json"))
    assert run == from_table
    assert eval_main(["--model", model_dir, "--seed", "8", "--n", "4", "--out", str(tmp_path / "x.json"),
                      "--outcomes", str(table)]) == 2  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize("scenes", ["task", "dense"])
def test_vision_warm_up_trains_vision_and_probe_only(tmp_path, scenes):
    common = dict(out=tmp_path / "run", batch_size=3, val_every=1000, val_n=5, ranking_n=3, ckpt_every=1)
    init = build_model("tiny", seed=0).state_dict()
    train(TrainArgs(steps=1, vision_steps=1, warmup_scenes=scenes, **common))
    state = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    assert set(state["probe"]) >= {"cls.weight", "colour.weight"}
    assert torch.equal(state["model"]["lm_head.weight"], init["lm_head.weight"])  # the LLM did not run
    assert torch.equal(state["model"]["llm.layers.5.mlp.gate.weight"], init["llm.layers.5.mlp.gate.weight"])
    assert not torch.equal(state["model"]["vit.embeddings.patch_embedding.weight"],
                           init["vit.embeddings.patch_embedding.weight"])  # fmt: skip
    assert not torch.equal(state["model"]["connector.projector.w2.weight"], init["connector.projector.w2.weight"])


@pytest.mark.slow
def test_probe_warmup_trains_a_fresh_probe_without_moving_the_vision_encoder(tmp_path):
    common = dict(out=tmp_path / "run", batch_size=3, val_every=1000, val_n=5, ranking_n=3, ckpt_every=1)
    init = build_model("tiny", seed=0).state_dict()
    fresh = VisionProbe(96).state_dict()  # train draws its probe right after the same model
    train(TrainArgs(steps=1, vision_steps=1, probe_warmup=1, dense_aux_batch=2, **common))
    state = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    for name in ("vit.embeddings.patch_embedding.weight", "connector.projector.w2.weight"):
        assert torch.equal(state["model"][name], init[name])  # the probe's gradients stopped at the tokens
    assert not torch.equal(state["probe"]["cls.weight"], fresh["cls.weight"])  # the probe itself learned


@pytest.mark.slow
def test_max_minutes_ends_the_run_early_and_still_ranks_and_saves(tmp_path, capsys):
    common = dict(batch_size=2, val_every=1000, val_n=3, probe_n=2, ranking_n=3, ckpt_every=50)
    out = train(TrainArgs(out=tmp_path / "run", steps=10, warmup=1, max_minutes=1e-9, **common))
    assert (out / "model.safetensors").exists() and (out / "block_ranking.json").exists()
    assert torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)["step"] == 1
    assert "stopped at step 1 of 10" in capsys.readouterr().out
    with pytest.raises(ValueError, match="max_minutes"):
        train(TrainArgs(out=tmp_path / "bad", steps=2, max_minutes=-1))


@pytest.mark.slow
def test_dense_aux_batch_adds_dense_scenes_to_the_joint_vision_loss(tmp_path, monkeypatch):
    import training.batches as train_module

    seen = []
    real = train_module.make_dense_sample
    monkeypatch.setattr(train_module, "make_dense_sample", lambda seed, i: seen.append(i) or real(seed, i))
    common = dict(batch_size=2, val_every=1000, val_n=5, ranking_n=3, ckpt_every=1, full_steps=0)
    train(TrainArgs(out=tmp_path / "a", steps=2, vision_steps=1, dense_aux_batch=3, **common))
    assert seen == [train_module.DENSE_AUX_OFFSET + 3 + i for i in range(3)]  # joint step 1 only, 3 scenes
    seen.clear()
    train(TrainArgs(out=tmp_path / "b", steps=1, **common))
    assert seen == []  # off by default


def test_answer_norm_penalty_reads_only_answer_positions_above_the_cap():
    class Prepared:  # position t predicts token t + 1: answers sit at positions 3-4 of row 0, 4 of row 1
        targets = torch.tensor([[-100, -100, -100, 7, 8], [-100, -100, -100, -100, 9]])

    d = 4
    h = torch.ones(2, 5, d)  # RMS 1 everywhere
    h[0, 2] = 30.0  # predicts row 0's first answer token: RMS 30
    h[1, 0] = 1000.0  # a prompt position: never penalised
    h.requires_grad_(True)
    penalty = AnswerNormPenalty(Prepared(), cap=10.0)
    penalty(0, None, h)
    penalty(1, None, h * 0.1)  # RMS 3 at row 0's position 2: under the cap
    # excesses at the three answer-predicting positions: (30 - 10) / 10 = 2, then 0, 0; layers averaged
    assert penalty.value().item() == pytest.approx((4 / 3 + 0) / 2)
    assert penalty.largest == pytest.approx(30.0)
    penalty.value().backward()
    touched = (h.grad.abs().sum(-1) > 0).nonzero().tolist()
    assert touched == [[0, 2]]


@pytest.mark.slow
def test_reinit_vision_keeps_the_llm_and_restarts_the_vision_encoder(tmp_path):
    src = build_model("tiny", seed=3)
    save_model(src, tmp_path / "src")
    common = dict(out=tmp_path / "run", batch_size=2, val_every=1000, val_n=5, ranking_n=3, ckpt_every=1)
    train(TrainArgs(steps=1, vision_steps=1, init=tmp_path / "src", reinit_vision=True, **common))
    state = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)["model"]
    fresh = build_model("tiny", seed=0).state_dict()
    assert torch.equal(state["lm_head.weight"], src.state_dict()["lm_head.weight"].float())
    w = "vit.encoder.layers.1.mlp.fc1.weight"  # one warm-up step from the fresh weights, far from the source's
    assert (state[w] - fresh[w]).abs().max() < 0.01 < (state[w] - src.state_dict()[w]).abs().max()


@pytest.mark.parametrize(
    "argv",
    [
        ["--vision-steps", "5", "--aux-weight", "0"],
        ["--reinit-vision"],
        ["--steps", "0"],
        ["--warmup-scenes", "mnist"],
        ["--dense-aux-batch", "-1"],
        ["--dense-aux-batch", "4", "--aux-weight", "0"],
        ["--complement-pairs", "some"],
        ["--norm-cap", "-1"],
        ["--family-weights", "1", "1", "-1", "1", "1"],
        ["--family-weights", "0", "0", "0", "0", "0"],
        ["--family-weights", "1", "1"],
        ["--steps", "10", "--stop-at", "11"],
        ["--workers", "-1"],
        ["--attn-layers", "2", "16"],
        ["--attn-head", "4"],
        ["--attn-weight", "-0.1"],
    ],
)
def test_train_vlm_refuses_contradictory_flags(argv, capsys):
    from training.cli import parse

    with pytest.raises(SystemExit):
        parse(argv)
    assert "error:" in capsys.readouterr().err


def test_train_vlm_reads_guided_layers_as_a_tuple():
    from training.cli import parse

    args = parse(["--attn-weight", "0.3", "--attn-layers", "2", "7", "--attn-head", "0"])
    assert (args.attn_weight, args.attn_layers, args.attn_head) == (0.3, (2, 7), 0)
    assert parse([]).attn_layers == (2,) and parse([]).attn_weight == 0.0


@pytest.mark.slow
def test_family_mix_draws_families_by_weight_and_keeps_the_cycle_when_equal():
    from collections import Counter

    from envs.tasks.synthvqa import FAMILIES, make_sample

    assert family_mix((2.0,) * len(FAMILIES)) is make_sample  # a balanced batch, as every split has
    make = family_mix((1.0, 0.0, 3.0, 0.0, 0.0))  # colour : glyph = 1 : 3, nothing else
    drawn = Counter(make(0, i).family for i in range(800))
    assert set(drawn) == {"colour", "glyph"} and 0.70 < drawn["glyph"] / 800 < 0.80
    assert make(0, 5).question == make(0, 5).question  # a pure function of (seed, index)
    only = family_mix((0.0, 0.0, 0.0, 0.0, 1.0))
    assert {only(3, i).family for i in range(20)} == {"sum"}
    for bad in ((1.0, 1.0), (1.0, -1.0, 1.0, 1.0, 1.0), (0.0,) * 5):
        with pytest.raises(ValueError, match="family_weights"):
            family_mix(bad)


@pytest.mark.slow
def test_stop_at_ends_early_on_the_full_schedule_and_saves(tmp_path):
    common = dict(batch_size=2, val_every=1000, val_n=3, probe_n=2, ranking_n=3, ckpt_every=50)
    out = train(TrainArgs(out=tmp_path / "run", steps=10, stop_at=2, warmup=1, **common))
    assert (out / "model.safetensors").exists()
    assert torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)["step"] == 2
    args = TrainArgs(steps=10, warmup=1)
    assert lr_at(1, args) > lr_at(2, TrainArgs(steps=2, warmup=1))  # the schedule spans all 10 steps
    with pytest.raises(ValueError, match="stop_at"):
        train(TrainArgs(out=tmp_path / "bad", steps=2, stop_at=3))


def test_train_refuses_an_unknown_complement_rule(tmp_path):
    with pytest.raises(ValueError, match="complement_pairs"):
        train(TrainArgs(out=tmp_path / "run", steps=1, complement_pairs="some"))


@pytest.mark.slow
def test_answer_state_reports_every_family_and_no_spread_over_one_repeated_scene(tiny, monkeypatch, capsys, tmp_path):
    import diagnostics.answer_state as answer_state
    from envs.tasks.synthvqa import FAMILIES, make_sample

    out = answer_state.main(["--n", "3", "--tier", "low", "--json"])
    assert set(out) == set(FAMILIES) and set(json.loads(capsys.readouterr().out)) == set(FAMILIES)
    assert all(len(s["rms"]) == len(s["spread"]) == 16 and min(s["rms"]) > 0 for s in out.values())
    assert all(max(s["spread"]) > 1e-4 for s in out.values())  # three different scenes
    monkeypatch.setattr(answer_state, "make_sample", lambda seed, i, fam: make_sample(seed, 0, fam))
    same = answer_state.answer_state(tiny, "colour", 3, "low")
    assert max(same["spread"]) < 1e-5
    for argv in (["--n", "1"], ["--model", str(tmp_path / "none")], ["--checkpoint", str(tmp_path / "none.pt")]):
        with pytest.raises(SystemExit):
            answer_state.main(argv)
        assert "error:" in capsys.readouterr().err
    torch.save({"model": {"lm_head.weight": torch.zeros(2, 2)}}, tmp_path / "other.pt")
    with pytest.raises(SystemExit):
        answer_state.main(["--checkpoint", str(tmp_path / "other.pt")])
    assert "not a train_vlm.py checkpoint" in capsys.readouterr().err


@pytest.mark.slow
def test_a_run_from_init_continues_the_vision_probe_of_the_run_that_made_it(tmp_path, capsys):
    from training.vision_probe import PROBE_FILE, load_probe

    common = dict(batch_size=2, val_every=1000, val_n=5, ranking_n=3, ckpt_every=1)
    first = train(TrainArgs(out=tmp_path / "a", steps=1, **common))
    saved = torch.load(first / PROBE_FILE, weights_only=True)
    assert saved.keys() == torch.load(tmp_path / "a" / "checkpoint.pt", weights_only=True)["probe"].keys()
    fresh = VisionProbe(96).state_dict()
    probe = VisionProbe(96)
    load_probe(probe, first)
    assert all(torch.equal(probe.state_dict()[k], saved[k]) for k in saved)
    assert not torch.equal(saved["cls.weight"], fresh["cls.weight"])
    (first / PROBE_FILE).unlink()  # models saved before probe.pt: the run's checkpoint beside the model
    probe = VisionProbe(96)
    load_probe(probe, first)
    assert all(torch.equal(probe.state_dict()[k], saved[k]) for k in saved)
    train(TrainArgs(out=tmp_path / "b", steps=1, init=first, **common))
    assert f"vision probe continued from {tmp_path / 'a' / 'checkpoint.pt'}" in capsys.readouterr().out
    train(TrainArgs(out=tmp_path / "fresh", steps=1, init=first, fresh_probe=True, **common))
    assert "vision probe continued" not in capsys.readouterr().out  # --fresh-probe: started afresh
    src = build_model("tiny", seed=3)
    save_model(src, tmp_path / "src")
    train(TrainArgs(out=tmp_path / "c", steps=1, init=tmp_path / "src", **common))
    assert "starts afresh" in capsys.readouterr().out


@pytest.mark.slow
def test_compare_models_reports_each_model_on_its_configs_and_refuses_a_missing_one(tmp_path):
    from diagnostics.compare_models import comparison_configs
    from diagnostics.compare_models import main as compare_main

    out = tmp_path / "compare.json"
    result = compare_main(["--seed", "9", "--n", "5", "--models", "tiny", "--out", str(out)])
    assert json.loads(out.read_text()) == result and list(result["models"]) == ["tiny"]
    rows = result["models"]["tiny"]
    configs = comparison_configs(build_model("tiny", device="meta").cfg.knob_lists())
    assert [(c.tier, c.top_k, c.blocks) for c in configs] == [
        ("high", 8, 13), ("high", 1, 11), ("high", 8, 5), ("medium", 8, 13), ("low", 8, 13), ("low", 1, 5)
    ]  # fmt: skip
    assert [(r["tier"], r["top_k"], r["blocks"]) for r in rows] == [(c.tier, c.top_k, c.blocks) for c in configs]
    assert all(0 <= r["accuracy"] <= 1 for r in rows)
    with pytest.raises(SystemExit, match="model directory not found"):
        compare_main(["--n", "5", "--models", str(tmp_path / "missing")])


def test_worker_processes_make_the_same_step_inputs_as_the_loop():
    """`--workers` moves rendering and cropping into a DataLoader; the steps it yields are the ones made inline."""
    model = build_model("tiny", device="meta")
    args = TrainArgs(batch_size=4, full_steps=0, p_full=0.3, dense_aux_batch=2, complement_pairs="easy", steps=20)
    maker = StepMaker(args, model.cfg, model.tokenizer)
    inline, loaded = list(step_inputs(maker, 3, 9, workers=0)), list(step_inputs(maker, 3, 9, workers=2))
    assert len(inline) == len(loaded) == 6
    assert len({a.tier for a in inline}) > 1  # the knobs change from step to step
    for a, b in zip(inline, loaded, strict=True):
        assert (a.tier, a.top_k, a.layers) == (b.tier, b.top_k, b.layers)
        assert a.pre.token_ids == b.pre.token_ids and torch.equal(a.pre.pixels(), b.pre.pixels())
        assert all(
            np.array_equal(x, y) for x, y in zip(a.targets + a.dense_targets, b.targets + b.dense_targets, strict=True)
        )
        assert len(a.pre.token_ids) == 4 and len(a.dense_pre.token_ids) == 2
        assert a.pre.answer_lengths[0] > 0 and a.dense_pre.answer_lengths == [0, 0]  # answers only for task scenes


@pytest.mark.slow
def test_training_with_workers_gives_the_same_weights(tmp_path):
    """Bit-identical on one thread (with more, CPU training is not bit-reproducible from run to run)."""
    common = dict(batch_size=2, val_every=1000, val_n=5, ranking_n=3, ckpt_every=1, full_steps=0, dense_aux_batch=1)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train(TrainArgs(out=tmp_path / "inline", steps=2, **common))
        train(TrainArgs(out=tmp_path / "workers", steps=2, workers=1, **common))
    finally:
        torch.set_num_threads(threads)
    a, b = (torch.load(tmp_path / run / "checkpoint.pt", weights_only=True)["model"] for run in ("inline", "workers"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(ValueError, match="workers"):
        train(TrainArgs(out=tmp_path / "bad", steps=1, workers=-1))


@pytest.mark.slow
def test_train_inputs_benchmark_times_every_tier_and_worker_count(tmp_path, capsys):
    out = tmp_path / "inputs.json"
    load_benchmark("train_inputs.py").main(["--repeats", "1", "--workers", "0", "1", "--steps", "2", "--out", str(out)])
    report = json.loads(out.read_text())
    assert [r["tier"] for r in report["tiers"]] == ["low", "medium", "high"]
    assert all(r["ms_per_step"] > 0 for r in report["tiers"])
    assert [r["workers"] for r in report["rates"]] == [0, 1] and all(r["steps_per_s"] > 0 for r in report["rates"])
    assert "| high |" in capsys.readouterr().out


def test_family_errors_counts_confusions_signed_errors_and_yes_bias():
    from diagnostics.error_report import family_errors

    e = family_errors(["6", "6", "2", "3", "3"], ["5", "5", "1", "3", "blue"])
    assert e["n"] == 5 and e["accuracy"] == pytest.approx(0.2)
    assert e["confusions"][0] == ["6", "5", 2]  # the most frequent confusion first
    assert e["signed_error"] == {"-1": 3} and e["not_a_number"] == 1
    assert family_errors(["3"], ["four"])["signed_error"] == {"1": 1}  # "four" normalises to 4
    assert e["accuracy_by_truth"] == {"2": [0.0, 1], "3": [0.5, 2], "6": [0.0, 2]}  # numeric order
    yn = family_errors(["no", "no", "no", "yes"], ["yes", "Yes", "no", "yes"])  # answers are normalised
    assert yn["accuracy"] == 0.5 and yn["yes_rate"] == 0.75
    assert yn["false_yes"] == pytest.approx(2 / 3) and yn["false_no"] == 0.0
    assert "signed_error" not in yn and "yes_rate" not in e
    with pytest.raises(ValueError, match="no answers"):
        family_errors([], [])


def test_accuracy_by_kind_keeps_the_kinds_order_and_normalises():
    from diagnostics.error_report import accuracy_by_kind

    got = accuracy_by_kind(["shape elsewhere", "present", "shape elsewhere"], ["no", "yes", "no"], ["yes", "Yes", "no"])
    assert list(got) == ["present", "shape elsewhere"] and got["present"] == [1.0, 1]
    assert got["shape elsewhere"] == [0.5, 2]


@pytest.mark.slow
def test_error_report_covers_every_family_per_config_and_refuses_bad_configs(tmp_path, capsys):
    from diagnostics.error_report import main as errors_main

    out = tmp_path / "errors.json"
    report = errors_main(["--seed", "9", "--n", "10", "--configs", "high/8/13", "low/1/5", "--out", str(out)])
    assert json.loads(out.read_text()) == report
    from envs.tasks.synthvqa import SynthVQA, complement

    asked = [complement(s, "attribute") for s in SynthVQA(9, 10) if s.family == "presence"]
    colour_questions = sum(c.question.startswith("what colour is the small") for c in asked)
    assert colour_questions >= 1  # else the small-colour table below is not exercised
    # five families, the presence row and the small-colour row
    assert out.with_suffix(".md").read_text().count("| high/8/13 |") == 7
    assert [(c["tier"], c["top_k"], c["blocks"]) for c in report["configs"]] == [("high", 8, 13), ("low", 1, 5)]
    for cfg in report["configs"]:
        assert sorted(cfg["by_family"]) == ["colour", "count", "glyph", "presence", "sum"]
        assert sum(e["n"] for e in cfg["by_family"].values()) == 10
        kinds, presence = cfg["presence_by_kind"], cfg["by_family"]["presence"]
        assert sum(n for _, n in kinds.values()) == presence["n"] == 2
        assert sum(a * n for a, n in kinds.values()) / 2 == pytest.approx(presence["accuracy"])
        acc, n = cfg["small_colour"]
        assert n == colour_questions and acc * n == pytest.approx(round(acc * n))
    assert "| high/8/13 | colour |" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="top_k=3 is not offered"):
        errors_main(["--seed", "9", "--n", "2", "--configs", "high/3/13"])
    with pytest.raises(SystemExit):
        errors_main(["--seed", "9", "--configs", "high-8-13"])
