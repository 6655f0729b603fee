"""Your own model, data and device: assets manifests, DATA sources, checks, and the whole journey.

The journey (marked slow) runs on a model directory other than the embedded one (a random tiny model
saved with save_model), with a profile named for another device, on a VQAv2-format set and a
`datasets`-style parquet set the tests build: prepare_assets.py -> train_ppo.py --quick ->
evaluate.py on the own test split -> answer.py --policy.
"""

from __future__ import annotations

import io
import json
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from envs.asset_manifest import AssetsError, check_profile, check_table, file_hash, latency_hash, read_manifest
from envs.assets import Assets
from envs.tasks.sources import Columns, DataError, check_samples, load_data, split_of, split_samples
from envs.vlm.checkpoint import EMBEDDED, build_model, save_model, weights_digest

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220), "yellow": (230, 220, 30)}


def _image(i: int) -> Image.Image:
    rng = np.random.default_rng(i)
    colour = list(COLOURS.values())[i % len(COLOURS)]
    h, w = (48, 64) if i % 2 else (90, 70)
    arr = np.clip(np.array(colour) + rng.normal(0, 12, (h, w, 3)), 0, 255).astype(np.uint8)
    return Image.fromarray(arr)


def make_vqav2(root: Path, n_images: int = 10, per_image: int = 4) -> str:
    """A VQAv2-format set: questions / annotations JSON and COCO-named images; returns its DATA string."""
    (root / "images").mkdir(parents=True)
    questions, annotations = [], []
    for i in range(n_images):
        _image(i).save(root / "images" / f"COCO_val2014_{i + 1:012d}.png")
        colour = list(COLOURS)[i % len(COLOURS)]
        for q in range(per_image):
            qid = (i + 1) * 1000 + q
            text = ["what colour is the image?", "is it red?", "what colour dominates?", "is it dark?"][q]
            answer = colour if q != 1 and q != 3 else ("yes" if (colour == "red") == (q == 1) else "no")
            questions.append({"question_id": qid, "image_id": i + 1, "question": text})
            annotations.append({"question_id": qid, "image_id": i + 1, "answer_type": "other",
                                "answers": [{"answer": answer, "answer_id": k + 1} for k in range(10)]})  # fmt: skip
    (root / "questions.json").write_text(json.dumps({"questions": questions}))
    (root / "annotations.json").write_text(json.dumps({"annotations": annotations}))
    return f"vqav2:{root / 'questions.json'},{root / 'annotations.json'},{root / 'images'}"


def make_hf(root: Path, n: int = 30, drop: str | None = None, as_arrow: bool = False) -> str:
    """A `datasets`-style set on disk: parquet files, or a save_to_disk folder (Arrow stream files), with an
    Image-feature column ({"bytes", "path"}), question, answers (list of strings) and question_id."""
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    rows = {"image": [], "question": [], "answers": [], "question_id": []}
    for i in range(n):
        buf = io.BytesIO()
        _image(i).save(buf, format="PNG")
        rows["image"].append({"bytes": buf.getvalue(), "path": None})
        rows["question"].append("what colour is the image?")
        rows["answers"].append([list(COLOURS)[i % len(COLOURS)]] * 10)
        rows["question_id"].append(5000 + i)
    if drop:
        rows.pop(drop)
    table = pa.table(rows)
    root.mkdir(parents=True)
    if as_arrow:
        with (
            pa.OSFile(str(root / "data-00000-of-00001.arrow"), "wb") as sink,
            pa.ipc.new_stream(sink, table.schema) as w,
        ):
            w.write_table(table)
        (root / "state.json").write_text(json.dumps({"_data_files": [{"filename": "data-00000-of-00001.arrow"}]}))
    else:
        pq.write_table(table.slice(0, n // 2), root / "train-00000.parquet")
        pq.write_table(table.slice(n // 2), root / "train-00001.parquet")
    return f"hf:{root}"


def other_device_profile(path: Path) -> Path:
    """The embedded CPU profile relabelled as taken on another device (shapes are the tiny preset's)."""
    data = json.loads((EMBEDDED / "tiny" / "latency_cpu.json").read_text())
    data["meta"] = {**data["meta"], "device": "cuda", "device_name": "NVIDIA H100 80GB HBM3", "threads": None}
    path.write_text(json.dumps(data))
    return path


@pytest.fixture(scope="module")
def own_model(tmp_path_factory):
    return save_model(build_model("tiny", seed=3), tmp_path_factory.mktemp("own") / "my_model")


# ---------------------------------------------------------------------------------------------- fast checks
def test_embedded_manifest_names_its_files():
    manifest = read_manifest(EMBEDDED / "tiny")
    assert manifest["default_profile"] == "cpu"
    assert manifest["profiles"]["cpu"]["file"] == "latency_cpu.json"
    assert {s: manifest["tables"][s]["file"] for s in ("train", "val", "test")} == {
        s: f"outcomes/{s}.npz" for s in ("train", "val", "test")
    }
    assert all(t["profile"] == "cpu" and t["latency"] == manifest["profiles"]["cpu"]["latency"]
               for t in manifest["tables"].values())  # fmt: skip
    # the manifest describes the files as they are (scripts/build_embedded.sh rewrites it with them)
    root = EMBEDDED / "tiny"
    assert manifest["model"]["weights"] == weights_digest("tiny")
    profile = json.loads((root / "latency_cpu.json").read_text())
    assert manifest["profiles"]["cpu"]["latency"] == latency_hash(profile["model"])
    assert all(t["content"] == file_hash(root / t["file"]) for t in manifest["tables"].values())


def test_legacy_directory_reads_as_a_manifest(tmp_path):
    shutil.copy(EMBEDDED / "tiny" / "latency_cpu.json", tmp_path / "latency_cpu.json")
    (tmp_path / "outcomes").mkdir()
    shutil.copy(EMBEDDED / "tiny" / "outcomes" / "test.npz", tmp_path / "outcomes" / "test.npz")
    manifest = read_manifest(tmp_path)
    assert manifest["profiles"] == {"cpu": {"file": "latency_cpu.json", "device": "cpu"}}
    assert list(manifest["tables"]) == ["test"]


def test_table_of_other_weights_or_profile_is_refused():
    meta = {"weights": "aaaa", "latency_model": {"x": 1}}
    with pytest.raises(AssetsError, match="other weights"):
        check_table(meta, "t.npz", "bbbb", latency_hash({"x": 1}), "cpu")
    with pytest.raises(AssetsError, match="another latency profile than 'cuda'"):
        check_table(meta, "t.npz", "aaaa", latency_hash({"x": 2}), "cuda")
    with pytest.warns(UserWarning, match="other weights"):
        check_table(meta, "t.npz", "bbbb", latency_hash({"x": 1}), "cpu", allow_mismatch=True)
    check_table(meta, "t.npz", "aaaa", latency_hash({"x": 1}), "cpu")  # matching: no error


def test_assets_refuse_a_table_timed_with_another_profile(tmp_path):
    other = json.loads((EMBEDDED / "tiny" / "latency_cpu.json").read_text())
    other["model"]["decode_per_token"] = {k: v * 2 for k, v in other["model"]["decode_per_token"].items()}
    (tmp_path / "slow.json").write_text(json.dumps(other))
    with pytest.raises(AssetsError, match="another latency profile"):
        Assets("tiny", quick=True, profile=tmp_path / "slow.json").replay("train")
    with pytest.warns(UserWarning, match="another latency profile"):
        Assets("tiny", quick=True, profile=tmp_path / "slow.json", allow_mismatch=True).check_table("train")


def test_profile_of_another_models_shapes_is_refused(tiny):
    data = json.loads((EMBEDDED / "tiny" / "latency_cpu.json").read_text())
    check_profile(data, tiny.cfg, "cpu profile")
    wrong = {**data, "meta": {**data["meta"], "preset": "molmoe-1b"}}
    with pytest.raises(AssetsError, match="preset 'molmoe-1b'"):
        check_profile(wrong, tiny.cfg, "p.json")
    shapes = json.loads(json.dumps({**data, "meta": {"shapes": {"preset": "tiny", "d_model": 2048}}}))
    with pytest.raises(AssetsError, match="d_model"):
        check_profile(shapes, tiny.cfg, "p.json")


def test_split_by_question_id_is_stable_and_seeded():
    ids = [str(i) for i in range(2000)]
    fractions = (0.6, 0.2, 0.2)
    splits = [split_of(i, 0, fractions) for i in ids]
    counts = {s: splits.count(s) for s in ("train", "val", "test")}
    assert abs(counts["train"] - 1200) < 90 and abs(counts["test"] - 400) < 70
    assert splits == [split_of(i, 0, fractions) for i in reversed(ids)][::-1]  # order does not matter
    assert splits != [split_of(i, 1, fractions) for i in ids]  # the seed does


def test_vqav2_source_keeps_question_ids(tmp_path):
    samples = load_data(make_vqav2(tmp_path / "v", n_images=3, per_image=2))
    assert [s.id for s in samples] == ["1000", "1001", "2000", "2001", "3000", "3001"]
    assert samples[0].answers == ["red"] * 10


def test_manifest_question_id_is_honoured(tmp_path):
    _image(0).save(tmp_path / "a.png")
    (tmp_path / "m.jsonl").write_text(json.dumps({"question_id": 77, "image": "a.png", "question": "q?",
                                                  "answers": ["red"]}) + "\n")  # fmt: skip
    assert load_data(str(tmp_path / "m.jsonl"))[0].id == "77"


def test_bad_data_is_named(tmp_path):
    samples = load_data(make_vqav2(tmp_path / "v", n_images=2, per_image=2))
    with pytest.raises(DataError, match=r"duplicate question ids: \['1000'\]"):
        check_samples(samples + samples[:1])
    (tmp_path / "v" / "images" / "COCO_val2014_000000000002.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match="2 unreadable image"):
        check_samples(load_data(f"vqav2:{tmp_path}/v/questions.json,{tmp_path}/v/annotations.json,{tmp_path}/v/images"))
    with pytest.raises(DataError, match=r"the (train|val|test) split is empty \(1 questions"):
        split_samples(samples[:1], (0.4, 0.3, 0.3))
    with pytest.raises(DataError, match="synthvqa:SEED:N"):
        load_data("synthvqa:1")


def test_hf_source_reads_parquet_and_save_to_disk(tmp_path):
    parquet = load_data(make_hf(tmp_path / "pq", n=6))
    arrow = load_data(make_hf(tmp_path / "ar", n=6, as_arrow=True))
    assert [s.id for s in parquet] == [s.id for s in arrow] == [str(5000 + i) for i in range(6)]
    assert parquet[1].answers == ["green"] * 10 and parquet[1].image.size == (64, 48)
    with pytest.raises(DataError, match="no answers column 'answers'.*--answers-column"):
        load_data(make_hf(tmp_path / "missing", n=4, drop="answers"))
    renamed = load_data(f"hf:{tmp_path / 'pq'}", Columns(question="question", answers="answers", id="nope"))
    assert [s.id for s in renamed] == [str(i) for i in range(6)]  # no id column: row numbers


def test_prepare_refuses_bad_data_and_writes_nothing(tmp_path, own_model, capsys):
    from scripts.prepare_assets import main

    data = make_vqav2(tmp_path / "v", n_images=2, per_image=2)
    (tmp_path / "v" / "images" / "COCO_val2014_000000000001.png").write_bytes(b"broken")
    assert main(["--model", str(own_model), "--data", data, "--out", str(tmp_path / "a")]) == 2
    assert not (tmp_path / "a").exists()
    good = make_vqav2(tmp_path / "v2", n_images=4, per_image=3)
    wrong = json.loads((EMBEDDED / "tiny" / "latency_cpu.json").read_text())
    wrong["meta"]["preset"] = "molmoe-1b"
    (tmp_path / "wrong.json").write_text(json.dumps(wrong))
    argv = [
        "--model",
        str(own_model),
        "--data",
        good,
        "--out",
        str(tmp_path / "b"),
        "--profile",
        str(tmp_path / "wrong.json"),
    ]
    assert main(argv) == 2
    assert "measured on preset 'molmoe-1b'" in capsys.readouterr().err and not (tmp_path / "b").exists()
    assert main([*argv[:5], str(tmp_path / "c"), "--split", "0.5,0.6,0.1"]) == 2
    assert "sum to 1" in capsys.readouterr().err and not (tmp_path / "c").exists()


def test_every_option_of_the_journeys_scripts_says_what_it_does(monkeypatch):
    import argparse

    from scripts import answer, evaluate, prepare_assets, train_ppo

    parsers = []

    def capture(self, *args, **kwargs):
        parsers.append(self)
        raise SystemExit(0)

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", capture)
    for script in (prepare_assets, train_ppo, evaluate, answer):
        with pytest.raises(SystemExit):
            script.main([])
    assert len(parsers) == 4
    silent = [a.option_strings for ap in parsers for a in ap._actions if not a.help]
    assert silent == []


# ---------------------------------------------------------------------------------------------- the journey
@pytest.mark.slow
def test_journey_own_model_vqav2_and_hf(tmp_path, own_model, capsys, monkeypatch):
    from agents.serving import load_server
    from scripts import answer, evaluate, prepare_assets, train_ppo

    monkeypatch.setenv("KNOB_RL_CACHE", str(tmp_path / "cache"))
    profile = other_device_profile(tmp_path / "h100.json")
    assets = tmp_path / "assets"
    data = make_vqav2(tmp_path / "vqa", n_images=10, per_image=4)
    assert prepare_assets.main(["--model", str(own_model), "--data", data, "--out", str(assets),
                                "--profile", str(profile), "--split", "0.5,0.25,0.25"]) == 0  # fmt: skip
    manifest = json.loads((assets / "assets.json").read_text())
    name = "cuda-nvidia-h100-80gb-hbm3"
    assert manifest["default_profile"] == name and manifest["profiles"][name]["device"] == "cuda"
    assert not Path(manifest["model"]["path"]).is_absolute()
    assert (assets / manifest["model"]["path"]).resolve() == own_model.resolve()
    assert sum(t["requests"] for t in manifest["tables"].values()) == 40
    for split in ("train", "val", "test"):
        assert (assets / "tables" / split / "pareto.png").is_file()
    assert "| test |" in (assets / "summary.md").read_text()

    run = tmp_path / "run"
    assert train_ppo.main(["--policy", "two_stage", "--assets", str(assets), "--quick", "--controller-ms", "1.0",
                           "--budget-reference", "data", "--out", str(run)]) == 0  # fmt: skip
    with zipfile.ZipFile(run / "policy.zip") as z:
        rec = json.loads(z.read("knob_rl_assets.json"))
        assert str(tmp_path) not in z.read("data").decode()  # no absolute path in the policy
    assert rec["profile"]["name"] == name and rec["profile"]["file"] == f"profiles/{name}.json"
    assert rec["controller_ms"] == 1.0 and rec["model"]["weights"] == manifest["model"]["weights"]
    assert rec["budget_reference"] == "data"
    assert rec["profile"]["reference_full_ms"] != manifest["profiles"][name]["reference_full_ms"]

    out = tmp_path / "eval" / "test.json"
    assert evaluate.main(["--policy", str(run / "policy.zip"), "--assets", str(assets), "--split", "test",
                          "--budgets", "uniform,tight", "--episodes", "60", "--out", str(out)]) == 0  # fmt: skip
    report = json.loads(out.read_text())
    meta = report["meta"]
    assert meta["profile"]["name"] == name and meta["split"] == "test"
    assert meta["table"]["requests"] == manifest["tables"]["test"]["requests"]
    assert meta["controller_source"] == "as trained" and meta["controller_ms"] == 1.0
    assert meta["full_config_ms"] == rec["profile"]["reference_full_ms"]  # budgets read as in training
    assert meta["minutes"] > 0 and meta["peak_memory_mb"] > 0
    assert out.with_suffix(".png").is_file() and "run 0.0 min" not in out.with_suffix(".md").read_text()

    image = tmp_path / "vqa" / "images" / "COCO_val2014_000000000001.png"
    capsys.readouterr()
    assert answer.main(["--policy", str(run / "policy.zip"), "--budget-ms", "60", "--image", str(image),
                        "--question", "what colour is the image?", "--warmup", "0", "--json"]) == 0  # fmt: skip
    served = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert served["profile"]["device"] == "cuda" and served["profile"]["as_trained"]
    assert served["predicted_ms"] > 0 and served["chosen_by"] in ("policy", "guard", "repair")
    assert served["guarded"] == (served["chosen_by"] == "guard")
    assert load_server(run / "policy.zip").full_ms == rec["profile"]["reference_full_ms"]

    hf_assets = tmp_path / "hf_assets"
    assert prepare_assets.main(["--model", str(own_model), "--data", make_hf(tmp_path / "hf", n=30), "--out",
                                str(hf_assets), "--profile", str(profile), "--no-features"]) == 0  # fmt: skip
    hf_manifest = json.loads((hf_assets / "assets.json").read_text())
    assert sum(t["requests"] for t in hf_manifest["tables"].values()) == 30
    hf_run = tmp_path / "hf_run"  # features are built on first use (--no-features)
    assert train_ppo.main(["--policy", "two_stage", "--assets", str(hf_assets), "--quick", "--controller-ms", "1.0",
                           "--out", str(hf_run)]) == 0  # fmt: skip
    hf_out = tmp_path / "eval" / "hf_test.json"
    assert evaluate.main(["--policy", str(hf_run / "policy.zip"), "--split", "test", "--budgets", "uniform",
                          "--episodes", "40", "--out", str(hf_out)]) == 0  # fmt: skip
    hf_meta = json.loads(hf_out.read_text())["meta"]
    assert hf_meta["table"]["requests"] == hf_manifest["tables"]["test"]["requests"]
    assert hf_meta["table"]["dataset"]["path"].endswith("data/test.jsonl")
    hf_image = next((hf_assets / "data" / "images").glob("*.png"))
    capsys.readouterr()
    assert answer.main(["--policy", str(hf_run / "policy.zip"), "--budget-ms", "60", "--image", str(hf_image),
                        "--question", "what colour is the image?", "--warmup", "0", "--json"]) == 0  # fmt: skip
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["profile"]["as_trained"]
    # tables of another model's weights are refused
    other = save_model(build_model("tiny", seed=4), tmp_path / "other_model")
    with pytest.raises(AssetsError, match="other weights"):
        Assets(other, tables=hf_assets / "tables", profile=profile).replay("train")


def test_threads_set_torch_and_blas_and_refuse_nonsense(monkeypatch):
    import torch
    from threadpoolctl import threadpool_info

    from envs.threads import default_threads, use_threads

    assert use_threads(1) == 1 and torch.get_num_threads() == 1
    assert all(pool["num_threads"] == 1 for pool in threadpool_info() if pool["user_api"] == "blas")
    monkeypatch.setenv("KNOB_RL_THREADS", "3")
    assert default_threads() == 3
    monkeypatch.setenv("KNOB_RL_THREADS", "many")
    with pytest.raises(ValueError, match="KNOB_RL_THREADS must be a positive integer"):
        default_threads()
    with pytest.raises(ValueError, match="at least 1"):
        use_threads(0)
    torch.set_num_threads(1)


def test_budgets_can_be_fractions_of_the_datas_full_config_latency():
    from envs.outcomes import OutcomeTable

    table = OutcomeTable.load(EMBEDDED / "tiny" / "outcomes" / "train.npz").valid()
    full = next(i for i, c in enumerate(table.configs) if (c.tier, c.top_k, c.blocks) == ("high", 8, 13))
    data = Assets("tiny", quick=True, budget_reference="data")
    assert data.full_ms == pytest.approx(float(np.median(table.latency[:, full])))
    assert data.full_ms != Assets("tiny", quick=True).full_ms
    with pytest.raises(ValueError, match="unknown budget reference 'median'"):
        Assets("tiny", budget_reference="median")
