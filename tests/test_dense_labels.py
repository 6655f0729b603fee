"""Crop regions in source pixels, and the per-token targets of the dense auxiliary loss."""

from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from envs.tasks.dense_labels import CLASSES, COLOUR_CLASSES, IGNORE, token_targets
from envs.tasks.dense_scenes import make_dense_sample
from envs.tasks.synthvqa import DIGIT_PT, GLYPH_PT, SceneObject, _font, make_sample, shown_glyph
from envs.vlm.crops import make_crops
from envs.vlm.presets import get_preset
from training.vision_probe import VisionProbe, probe_targets

VISION = get_preset("tiny").vision
MAX_CROPS = get_preset("tiny").knobs.max_crops


@pytest.mark.parametrize("h,w", [(160, 160), (60, 200), (130, 90)])
@pytest.mark.parametrize("tier", ["low", "medium", "high"])
def test_regions_map_source_pixels_to_where_each_view_shows_them(h, w, tier):
    """A white dot drawn at a source point appears where each view's region says it should."""
    y, x = 0.37 * h, 0.71 * w
    img = Image.new("RGB", (w, h), (0, 0, 0))
    ImageDraw.Draw(img).ellipse((x - 3, y - 3, x + 3, y + 3), fill=(255, 255, 255))
    crops = make_crops(img, MAX_CROPS[tier], VISION)
    assert crops.regions.shape == (crops.n_crops, 4)
    seen = 0
    for pixels, (top, left, bottom, right) in zip(crops.pixels, crops.regions, strict=True):
        size = pixels.shape[-1]
        cy, cx = (y - top) / (bottom - top) * size, (x - left) / (right - left) * size
        if 2 <= cy < size - 2 and 2 <= cx < size - 2:
            seen += 1
            brightness = pixels.mean(axis=0)
            assert brightness[int(cy), int(cx)] > brightness.mean() + 1.0  # the dot is there
    assert seen >= 1 + (tier != "low")  # the global view and at least one tiled crop


def test_high_tier_crops_of_a_160px_scene_tile_it_at_native_scale():
    crops = make_crops(make_sample(0, 0).image, MAX_CROPS["high"], VISION)
    np.testing.assert_allclose(crops.regions[0], [0, 0, 160, 160])
    np.testing.assert_allclose(crops.regions[1:4, 1], [0, 48, 96])  # 64 px crops every 48 px
    np.testing.assert_allclose(crops.regions[1:, 2] - crops.regions[1:, 0], 64)


def test_every_drawn_object_is_annotated():
    for i in range(20):
        s = make_sample(5, i)
        labels = Counter(o.label.split(":")[0] for o in s.objects)
        if s.family == "glyph":  # one letter, inside the corner the question names
            (letter,) = [o for o in s.objects if o.label.startswith("letter")]
            assert letter.label == f"letter:{s.answer}"
            top, left = "top" in s.question, "left" in s.question
            assert (letter.cy < 80) == top and (letter.cx < 80) == left
        if s.family == "sum":
            assert labels["digit"] == 2 and sum(int(o.label[-1]) for o in s.objects if "digit" in o.label) == int(
                s.answer
            )
        if s.family == "count":
            shape = s.question.split()[2][:-1]
            assert sum(o.label == f"shape:{shape}" for o in s.objects) == int(s.answer)
        assert all(o.label in CLASSES and o.colour in COLOUR_CLASSES for o in s.objects)


def _targets(sample, tier):
    crops = make_crops(sample.image, MAX_CROPS[tier], VISION)
    cls, col = token_targets(sample.objects, crops, VISION.tokens_per_side)
    assert cls.shape == col.shape == (crops.n_crops * VISION.tokens_per_side**2,)
    return [CLASSES[c] if c != IGNORE else "ignore" for c in cls], col


def test_small_letters_are_asked_about_only_at_the_high_tier():
    glyph = next(s for i in range(10) if (s := make_sample(0, i)).family == "glyph")
    letters = {o.label for o in glyph.objects if o.label.startswith("letter")}
    high, _ = _targets(glyph, "high")
    assert letters <= set(high)  # each letter is some token's target at native size
    for tier in ("low", "medium"):
        labels, _ = _targets(glyph, tier)
        assert not letters & set(labels) and "ignore" in labels  # illegible: ignored, never "none"


def test_letters_need_13_px_on_the_crop_whatever_the_general_threshold():
    crops = make_crops(Image.new("RGB", (160, 160), "white"), MAX_CROPS["medium"], VISION)  # tiles at 0.7x
    letters = (SceneObject("letter:a", "black", 40.0, 40.0, 16.0), SceneObject("letter:w", "blue", 40.0, 120.0, 21.0))
    labels = [CLASSES[c] if c != IGNORE else "ignore" for c in token_targets(letters, crops, 4)[0]]
    assert "letter:w" in labels and "letter:a" not in labels  # 21 px -> 14.7 px asked; 16 px -> 11.2 px not
    assert labels[:16].count("ignore") == 2  # the global view (0.4x) asks about neither
    high = make_crops(Image.new("RGB", (160, 160), "white"), MAX_CROPS["high"], VISION)
    assert {"letter:a", "letter:w"} <= {CLASSES[c] for c in token_targets(letters, high, 4)[0] if c != IGNORE}


def test_large_digits_are_legible_from_the_global_view_and_colours_follow_classes():
    digits = next(s for i in range(10) if (s := make_sample(0, i)).family == "sum")
    labels, col = _targets(digits, "low")
    for o in digits.objects:
        if o.label.startswith("digit"):
            hits = [i for i, lab in enumerate(labels) if lab == o.label]
            assert hits and all(COLOUR_CLASSES[col[i]] in {x.colour for x in digits.objects if x.label == o.label}
                                for i in hits)  # fmt: skip
    assert all(c == 0 for lab, c in zip(labels, col, strict=True) if lab == "none")


def test_an_empty_image_is_none_everywhere_and_a_tiny_object_is_ignored():
    crops = make_crops(Image.new("RGB", (160, 160), "white"), MAX_CROPS["medium"], VISION)
    cls, col = token_targets((), crops, 4)
    assert (cls == 0).all() and (col == 0).all()
    dot = (SceneObject("shape:circle", "red", 10.0, 10.0, 4.0),)  # 4 px: below 6 px even at 1x
    cls, _ = token_targets(dot, crops, 4)
    assert (cls == IGNORE).sum() == 2 and cls[0] == IGNORE and cls[16] == IGNORE  # global + first tile


def test_probe_loss_learns_token_targets():
    """The probe's loss falls when token features carry the targets (and stays finite)."""
    torch.manual_seed(0)
    samples = [make_sample(0, i) for i in range(10)]
    crops = [make_crops(s.image, MAX_CROPS["high"], VISION) for s in samples]
    targets = [token_targets(s.objects, c, 4)[0] for s, c in zip(samples, crops, strict=True)]
    onehot = torch.nn.functional.one_hot(torch.from_numpy(np.concatenate(targets)).clamp(min=0), 96).float()
    tokens = (onehot + 0.1 * torch.randn_like(onehot)).view(-1, 16, 96)
    probe = VisionProbe(96)
    opt = torch.optim.Adam(probe.parameters(), 1e-2)
    first = probe.loss(tokens, probe_targets(samples, crops, 4)).item()
    for _ in range(100):
        loss = probe.loss(tokens, probe_targets(samples, crops, 4))
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert first > 3.0 and loss.item() < 0.5 * first


def test_inside_a_large_shape_only_the_colour_is_asked():
    crops = make_crops(Image.new("RGB", (160, 160), "white"), MAX_CROPS["low"], VISION)
    big = (SceneObject("shape:square", "green", 80.0, 80.0, 100.0),)  # covers the middle 2x2 tokens and more
    cls, col = token_targets(big, crops, 4)
    centre = 2 * 4 + 2  # the token holding (80, 80)
    assert CLASSES[cls[centre]] == "shape:square" and COLOUR_CLASSES[col[centre]] == "green"
    covered = [i for i in range(16) if i != centre and col[i] > 0]
    assert len(covered) >= 3 and all(cls[i] == IGNORE for i in covered)
    assert all(cls[i] == 0 and col[i] == 0 for i in range(16) if i != centre and i not in covered)


def test_dense_scenes_are_deterministic_packed_and_use_the_task_sizes():
    a, b = make_dense_sample(0, 3), make_dense_sample(0, 3)
    assert a.image.tobytes() == b.image.tobytes() and a.objects == b.objects
    assert make_dense_sample(1, 3).image.tobytes() != a.image.tobytes()
    task = [make_sample(0, i) for i in range(20)]
    dense = [make_dense_sample(0, i) for i in range(20)]
    per_image = sum(len(s.objects) for s in dense) / 20
    assert per_image > 4 * sum(len(s.objects) for s in task) / 20  # many more labelled objects per image
    for s in dense:
        assert all(o.label in CLASSES and o.colour in COLOUR_CLASSES for o in s.objects)
        for o in s.objects:  # glyphs at the sizes the questions use: 16 px capitals, 40 pt digits
            kind, char = o.label.split(":")
            if kind != "shape":
                left, top, right, bottom = ImageDraw.Draw(Image.new("RGB", (1, 1))).textbbox(
                    (0, 0), shown_glyph(char), font=_font(GLYPH_PT if kind == "letter" else DIGIT_PT)
                )
                assert o.size == max(right - left, bottom - top)
    labels, _ = _targets(dense[0], "high")
    assert sum(lab.startswith("letter") for lab in labels) >= 8  # a warm-up image asks about many letters


def test_probe_accuracy_counts_each_group_over_the_tokens_it_asks_about():
    samples = [make_sample(0, i) for i in range(5)]
    crops = [make_crops(s.image, MAX_CROPS["high"], VISION) for s in samples]
    cls = np.concatenate([token_targets(s.objects, c, 4)[0] for s, c in zip(samples, crops, strict=True)])
    probe = VisionProbe(96)
    with torch.no_grad():  # a probe that always answers "letter:a" and colour "red"
        probe.cls.weight.zero_(), probe.colour.weight.zero_(), probe.cls.bias.fill_(0), probe.colour.bias.fill_(0)
        probe.cls.bias[CLASSES.index("letter:a")] = 1.0
        probe.colour.bias[COLOUR_CLASSES.index("red")] = 1.0
    got = probe.accuracy(torch.randn(len(cls) // 16, 16, 96), probe_targets(samples, crops, 4))
    letters = [c for c in cls if c >= 0 and CLASSES[c].startswith("letter")]
    assert got["letter"] == (sum(CLASSES[c] == "letter:a" for c in letters), len(letters))
    assert got["shape"][0] == 0 and got["shape"][1] == sum(c >= 0 and CLASSES[c].startswith("shape") for c in cls)
    assert 0 < got["colour"][0] < got["colour"][1]


def test_probe_refuses_targets_of_another_batch():
    samples = [make_sample(0, i) for i in range(3)]
    crops = [make_crops(s.image, MAX_CROPS["low"], VISION) for s in samples]
    targets = probe_targets(samples, crops, 4)
    with pytest.raises(ValueError, match="token targets"):
        VisionProbe(96).loss(torch.randn(len(targets[0]) // 16 + 1, 16, 96), targets)
