"""SynthVQA, dataset loaders and VQA metrics."""

import json
from collections import Counter

import numpy as np
import pytest
from PIL import Image

from envs.tasks.data import Sample, export_manifest, load_manifest, load_vqav2
from envs.tasks.synthvqa import (
    COLOURS,
    FAMILIES,
    SMALL_SIZE,
    SceneObject,
    SynthVQA,
    complement,
    make_sample,
    presence_kind,
    vocabulary,
)
from envs.vlm.metrics import exact_match, normalize_answer, vqa_soft_accuracy
from envs.vlm.tokenizer import TextTokenizer, build_word_tokenizer


def test_synthvqa_is_deterministic_per_seed_and_index():
    a, b, c = make_sample(5, 17), make_sample(5, 17), make_sample(6, 17)
    assert np.array_equal(np.asarray(a.image), np.asarray(b.image)) and a.question == b.question
    assert not np.array_equal(np.asarray(a.image), np.asarray(c.image))
    assert a.image.size == (160, 160)


def test_synthvqa_split_is_balanced_and_answers_are_plausible():
    split = list(SynthVQA(11, 250))
    assert Counter(s.family for s in split) == dict.fromkeys(FAMILIES, 50)
    by = {f: [s.answer for s in split if s.family == f] for f in FAMILIES}
    assert set(by["presence"]) == {"yes", "no"} and 15 < by["presence"].count("yes") < 35
    assert all(0 <= int(a) <= 6 for a in by["count"]) and len(set(by["count"])) >= 5
    assert all(0 <= int(a) <= 18 for a in by["sum"])
    assert all(len(a) == 1 and a.isalpha() for a in by["glyph"]) and len(set(by["glyph"])) > 15
    assert len(set(by["colour"])) >= 6
    assert all(len(s.answers) == 10 for s in split)


def test_every_question_and_answer_word_is_in_the_tiny_vocabulary():
    tok = TextTokenizer(build_word_tokenizer())
    unk = tok.ids["unk"]
    for s in SynthVQA(3, 100):
        assert unk not in tok.encode(s.question), s.question
        assert tok.decode(tok.encode(s.answer)) == s.answer
    assert all(tok.tokenizer.token_to_id(w) is not None for w in vocabulary())


def _small_present(sample, question: str) -> bool:
    colour, shape = question.rstrip("?").split()[-2:]
    return any(o.label == f"shape:{shape}" and o.colour == colour and o.size <= SMALL_SIZE for o in sample.objects)


@pytest.mark.parametrize("mode", ["hard", "easy", "attribute"])
def test_complement_asks_the_same_scene_with_the_other_answer(mode):
    samples = list(SynthVQA(12, 200))
    attribute_questions = 0
    for s in samples:
        c = complement(s, mode)
        if s.family not in ("presence", "count"):
            assert c is None
            continue
        assert c.image is s.image and c.objects == s.objects and c.question != s.question
        assert complement(s, mode).question == c.question  # deterministic
        small = [o for o in s.objects if o.size <= SMALL_SIZE]
        if s.family == "presence" and c.question.startswith("what colour is the small "):
            assert mode == "attribute"
            attribute_questions += 1
            shape = c.question.rstrip("?").split()[-1]
            of_shape = [o for o in small if o.label == f"shape:{shape}"]
            assert len(of_shape) == 1 and c.answer == of_shape[0].colour  # one small object of that shape
            asked = s.question.rstrip("?").split()[-1]
            if sum(o.label == f"shape:{asked}" for o in small) == 1:
                assert shape == asked  # the asked shape wherever it qualifies
        elif s.family == "presence":
            assert {s.answer, c.answer} == {"yes", "no"}
            if mode == "attribute":  # falls back to a hard pair only where no small shape is unique
                shapes = [o.label for o in small]
                assert all(shapes.count(x) > 1 for x in shapes)
            if (
                c.answer == "no"
            ):  # a hard negative shares one attribute with a small object; an easy one never the colour
                colour, shape = c.question.rstrip("?").split()[-2:]
                shares = [o.colour == colour or o.label == f"shape:{shape}" for o in small]
                assert not any(o.colour == colour for o in small) if mode == "easy" else any(shares)
            # the annotation rule agrees with the generator's own answer and gives the complement's
            assert _small_present(s, s.question) == (s.answer == "yes")
            assert _small_present(c, c.question) == (c.answer == "yes")
        else:
            for q in (s, c):
                shape = q.question.split()[2][:-1]
                assert int(q.answer) == sum(o.label == f"shape:{shape}" for o in s.objects)
    assert (attribute_questions > 20) == (mode == "attribute")


@pytest.mark.slow
def test_recolour_pairs_repaint_one_small_object_and_flip_the_answer():
    kinds, shown = Counter(), 0
    for s in SynthVQA(12, 600, families=("presence",)):
        c = complement(s, "recolour")
        assert c.id == s.id + "-c" and complement(s, "recolour").question == c.question  # deterministic
        if c.question != s.question:  # no small object of the asked shape: an attribute question instead
            assert presence_kind(s) == "colour elsewhere"
            kinds["other"] += 1
            continue
        before, after = np.asarray(s.image).astype(int), np.asarray(c.image).astype(int)
        changed = (before != after).any(-1)
        repainted = [(o, p) for o, p in zip(s.objects, c.objects, strict=True) if o != p]
        assert len(repainted) == 1  # one annotation changes, only its colour
        old, new = repainted[0]
        assert new == old._replace(colour=new.colour) and new.colour != old.colour
        ys, xs = np.nonzero(changed)
        assert 40 <= changed.sum() <= 110  # the whole 10 px shape, nothing else
        assert abs(ys.mean() - old.cy) < 1.5 and abs(xs.mean() - old.cx) < 1.5
        assert (after[changed] == COLOURS[new.colour]).all() and (before[changed] == COLOURS[old.colour]).all()
        assert c.answer != s.answer and _small_present(c, c.question) == (c.answer == "yes")
        kinds[(presence_kind(s), presence_kind(c))] += 1
        shown += 1
    assert set(kinds) <= {
        ("present", "shape elsewhere"), ("present", "both elsewhere"), ("shape elsewhere", "present"),
        ("both elsewhere", "present"), "other",
    }  # fmt: skip
    assert shown > 0.8 * sum(kinds.values())  # most presence questions get an image pair


@pytest.mark.parametrize(
    ("small", "kind"),
    [
        ([("star", "red"), ("circle", "blue")], "present"),
        ([("star", "blue"), ("circle", "green")], "shape elsewhere"),
        ([("circle", "red")], "colour elsewhere"),
        ([("star", "blue"), ("circle", "red")], "both elsewhere"),
        ([("circle", "blue")], "neither"),
    ],
)
def test_presence_kind_says_what_the_small_objects_share_with_the_question(small, kind):
    objects = [SceneObject(f"shape:{x}", c, 20.0 + 30 * i, 40.0, 10) for i, (x, c) in enumerate(small)]
    objects.append(SceneObject("shape:star", "red", 120.0, 120.0, 30))  # a large red star is not small
    s = Sample("t", None, "is there a small red star?", ["no"] * 10, "presence", tuple(objects))
    assert presence_kind(s) == kind


def test_presence_kind_matches_the_generators_answers_and_refuses_other_families():
    for s in SynthVQA(5, 300):
        if s.family == "presence":
            assert (presence_kind(s) == "present") == (s.answer == "yes")
            assert presence_kind(s) != "neither"  # every test negative is a hard one
    with pytest.raises(ValueError, match="presence question"):
        presence_kind(make_sample(5, 0, "colour"))


def test_complement_refuses_an_unknown_mode():
    with pytest.raises(ValueError, match="pair mode"):
        complement(make_sample(0, 1), "colour")


@pytest.mark.parametrize("mode", ["hard", "easy", "attribute", "recolour"])
def test_task_batch_puts_each_complement_after_its_question(mode):
    from training.batches import task_batch

    plain = task_batch(make_sample, 0, 3, 32, pairs="none")
    paired = task_batch(make_sample, 0, 3, 32, pairs=mode)
    assert len(plain) == len(paired) == 32 and [s.id for s in plain] == [f"synthvqa-0-{96 + i}" for i in range(32)]
    for prev, s in zip(paired[:-1], paired[1:], strict=True):
        if s.id.endswith("-c"):
            assert s.id == prev.id + "-c" and (s.image is prev.image or mode == "recolour")
            assert s.image.size == prev.image.size
    assert sum(s.id.endswith("-c") for s in paired) >= 8
    assert [s.question for s in paired] == [s.question for s in task_batch(make_sample, 0, 3, 32, pairs=mode)]


def test_unknown_family():
    with pytest.raises(ValueError, match="unknown SynthVQA famil"):
        SynthVQA(0, 10, families=("colour", "poetry"))


def test_manifest_round_trip(tmp_path):
    samples = list(SynthVQA(4, 6))
    path = export_manifest(samples, tmp_path)
    loaded = load_manifest(path)
    assert [s.question for s in loaded] == [s.question for s in samples]
    assert [s.answers for s in loaded] == [s.answers for s in samples]
    assert [s.family for s in loaded] == [s.family for s in samples]
    for a, b in zip(samples, loaded, strict=True):
        assert np.array_equal(np.asarray(a.image), np.asarray(Image.open(b.image).convert("RGB")))


@pytest.mark.parametrize(
    "line,match",
    [('{"image": "x.png", "question": "q"}', "answers"), ("not json", "not a manifest row"),
     ('{"image": "x.png", "question": "q", "answers": []}', "non-empty")],
)  # fmt: skip
def test_bad_manifest_rows_name_the_line(tmp_path, line, match):
    path = tmp_path / "m.jsonl"
    path.write_text('{"image": "a.png", "question": "q", "answers": ["x"]}\n' + line + "\n")
    with pytest.raises(ValueError, match=rf"m.jsonl:2: .*{match}"):
        load_manifest(path)


def test_vqav2_loader(tmp_path):
    (tmp_path / "img").mkdir()
    for image_id in (42, 7):
        Image.new("RGB", (8, 8)).save(tmp_path / "img" / f"COCO_val2014_{image_id:012d}.jpg")
    questions = {"questions": [{"image_id": 42, "question": "what?", "question_id": 420},
                               {"image_id": 7, "question": "how many?", "question_id": 70}]}  # fmt: skip
    answers = [{"answer": "2"}] * 6 + [{"answer": "two"}] * 2 + [{"answer": "3"}] * 2
    annotations = {"annotations": [{"question_id": 420, "answers": [{"answer": "red"}] * 10, "answer_type": "other"},
                                   {"question_id": 70, "answers": answers, "answer_type": "number"}]}  # fmt: skip
    (tmp_path / "q.json").write_text(json.dumps(questions))
    (tmp_path / "a.json").write_text(json.dumps(annotations))
    samples = load_vqav2(tmp_path / "q.json", tmp_path / "a.json", tmp_path / "img")
    assert [s.id for s in samples] == ["420", "70"]
    assert samples[1].image.name == "COCO_val2014_000000000007.jpg"
    assert samples[1].family == "number" and samples[1].answer == "2"
    assert vqa_soft_accuracy("two", samples[1].answers) == 1.0  # 8 of 10 say 2 after normalisation


@pytest.mark.parametrize(
    "raw,norm",
    [("Two.", "2"), ("the Red", "red"), ("  yes!", "yes"), ("a dog", "dog"), ("3.5", "3.5"), ("dont", "don't")],
)
def test_normalize_answer(raw, norm):
    assert normalize_answer(raw) == norm


def test_vqa_soft_accuracy_leave_one_out():
    answers = ["cat"] * 3 + ["dog"] * 7
    assert vqa_soft_accuracy("cat", answers) == pytest.approx((3 * 2 / 3 + 7 * 1) / 10)
    assert vqa_soft_accuracy("cow", ["cow"] + ["dog"] * 9) == pytest.approx(9 * (1 / 3) / 10)
    assert vqa_soft_accuracy("dog", answers) == 1.0
    assert exact_match("Dog", answers) == 1.0 and exact_match("cat", answers) == 0.0


def test_sample_majority_answer():
    assert Sample("1", Image.new("RGB", (4, 4)), "q", ["a", "b", "b"]).answer == "b"
