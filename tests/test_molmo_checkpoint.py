"""MolmoE checkpoints in their real layouts, and Molmo's preprocessing, against an independent reference.

The reference (tests/molmo_reference.py) is written from Molmo's described behaviour: real key names,
megablocks' fused experts, the stitched tile block with trimmed margins, the mask convention and the
prompt. Converted checkpoints go through the CLI (scripts/convert_molmoe.py).
"""

import json

import numpy as np
import pytest
import torch
from conftest import random_image
from molmo_reference import (
    molmo_config_json,
    molmo_key_shapes,
    molmo_layout,
    reference_llm,
    reference_vision,
    synthetic_molmo_state_dict,
    to_megablocks,
)
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from envs.vlm.checkpoint import check_state_dict, load_dir
from envs.vlm.convert import config_from_molmo, convert_molmo_state_dict
from envs.vlm.crops import make_crops, molmo_resize_and_pad, tiling_for
from envs.vlm.layout import image_token_count, image_tokens
from envs.vlm.model import KnobVLM, preprocess_requests
from envs.vlm.presets import get_preset
from envs.vlm.tokenizer import TextTokenizer
from scripts.answer import main as answer_main
from scripts.convert_molmoe import main as convert_main

SPECIALS = ["<|endoftext|>", "<|padding|>", "<im_start>", "<im_end>", "<im_col>", "<im_patch>"]
# A MolmoE-shaped checkpoint small enough for the loop-based reference: 12 x 12 patches per crop,
# a 2-patch overlap margin, 4 LLM layers of 4 experts (top 2).
TINY_MOLMO = {
    "model_type": "molmo",
    "d_model": 32,
    "n_layers": 4,
    "n_heads": 2,
    "moe_num_experts": 4,
    "moe_top_k": 2,
    "mlp_ratio": 1,
    "embedding_size": 384,
    "additional_vocab_size": 16,
    "vocab_size": 360,
    "layer_norm_type": "rms",
    "layer_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "max_sequence_length": 2048,
    "max_crops": 12,
    "overlap_margins": [2, 2],
    "always_start_with_space": True,
    "vit_layers": [-1, -2],
    "vision_backbone": {
        "image_default_input_size": [48, 48],
        "image_patch_size": 4,
        "image_emb_dim": 16,
        "image_num_layers": 3,
        "image_num_heads": 2,
        "image_head_dim": 8,
        "image_mlp_dim": 32,
        "image_norm_eps": 1e-5,
    },
}


def bpe_tokenizer() -> Tokenizer:
    """A byte-level BPE like OLMo's, trained here on a few prompts (so ' User' is one token, 'ĠUser')."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    text = [" User: what colour is the circle? Assistant: red", "User: how many stars? Assistant: two"] * 20
    trainer = trainers.BpeTrainer(
        vocab_size=330,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(text, trainer)
    return tok


def write_checkpoint(path, state, molmo=TINY_MOLMO, shards: int = 0):
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps(molmo))
    bpe_tokenizer().save(str(path / "tokenizer.json"))
    if not shards:
        save_file(state, str(path / "model.safetensors"))
        return path
    keys = sorted(state)
    weight_map = {}
    for n in range(shards):
        name = f"model-{n + 1:05d}-of-{shards:05d}.safetensors"
        part = {k: state[k].contiguous() for k in keys[n::shards]}
        save_file(part, str(path / name))
        weight_map.update(dict.fromkeys(part, name))
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return path


@pytest.fixture(scope="module")
def tiny_molmo(tmp_path_factory):
    """(config, source weights, converted model directory) of a tiny Molmo-layout checkpoint."""
    cfg = config_from_molmo(TINY_MOLMO)
    state = synthetic_molmo_state_dict(cfg, extra_vocab=TINY_MOLMO["additional_vocab_size"])
    root = tmp_path_factory.mktemp("molmo")
    src = write_checkpoint(root / "src", state)
    assert convert_main(["--src", str(src), "--out", str(root / "out"), "--dtype", "float32"]) == 0
    return cfg, state, root / "out"


# ---------------------------------------------------------------- checkpoint layouts


def test_real_key_set_at_real_shapes_on_meta():
    """MolmoE-1B's config.json fields give the preset's shapes; the real key set (norms under attn/mlp),
    on the meta device, is consumed entirely and fills every parameter - in both expert layouts."""
    preset = get_preset("molmoe-1b")
    cfg = config_from_molmo(molmo_config_json(preset))
    assert (cfg.vision, cfg.connector, cfg.llm) == (preset.vision, preset.connector, preset.llm)
    assert (cfg.knobs.top_k, cfg.knobs.blocks) == (preset.knobs.top_k, preset.knobs.blocks)
    shapes = molmo_key_shapes(cfg)
    norms = [k for k in shapes if k.endswith(("attn.attn_norm.weight", "mlp.ff_norm.weight"))]
    assert len(norms) == 32 and "model.transformer.blocks.15.mlp.ff_norm.weight" in norms
    meta = {k: torch.empty(s, device="meta") for k, s in shapes.items()}
    for source in (meta, to_megablocks(meta, cfg)):
        state = convert_molmo_state_dict(source, cfg)
        with torch.device("meta"):
            model = KnobVLM(cfg, TextTokenizer(bpe_tokenizer()))
        check_state_dict(model, state, "meta")
        model.load_state_dict(state, assign=True, strict=True)
        assert sum(p.numel() for p in model.parameters()) == 7_221_875_712


def test_single_file_shards_and_megablocks_convert_to_the_same_model(tiny_molmo, tmp_path):
    cfg, state, out = tiny_molmo
    expected = load_file(str(out / "model.safetensors"))
    for name, source, shards in (("shards", state, 3), ("megablocks", to_megablocks(state, cfg), 2)):
        src = write_checkpoint(tmp_path / name, source, shards=shards)
        assert convert_main(["--src", str(src), "--out", str(tmp_path / f"{name}-out"), "--dtype", "float32"]) == 0
        got = load_file(str(tmp_path / f"{name}-out" / "model.safetensors"))
        assert got.keys() == expected.keys()
        assert all(torch.equal(got[k], expected[k]) for k in expected), name
    saved = json.loads((out / "config.json").read_text())
    assert saved["vision"]["layout"] == "molmo" and saved["always_start_with_space"] is True
    assert saved["knobs"]["max_crops"] == {"low": 2, "medium": 6, "high": 12}
    assert saved["llm"]["experts"] == 4 and saved["llm"]["vocab_size"] == 400


def test_bad_checkpoints_name_the_file_or_key(tiny_molmo, tmp_path, capsys):
    cfg, state, _ = tiny_molmo

    def convert(src):
        code = convert_main(["--src", str(src), "--out", str(tmp_path / "out"), "--dtype", "float32"])
        return code, capsys.readouterr().err

    src = write_checkpoint(tmp_path / "shards", state, shards=3)
    (src / "model-00002-of-00003.safetensors").unlink()
    code, err = convert(src)
    assert code == 2 and "model-00002-of-00003.safetensors" in err and "missing" in err

    odd = {**state, "model.transformer.blocks.0.attn.rotary.inv_freq": torch.ones(4)}
    code, err = convert(write_checkpoint(tmp_path / "odd", odd))
    assert code == 2 and "not consumed" in err and "model.transformer.blocks.0.attn.rotary.inv_freq" in err

    wrong = write_checkpoint(tmp_path / "wrong", state, molmo={**TINY_MOLMO, "moe_num_experts": 8})
    code, err = convert(wrong)
    assert code == 2 and "model.transformer.blocks.0.mlp.gate.weight has shape (4, 32)" in err and "(8, 32)" in err

    lacking = write_checkpoint(
        tmp_path / "lacking", state, molmo={k: v for k, v in TINY_MOLMO.items() if k != "d_model"}
    )
    code, err = convert(lacking)
    assert code == 2 and "lacks the field 'd_model'" in err

    code, err = convert(write_checkpoint(tmp_path / "norm", state, molmo={**TINY_MOLMO, "layer_norm_type": "default"}))
    assert code == 2 and "layer_norm_type='default' is not supported" in err
    assert convert_main(["--src", str(src), "--out", str(tmp_path / "o"), "--max-crops", "2,6,13"]) == 2
    assert "in 1..12" in capsys.readouterr().err


# ---------------------------------------------------------------- Molmo's preprocessing


@pytest.mark.parametrize("height,width,max_crops,expected", [(1008, 1344, 12, 1196), (480, 640, 4, 580)])
def test_molmo_token_counts_of_the_issue(height, width, max_crops, expected):
    v = get_preset("molmoe-1b").vision
    tiling = tiling_for(height, width, max_crops, v)
    assert image_token_count(tiling, v) == expected
    ids = {"im_start": 1, "im_end": 2, "im_col": 3, "im_patch": 4}
    tokens, _, _ = molmo_layout(tiling, v.tokens_per_side, v.overlap_margin, ids)
    assert len(tokens) == expected
    per_tile = get_preset("tiny").vision.__class__(**{**v.__dict__, "layout": "per_tile"})
    assert image_token_count(tiling, per_tile) == {1196: 2054, 580: 790}[expected]  # the per-tile layout's counts


def test_molmo_layout_matches_the_reference_at_every_max_crops():
    v = get_preset("molmoe-1b").vision
    ids = {"im_start": 11, "im_end": 12, "im_col": 13, "im_patch": 14}
    side = v.tokens_per_side
    for height, width in [(480, 640), (1008, 1344), (336, 336), (200, 900), (1500, 400), (77, 63), (700, 701)]:
        for max_crops in range(1, 13):
            tiling = tiling_for(height, width, max_crops, v)
            ref_tokens, ref_pos, carried = molmo_layout(tiling, side, v.overlap_margin, ids)
            tokens, pos, sources = image_tokens(tiling, 1 + tiling[0] * tiling[1], v, ids)
            assert (tokens, pos) == (ref_tokens, ref_pos), (height, width, max_crops)
            assert sources == [view * side * side + r * side + c for view, r, c in carried]
            assert image_token_count(tiling, v) == len(tokens)


def test_molmo_resize_and_masks():
    v = get_preset("molmoe-1b").vision
    from PIL import Image

    img = Image.fromarray(random_image(480, 640, 3))
    pixels, mask, _ = molmo_resize_and_pad(img, 336, 336, v.mean, v.std)
    assert mask.any(axis=1).sum() == 251 and mask.any(axis=0).sum() == 336  # int(480 * float32(336/640))
    pad = (0 - np.array(v.mean, dtype=np.float32)) / np.array(v.std, dtype=np.float32)
    np.testing.assert_allclose(pixels[0, 0], pad, rtol=1e-6)
    levels = (pixels[100, :, 0] * v.std[0] + v.mean[0]) * 255
    assert np.abs(levels - np.round(levels)).max() > 0.01  # resized in float, not on uint8 levels

    crops = make_crops(img, 4, v)
    assert crops.tiling == (2, 2) and crops.n_crops == 5
    assert (crops.patch_mask[-1] == -1).all()  # the last tile's row
    # view k carries the mask of view k + 1: tile k's own coverage of image pixels
    margin = v.overlap_margin * v.patch_size
    window = v.crop_size - 2 * margin
    _, big_mask, _ = molmo_resize_and_pad(img, 2 * window + 2 * margin, 2 * window + 2 * margin, v.mean, v.std)
    for k, (i, j) in enumerate([(0, 0), (0, 1), (1, 0), (1, 1)]):
        tile = big_mask[i * window : i * window + v.crop_size, j * window : j * window + v.crop_size]
        frac = tile.reshape(24, 14, 24, 14).mean(axis=(1, 3))
        np.testing.assert_allclose(crops.patch_mask[k], frac, rtol=1e-6)
    assert (crops.patch_mask[:-1] == 0).any() and (crops.patch_mask[:-1] == 1).any()  # padding is present


def test_molmo_prompt_starts_with_a_space_and_request_shapes_follow_the_layout(tiny_molmo):
    cfg, _, out = tiny_molmo
    model = load_dir(out)
    tok = model.tokenizer
    first = tok.prompt_ids("what colour is the circle?", start_with_space=True)[0]
    assert first == tok.tokenizer.token_to_id("ĠUser") != tok.prompt_ids("what colour?")[0]
    for h, w in [(100, 80), (64, 200), (150, 150)]:
        image = random_image(h, w, h)
        crops, tokens = model.request_shapes(image, "what colour is the circle?")
        for n, tier in enumerate(("low", "medium", "high")):
            pre = preprocess_requests(cfg, tok, [image], ["what colour is the circle?"], tier)
            assert (pre.crops[0].n_crops, len(pre.token_ids[0])) == (crops[n], tokens[n])
            assert pre.token_ids[0][len(pre.token_ids[0]) - pre.text_lengths[0]] == first
            marks, _, _ = molmo_layout(
                pre.crops[0].tiling, cfg.vision.tokens_per_side, cfg.vision.overlap_margin, tok.ids
            )
            assert tokens[n] == 1 + len(marks) + len(tok.encode(" User: what colour is the circle? Assistant:"))


# ---------------------------------------------------------------- answers against the reference


def test_converted_checkpoint_first_token_logits_match_the_reference(tiny_molmo, tmp_path, capsys):
    cfg, state, out = tiny_molmo
    model = load_dir(out)
    tok, v = model.tokenizer, cfg.vision
    question = "what colour is the circle?"
    top_k, blocks = max(cfg.knobs.top_k), max(cfg.knobs.blocks)
    for h, w in [(100, 80), (60, 170)]:
        image = random_image(h, w, w)
        crops = make_crops(image, cfg.knobs.max_crops["high"], v)
        assert crops.tiling[0] * crops.tiling[1] > 1
        with torch.no_grad():
            gen = model.answer([image], [question], "high", top_k, blocks, max_new_tokens=1)
            pooled = reference_vision(state, cfg, torch.from_numpy(crops.pixels), torch.from_numpy(crops.patch_mask))
            marks, positions, carried = molmo_layout(crops.tiling, v.tokens_per_side, v.overlap_margin, tok.ids)
            ids = [tok.ids["bos"], *marks, *tok.encode(" User: " + question + " Assistant:")]
            feats = torch.stack([pooled[view, r * v.tokens_per_side + c] for view, r, c in carried])
            ref = reference_llm(state, cfg, ids, feats, [1 + p for p in positions])[-1]
        assert model.request_shapes(image, question)[1][2] == len(ids)
        torch.testing.assert_close(gen.step_logits[0][0], ref, atol=1e-4, rtol=1e-4)

    path = tmp_path / "img.png"
    from PIL import Image

    Image.fromarray(image).save(path)
    assert answer_main(["--model", str(out), "--image", str(path), "--question", question, "--json",
                        "--max-new-tokens", "1", "--top-logits", "3"]) == 0  # fmt: skip
    got = json.loads(capsys.readouterr().out)
    assert got["prompt_tokens"] == len(ids)
    values, index = ref.topk(3)
    assert [i for i, _ in got["top_logits"]] == index.tolist()
    np.testing.assert_allclose([x for _, x in got["top_logits"]], values.numpy(), atol=1e-4)
    assert answer_main(["--model", str(out), "--list-knobs"]) == 0
    knobs = json.loads(capsys.readouterr().out)
    assert knobs == {"tier": ["low", "medium", "high"], "max_crops": {"low": 2, "medium": 6, "high": 12},
                     "top_k": [1, 2], "blocks": [1]}  # fmt: skip
    assert answer_main(["--model", "molmoe-1b", "--list-knobs"]) == 0  # from the config: no 7B model is built
    assert json.loads(capsys.readouterr().out)["max_crops"] == {"low": 2, "medium": 6, "high": 12}
