"""Preprocessing, bad input, block rankings and the answer CLI."""

import dataclasses
import json

import numpy as np
import pytest
import torch
from conftest import load_benchmark, random_image
from PIL import Image

from envs.vlm.crops import make_crops, select_tiling
from envs.vlm.errors import InputError, KnobError
from envs.vlm.presets import get_preset
from envs.vlm.ranking import BlockRanking, compute_ranking
from scripts.answer import main as answer_main


@pytest.mark.parametrize(
    "h,w,max_crops,expected",
    [
        (100, 100, 4, (2, 2)),  # no tiling covers it: (2, 2) shrinks least
        (48, 48, 4, (1, 1)),  # fits one crop window at native size
        (48, 150, 4, (1, 4)),  # wide image: one row of four
        (480, 480, 12, (3, 3)),  # too big for any tiling: shrink least, fewest crops on ties
        (96, 144, 12, (2, 3)),  # exact cover
    ],
)
def test_select_tiling(h, w, max_crops, expected):
    assert select_tiling(h, w, 48, max_crops) == expected


@pytest.mark.parametrize("h,w", [(160, 160), (100, 220), (300, 50), (64, 64), (20, 900)])
def test_request_shapes_are_what_preprocess_makes_at_every_tier(tiny, h, w):
    image, question = random_image(h, w), "which letter is in the top left corner?"
    crops, tokens = tiny.request_shapes(image, question)
    for tier, c, t in zip(("low", "medium", "high"), crops, tokens, strict=True):
        pre = tiny.preprocess([image], [question], tier)
        assert (c, t) == (pre.crops[0].n_crops, len(pre.token_ids[0]))
    assert crops[0] == 1 and crops[0] <= crops[1] <= crops[2]


def test_crops_overlap_and_mark_padding():
    cfg = get_preset("tiny").vision
    img = random_image(60, 200, 0)  # wide: the global view is padded top and bottom
    crops = make_crops(img, 12, cfg)
    rows, cols = crops.tiling
    assert crops.n_crops == 1 + rows * cols and rows * cols <= 12
    assert crops.pixels.shape == (crops.n_crops, 3, 64, 64)
    glob = crops.patch_mask[0]
    assert glob[0].max() < 1 and glob[4].min() == 1  # padded rows at the top, image in the middle
    # neighbouring crops overlap by 2 margins (16 px): the right edge of crop (0,0) is the left of (0,1)
    if cols > 1:
        np.testing.assert_allclose(crops.pixels[1][:, :, 48:], crops.pixels[2][:, :, :16])


def test_unreadable_and_missing_images(tiny, tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_text("not an image")
    with pytest.raises(InputError, match="cannot read"):
        tiny.prepare([bad], ["q?"], "low")
    with pytest.raises(InputError, match="not found"):
        tiny.prepare([tmp_path / "missing.png"], ["q?"], "low")
    with pytest.raises(InputError, match="unsupported image type"):
        tiny.prepare([42], ["q?"], "low")


def test_image_file_path_equals_array(tiny, tmp_path):
    img = random_image(80, 90, 5)
    Image.fromarray(img).save(tmp_path / "x.png")
    a = tiny.prepare([tmp_path / "x.png"], ["what?"], "medium")
    b = tiny.prepare([img], ["what?"], "medium")
    assert torch.equal(a.embeds, b.embeds)


@pytest.mark.parametrize("question", ["", "   ", None])
def test_empty_question(tiny, question):
    with pytest.raises(InputError, match="question is empty"):
        tiny.prepare([random_image(32, 32)], [question], "low")


@pytest.mark.parametrize(
    "knobs,match",
    [
        (("huge", 8, 13), "unknown tier 'huge'"),
        (("low", 3, 13), r"top_k=3 is not offered.*\[1, 2, 4, 6, 8\]"),
        (("low", 8, 12), r"blocks=12 is not offered.*\[5, 7, 9, 11, 13\]"),
        (("low", 0, 13), "top_k=0"),
    ],
)
def test_knob_values_outside_the_preset(tiny, knobs, match):
    with pytest.raises(KnobError, match=match):
        tiny.answer([random_image(32, 32)], ["q?"], *knobs)


def test_mismatched_batch(tiny):
    with pytest.raises(InputError, match="as many images as questions"):
        tiny.prepare([random_image(32, 32)], ["a?", "b?"], "low")


def _calibration(n=4):
    return [(random_image(64 + 8 * i, 80, i), "what colour is the largest shape?", "red") for i in range(n)]


@pytest.mark.parametrize(
    "method", ["adalora", "block_influence", pytest.param("leave_one_out", marks=pytest.mark.slow)]
)
def test_rankings_are_permutations_that_record_their_method(tiny, method):
    r = compute_ranking(tiny, method, _calibration(), tier="low", batch_size=2)
    assert r.method == method and sorted(r.order) == list(range(3, 16))
    assert "4 samples at tier low" in r.calibration
    assert all(r.scores[a] >= r.scores[b] for a, b in zip(r.order, r.order[1:], strict=False))


@pytest.mark.parametrize("method", ["adalora", "block_influence"])
def test_a_block_that_does_nothing_ranks_last(method):
    from envs.vlm.checkpoint import build_model

    model = build_model("tiny", seed=1)
    dead = 9  # zeroed output projections: the block is the identity, with zero sensitivity
    with torch.no_grad():
        model.llm.layers[dead].self_attn.o_proj.weight.zero_()
        model.llm.layers[dead].mlp.experts.down_proj.zero_()
    r = compute_ranking(model, method, _calibration(), tier="low", batch_size=2)
    assert r.order[-1] == dead
    assert r.scores[dead] == pytest.approx(0.0, abs=1e-6)


def test_ranking_save_load(tmp_path):
    r = BlockRanking.from_scores("block_influence", {i: float(i % 5) for i in range(3, 16)}, "test")
    r.save(tmp_path / "r.json")
    assert BlockRanking.load(tmp_path / "r.json", 16) == r


def test_unknown_ranking_method(tiny):
    with pytest.raises(ValueError, match="unknown ranking method"):
        compute_ranking(tiny, "magic", _calibration())


@pytest.mark.slow
def test_answer_cli_json(tmp_path, capsys):
    Image.fromarray(random_image(120, 160, 7)).save(tmp_path / "img.png")
    common = ["--model", "tiny", "--image", str(tmp_path / "img.png"), "--question", "what colour?", "--json"]
    costs = {}
    for tier, k, b in [("low", 1, 5), ("high", 8, 13)]:
        assert answer_main([*common, "--tier", tier, "--top-k", str(k), "--blocks", str(b)]) == 0
        out = json.loads(capsys.readouterr().out)
        assert set(out) >= {"answer", "vision_tokens", "layers_run", "expert_calls", "latency_ms"}
        assert set(out["latency_ms"]) >= {"vision", "prefill", "decode", "total"}
        assert len(out["layers_run"]) == 3 + b
        costs[tier] = out
    assert costs["low"]["vision_tokens"] < costs["high"]["vision_tokens"]
    assert costs["low"]["expert_calls"] < costs["high"]["expert_calls"]
    assert answer_main(["--model", "tiny", "--list-knobs"]) == 0
    assert json.loads(capsys.readouterr().out) == {
        "tier": ["low", "medium", "high"],
        "max_crops": {"low": 0, "medium": 4, "high": 12},
        "top_k": [1, 2, 4, 6, 8],
        "blocks": [5, 7, 9, 11, 13],
    }


def test_answer_cli_bad_input_exits_2(tmp_path, capsys):
    (tmp_path / "bad.png").write_text("nope")
    assert answer_main(["--model", "tiny", "--image", str(tmp_path / "bad.png"), "--question", "q"]) == 2
    assert "cannot read" in capsys.readouterr().err


def test_uint8_crops_give_the_float_paths_pixels_exactly(tmp_path):
    """make_crops normalises uint8 views by table lookup: bit-identical to the float reference path
    (benchmarks/preprocess.py holds that path; its run asserts equality on random sizes and every tier)."""
    bench = load_benchmark("preprocess.py")
    out = tmp_path / "pre.json"
    assert bench.main(["--preset", "tiny", "--repeats", "1", "--random-images", "8", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert [r["views"] for r in report["tiers"]] == [1, 5, 13]
    rng = np.random.default_rng(5)
    for preset in ("tiny", "molmoe-1b"):
        cfg = dataclasses.replace(get_preset(preset).vision, layout="per_tile")  # the uint8 table path's layout
        image = (rng.random((3 * cfg.crop_size // 2, 2 * cfg.crop_size, 3)) * 255).astype(np.uint8)
        image[:4] = 0  # the darkest and brightest levels go through the table too
        image[-4:] = 255
        bench.assert_same(make_crops(image, 12, cfg), bench.float_path_crops(image, 12, cfg))
    broken = make_crops(image, 12, cfg)
    broken.pixels[0, 0, 0, 0] += 1e-6
    with pytest.raises(AssertionError):
        bench.assert_same(broken, bench.float_path_crops(image, 12, cfg))
