"""Converter, save/load, parameter counts and the errors a bad checkpoint gives."""

import json

import numpy as np
import pytest
import torch
from molmo_reference import reference_llm, reference_vision, synthetic_molmo_state_dict
from safetensors.torch import load_file, save_file

from envs.vlm.checkpoint import build_model, check_state_dict, load_dir, save_model
from envs.vlm.convert import convert_checkpoint, convert_molmo_state_dict
from envs.vlm.errors import CheckpointError
from envs.vlm.model import KnobVLM
from envs.vlm.presets import get_preset
from envs.vlm.tokenizer import TextTokenizer, build_word_tokenizer


def small_cfg():
    cfg = get_preset("tiny")
    cfg.llm.output_vocab_size = cfg.llm.vocab_size - 128  # like Molmo: the extra 128 ids are input-only
    cfg.llm.layers, cfg.knobs.blocks = 5, (0, 1, 2)
    cfg.vision.layers = 3
    return cfg


def test_molmoe_1b_parameter_count_on_meta():
    model = build_model("molmoe-1b", device="meta")
    assert sum(p.numel() for p in model.parameters()) == 7_221_875_712


def test_converter_round_trip_matches_reference(images, questions):
    cfg = small_cfg()
    sd = synthetic_molmo_state_dict(cfg)
    state = convert_molmo_state_dict(sd, cfg)
    model = KnobVLM(cfg, TextTokenizer(build_word_tokenizer())).eval()
    check_state_dict(model, state, "synthetic")  # every model tensor produced, none extra
    model.load_state_dict(state)

    pre = model.preprocess(images[:1], questions[:1], "medium")
    crops = pre.crops[0]
    pixels, mask = torch.from_numpy(crops.pixels), torch.from_numpy(crops.patch_mask)
    assert ((mask > 0) & (mask < 1)).any() or (mask == 0).any()  # the pad embeddings are exercised
    with torch.no_grad():
        ours = model.connector(model.encode_vision(pixels), mask)
        ref = reference_vision(sd, cfg, pixels, mask)
        torch.testing.assert_close(ours, ref, atol=1e-4, rtol=1e-4)

        prepared = model.connect(pre, model.encode_vision(pixels))
        layers = list(range(cfg.llm.layers))
        logits = model.forward_logits(prepared, layers, cfg.llm.top_k)[0]
        ref_logits = reference_llm(sd, cfg, pre.token_ids[0], ref.reshape(-1, ref.shape[-1]), pre.patch_positions[0])
    torch.testing.assert_close(logits, ref_logits, atol=1e-4, rtol=1e-4)


def test_converter_accepts_molmo_spellings_and_rejects_leftovers():
    cfg = small_cfg()
    sd = synthetic_molmo_state_dict(cfg)
    renamed = {
        k.replace(".attn.att_proj.", ".att_proj.").replace("lm_head.weight", "model.transformer.ff_out.weight"): v
        for k, v in sd.items()
    }
    a, b = convert_molmo_state_dict(sd, cfg), convert_molmo_state_dict(renamed, cfg)
    assert all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(CheckpointError, match="not consumed"):
        convert_molmo_state_dict({**sd, "model.transformer.blocks.99.attn_norm.weight": torch.ones(1)}, cfg)
    del sd["model.transformer.blocks.1.mlp.experts.3.up_proj.weight"]
    with pytest.raises(CheckpointError, match="lacks model.transformer.blocks.1.mlp.experts.3.up_proj"):
        convert_molmo_state_dict(sd, cfg)


def test_convert_checkpoint_directory(tmp_path):
    cfg = get_preset("tiny")
    src = tmp_path / "molmo"
    src.mkdir()
    save_file(synthetic_molmo_state_dict(cfg), str(src / "model.safetensors"))
    build_word_tokenizer().save(str(src / "tokenizer.json"))
    out = convert_checkpoint(src, tmp_path / "converted", preset="tiny", dtype=torch.float32)
    model = load_dir(out)
    assert model.cfg.name == "tiny" and model.ranking.method == "index_order"


def test_save_load_round_trip_is_exact(tiny, tmp_path, images, questions):
    save_model(tiny, tmp_path / "m")
    loaded = load_dir(tmp_path / "m")
    a = tiny.answer(images[:2], questions[:2], "medium", 4, 9, max_new_tokens=3)
    b = loaded.answer(images[:2], questions[:2], "medium", 4, 9, max_new_tokens=3)
    assert a.token_ids == b.token_ids
    assert torch.equal(a.step_logits[0], b.step_logits[0])


@pytest.mark.parametrize("missing", ["config.json", "model.safetensors", "tokenizer.json", "block_ranking.json"])
def test_missing_file_is_named(tiny, tmp_path, missing):
    save_model(tiny, tmp_path / "m")
    (tmp_path / "m" / missing).unlink()
    with pytest.raises(CheckpointError, match=missing):
        load_dir(tmp_path / "m")


def test_mismatched_shapes_are_named(tiny, tmp_path):
    path = save_model(tiny, tmp_path / "m")
    state = load_file(str(path / "model.safetensors"))
    state["llm.layers.4.mlp.gate.weight"] = torch.zeros(16, 96)
    save_file(state, str(path / "model.safetensors"))
    with pytest.raises(
        CheckpointError, match=r"llm.layers.4.mlp.gate.weight: checkpoint \(16, 96\) vs model \(32, 96\)"
    ):
        load_dir(path)


def test_config_for_another_shape_is_rejected(tiny, tmp_path):
    path = save_model(tiny, tmp_path / "m")
    cfg = json.loads((path / "config.json").read_text())
    cfg["llm"]["d_model"] = 128
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="shape mismatches"):
        load_dir(path)
    (path / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not a valid model config"):
        load_dir(path)


def test_bad_ranking_file_is_rejected(tiny, tmp_path):
    path = save_model(tiny, tmp_path / "m")
    r = json.loads((path / "block_ranking.json").read_text())
    r["order"] = r["order"][:-1]
    (path / "block_ranking.json").write_text(json.dumps(r))
    with pytest.raises(CheckpointError, match="ranking must order exactly layers 3..15"):
        load_dir(path)


def test_load_missing_directory():
    with pytest.raises(CheckpointError, match="not found"):
        load_dir("/nonexistent/model")


def test_random_images_array_input_validated(tiny):
    from envs.vlm.errors import InputError

    with pytest.raises(InputError, match="HxWx3 uint8"):
        tiny.prepare([np.zeros((10, 10), dtype=np.uint8)], ["q?"], "low")


def test_convert_script_reports_a_bad_source(tmp_path, capsys):
    from scripts.convert_molmoe import main

    assert main(["--src", str(tmp_path), "--out", str(tmp_path / "out"), "--preset", "tiny"]) == 2
    assert "missing tokenizer file" in capsys.readouterr().err
