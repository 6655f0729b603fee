"""The presence probe: linear probes that can tell a readable variable from an absent one."""

import json

import numpy as np
import pytest

from diagnostics.presence_probe import labels, main, probe_accuracy
from envs.tasks.synthvqa import COLOURS, SPLIT_SEEDS, make_sample


def test_probe_reads_a_linear_variable_and_not_noise():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 4, 400)
    x = rng.normal(size=(400, 12))
    x[:, :4] += 5 * np.eye(4)[y]  # the class is written along four directions
    held, majority = probe_accuracy(x, y)
    assert held > 0.95 and majority < 0.4
    noise, majority = probe_accuracy(rng.normal(size=(400, 12)), y)
    assert noise < 0.45  # 12 random features: no better than a little above chance
    with pytest.raises(ValueError, match="both sides"):
        probe_accuracy(x[:2], y[:2])


def test_labels_follow_the_question_and_the_scene():
    samples = [make_sample(13, i, "presence") for i in range(40)]
    got = labels(samples)
    names = list(COLOURS)
    for s, asked, found, answer in zip(samples, got["asked colour"], got["found colour"], got["answer"], strict=True):
        colour, shape = s.question.rstrip("?").split()[-2:]
        assert names[asked] == colour and answer == (s.answer == "yes")
        small = [o for o in s.objects if o.size <= 10.5 and o.label == f"shape:{shape}"]
        assert (found == -1) == (len(small) != 1)
        if found >= 0:
            assert names[found] == small[0].colour
            assert (names[found] == colour) == (s.answer == "yes")
    assert (got["found colour"] >= 0).sum() > 10


@pytest.mark.slow
def test_presence_probe_writes_a_row_per_layer_and_refuses_bad_input(vlm_dir, tmp_path, capsys):
    out = tmp_path / "probe.md"
    assert main(["--model", vlm_dir, "--seed", "11", "--n", "40", "--layers", "2", "1", "--out", str(out)]) == 0
    result = json.loads(out.with_suffix(".json").read_text())
    assert [r["layer"] for r in result["layers"]] == [1, 2] and result["n"] == 40
    for row in result["layers"]:
        assert all(0 <= row[k] <= 1 for k in ("asked colour", "found colour", "answer"))
    assert out.read_text().count("\n| ") == 3  # header and two layers
    for bad in (["--seed", str(SPLIT_SEEDS["train"])], ["--layers", "16"], ["--n", "5"]):
        with pytest.raises(SystemExit):
            main(["--model", vlm_dir, *bad])
    capsys.readouterr()
