"""The static-shape fast path (envs/vlm/fast.py) gives the plain path's answers, logits and counts."""

import argparse
import json
from pathlib import Path

import pytest
import torch
from conftest import QUESTIONS, load_benchmark

from envs.latency import LatencyModel
from envs.tasks.synthvqa import make_sample
from envs.vlm.checkpoint import build_model, load_model
from envs.vlm.fast import FastPrefixState
from scripts.profile_latency import main as profile_main

ROOT = Path(__file__).resolve().parents[1]
SLOW = pytest.mark.slow


@pytest.fixture
def model():
    m = build_model("tiny", seed=0)
    yield m
    m.use_fast_path(None)


def both_paths(model, images, questions, tier, configs, max_new_tokens=None, ignore_eos=True, **fast):
    """Run the same requests on the plain path, then on the fast path; return both generations."""
    model.use_fast_path(None)
    state = model.prefix(model.prepare(images, questions, tier))
    plain = [model.finish(state, k, b, max_new_tokens, ignore_eos) for k, b in configs]
    model.use_fast_path(**fast)
    state = model.prefix(model.prepare(images, questions, tier))
    assert isinstance(state, FastPrefixState)
    fast_gens = [model.finish(state, k, b, max_new_tokens, ignore_eos) for k, b in configs]
    return plain, fast_gens


def assert_same(plain, fast, atol=1e-5):
    for p, f in zip(plain, fast, strict=True):
        assert p.answers == f.answers and p.token_ids == f.token_ids
        assert p.expert_calls == f.expert_calls and p.expert_calls_by_layer == f.expert_calls_by_layer
        assert p.decode_steps == f.decode_steps and p.layers_run == f.layers_run
        assert len(p.step_logits) == len(f.step_logits)
        for a, b in zip(p.step_logits, f.step_logits, strict=True):
            torch.testing.assert_close(b, a, atol=atol, rtol=0)


@pytest.mark.parametrize("tier", ["low", pytest.param("medium", marks=SLOW), pytest.param("high", marks=SLOW)])
@pytest.mark.parametrize("ignore_eos", [True, pytest.param(False, marks=SLOW)])
def test_fast_path_equals_plain_path(model, images, tier, ignore_eos):
    """Batch of three prompts of different lengths (left padding), two configs from one prefix."""
    plain, fast = both_paths(model, images, QUESTIONS, tier, [(8, 13), (1, 5), (4, 9)], ignore_eos=ignore_eos)
    assert_same(plain, fast)


@pytest.mark.slow
def test_one_phase_per_config_and_bucket_whatever_the_prompt(model, images):
    """Prompts of other lengths in the same bucket replay the same phases (nothing new to capture)."""
    fast = model.use_fast_path(bucket=512)
    for image, question in zip(images, QUESTIONS, strict=True):
        model.finish(model.prefix(model.prepare([image], [question], "medium")), 4, 7, 3, True)
    assert len(fast.buckets) == 1 and sorted(k[0] for k in fast.phases) == ["decode", "prefix", "rest"]
    model.finish(model.prefix(model.prepare([images[0]], [QUESTIONS[0]], "medium")), 2, 7, 3, True)
    assert len(fast.phases) == 5  # a new top-k adds its rest and decode phases


def test_a_later_prefix_invalidates_an_unfinished_state(model, images):
    model.use_fast_path(bucket=512)
    first = model.prefix(model.prepare([images[0]], [QUESTIONS[0]], "low"))
    model.prefix(model.prepare([images[1]], [QUESTIONS[1]], "low"))
    with pytest.raises(RuntimeError, match="overwritten by a later prefix"):
        model.finish(first, 8, 13)


def test_bucket_lengths_and_bad_settings(model):
    fast = model.use_fast_path(bucket=64)
    assert [fast.bucket_len(t) for t in (1, 64, 65, 200)] == [64, 64, 128, 256]
    limit = model.cfg.llm.max_positions - model.cfg.max_new_tokens
    assert fast.bucket_len(limit - 3) == limit  # never past the positions the model has
    with pytest.raises(ValueError, match="CUDA"):
        model.use_fast_path(graphs=True)
    with pytest.raises(ValueError, match="bucket"):
        model.use_fast_path(bucket=0)


def test_training_still_takes_the_plain_path(model, images):
    model.use_fast_path()
    prepared = model.prepare(images[:1], QUESTIONS[:1], "low", answers=["red"], grad=True)
    loss = model.answer_loss(prepared, list(range(16)), 8)
    loss.backward()
    assert model.vit.embeddings.patch_embedding.weight.grad.abs().sum() > 0


@pytest.mark.slow
def test_bfloat16_tolerance():
    """bf16 on CPU: first-token logits within 2% of their largest magnitude; the embedded model's
    first answer token unchanged wherever its margin exceeds twice that bound (an undecided
    yes/no, margin 0.0 in bf16, may flip). Differences come from the padded shapes' reduction order."""
    for model, check_answers in ((build_model("tiny", seed=0), False), (load_model("tiny"), True)):
        model = model.to(torch.bfloat16)
        samples = [make_sample(2, i) for i in range(10)]  # 20 first tokens, enough decided ones to compare
        plain, fast = both_paths(model, [s.image for s in samples], [s.question for s in samples], "medium",
                                 [(8, 13), (2, 7)], max_new_tokens=3)  # fmt: skip
        decided = 0
        for p, f in zip(plain, fast, strict=True):
            first, first_fast = p.step_logits[0].float(), f.step_logits[0].float()
            scale = first.abs().max()
            assert (first - first_fast).abs().max() <= 0.02 * scale
            top2 = first.topk(2, dim=-1).values
            for n, margin in enumerate((top2[:, 0] - top2[:, 1]).tolist()):
                if check_answers and margin > 2 * 0.02 * scale:
                    assert first[n].argmax() == first_fast[n].argmax()
                    decided += 1
        assert decided >= 4 or not check_answers  # the check compares answers, not only logits
        model.use_fast_path(None)


@pytest.mark.slow
def test_compiled_layers_equal_the_plain_path(model, images):
    """torch.compile (inductor) runs on CPU too; one config keeps the compile time short."""
    plain, fast = both_paths(model, images[:2], QUESTIONS[:2], "low", [(4, 7)], max_new_tokens=3, compile_layers=True)
    assert_same(plain, fast, atol=1e-4)


@pytest.mark.slow
def test_profile_script_profiles_both_paths_in_one_run(tmp_path):
    out = tmp_path / "profile.json"
    args = ["--preset", "tiny", "--repeats", "1", "--warmup", "0", "--new-tokens", "2", "--mape-n", "0"]
    assert profile_main([*args, "--fast", "--bucket", "32", "--out", str(out)]) == 0
    prof = json.loads(out.read_text())
    assert prof["meta"]["path"] == "fast" and prof["meta"]["bucket"] == 32 and not prof["meta"]["graphs"]
    assert len(prof["configs"]) == len(prof["plain"]["configs"]) == 75
    LatencyModel.from_dict(prof["model"])  # the environments read the fast path's model
    assert set(prof["speedup"]) == {"vision", "connector", "prefix", "prefill_rest", "decode_per_token",
                                    "reference_full"}  # fmt: skip
    assert all(v > 0 for v in prof["speedup"].values())
    with pytest.raises(SystemExit):
        profile_main([*args, "--compile", "--out", str(out)])
    with pytest.raises(SystemExit):
        profile_main([*args, "--fast", "--bucket", "0", "--out", str(out)])


@pytest.mark.slow
@pytest.mark.parametrize("fast, runs_per_request", [(None, 1), ("eager", 1), ("graphs", 2)])
def test_live_check_times_graph_replays_not_their_capture(model, monkeypatch, fast, runs_per_request):
    """A request's first run on the graph path captures its graphs: the live check times a second run."""
    import scripts.profile_latency as profile_latency
    from envs.latency import timed_answer

    calls = []
    monkeypatch.setattr(profile_latency, "timed_answer", lambda *a, **k: calls.append(a[1:]) or timed_answer(*a, **k))
    if fast is not None:
        model.use_fast_path(32)
        if fast == "graphs":  # a CPU stand-in: phases flagged for graphs, replayed eagerly
            import envs.vlm.fast as fast_module

            model.fast.graphs = True
            monkeypatch.setattr(fast_module.Phase, "__call__", lambda phase: phase.fn())
    profile = profile_latency.profile_path(model, argparse.Namespace(repeats=1, warmup=0, new_tokens=1, mape_n=0))
    result = profile_latency.live_error(model, LatencyModel.from_dict(profile["model"]), n=3)
    assert result["n"] == 3 and len(calls) == 3 * runs_per_request
    assert all(calls[i] == calls[i + 1] for i in range(0, len(calls), runs_per_request) if runs_per_request == 2)


@pytest.mark.slow
def test_device_benchmark_dry_run_on_cpu(tmp_path):
    """benchmarks/fast_path.py is the GPU check; on CPU with the tiny preset it must run end to end."""
    bench = load_benchmark("fast_path.py")
    out = tmp_path / "bench.json"
    assert bench.main(["--preset", "tiny", "--device", "cpu", "--dtype", "float32", "--repeats", "1",
                       "--warmup", "0", "--out", str(out)]) == 0  # fmt: skip
    report = json.loads(out.read_text())
    assert report["equality"]["max_rel_first_logits"] < 1e-5 and report["equality"]["answer_agreement"] == 1.0
    for path in ("plain", "fast"):
        assert set(report["figures"][path]) == set(bench.TARGETS)
        assert [report[path][c]["crops"] for c in ("full_high", "full_medium", "min_low")] == [13, 5, 1]
    assert report["floors"]["decode_floor_ms"] > 0 and report["floors"]["prefill_floor_ms"] > 0


@pytest.mark.slow
def test_kernel_breakdown_dry_run_on_cpu(tmp_path):
    """benchmarks/fast_path_kernels.py profiles each phase's kernels; on CPU its aten ops stand in."""
    out = tmp_path / "kernels.json"
    assert (
        load_benchmark("fast_path_kernels.py").main(
            ["--preset", "tiny", "--device", "cpu", "--dtype", "float32", "--out", str(out)]
        )
        == 0
    )
    report = json.loads(out.read_text())
    assert set(report["configs"]) == {"full_high", "min_low"}
    for rows in report["configs"].values():
        assert set(rows) >= {"prefix", "rest", "decode"}  # vision is a phase only under CUDA graphs
        for phase in ("prefix", "rest", "decode"):
            assert rows[phase]["replay_ms"] > 0 and rows[phase]["busy_ms"] > 0 and rows[phase]["kernels"] > 10
            assert rows[phase]["top"] and all(t["calls"] >= 1 for t in rows[phase]["top"])
    full, cheap = report["configs"]["full_high"], report["configs"]["min_low"]
    assert (full["crops"], cheap["crops"]) == (13, 1)
    assert full["prompt_tokens"] > cheap["prompt_tokens"] and full["decode"]["kernels"] > cheap["decode"]["kernels"]
