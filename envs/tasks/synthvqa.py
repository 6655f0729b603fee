"""SynthVQA: seeded synthetic scenes whose questions need different knobs.

Every sample is a pure function of (split seed, index), so any seed gives a fresh split of the
same difficulty and nothing has to be stored. Images are 160 x 160: the global view sees them at
0.4x, the medium tier (2x2 crops) at 0.7x, the high tier (3x3 crops) at native size.

| family   | question                                   | what it needs                        |
|----------|--------------------------------------------|--------------------------------------|
| colour   | colour of the largest shape                | global view suffices                 |
| presence | is there a small <colour> <shape>?         | medium tier: 10 px objects           |
| glyph    | which letter is in the <corner> corner?    | high tier: one 16 px capital letter  |
| count    | how many <shape>s are there?               | depth                                |
| sum      | sum of the two large digits                | depth and experts                    |
"""

from __future__ import annotations

import math
import zlib
from typing import NamedTuple

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from envs.tasks.data import Sample

SIZE = 160
COLOURS = {
    "red": (220, 30, 30), "green": (30, 160, 50), "blue": (30, 60, 220), "yellow": (230, 200, 20),
    "purple": (140, 40, 180), "orange": (240, 130, 20), "cyan": (20, 190, 200), "black": (20, 20, 20),
}  # fmt: skip
SHAPES = ("circle", "square", "triangle", "star")
LETTERS = "abcdefghijklmnopqrstuvwxyz"
CORNERS = {"top left": (0, 0), "top right": (0, 1), "bottom left": (1, 0), "bottom right": (1, 1)}
FAMILIES = ("colour", "presence", "glyph", "count", "sum")
VERSION = 3  # recorded in every outcome table's dataset entry; bumped whenever a seed's scenes change
# Font sizes: letters (capitals 15-16 px tall, two 8 px patches at native size, 11 px in the medium tier's
# view, 6 px in the global view) and large digits. Letters are drawn as capitals because smaller lower-case
# glyphs are too few pixels for the tiny ViT to learn, and at this size reading one needs the high tier.
GLYPH_PT, DIGIT_PT = 22, 40
SPLIT_SEEDS = {"train": 0, "val": 1, "test": 2, "calibration": 3, "rl_train": 4}
TRAINING_SEEDS = (SPLIT_SEEDS["train"], SPLIT_SEEDS["calibration"])  # splits the model was fit or ranked on


class SceneObject(NamedTuple):
    """What was drawn where: the annotation dense auxiliary training reads."""

    label: str  # "shape:circle", "letter:q", "digit:7"
    colour: str
    cy: float  # centre, source-image pixels
    cx: float
    size: float  # extent in pixels (diameter of a shape, larger side of a glyph)


def _font(size: int) -> ImageFont.FreeTypeFont:
    return ImageFont.load_default(size=size)


def shown_glyph(text: str) -> str:
    """What is drawn for a glyph: its capital (every letter 15-16 px tall at GLYPH_PT; lower case mixes
    x-height letters with taller ones)."""
    return text.upper()


def draw_shape(d: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, fill) -> None:
    if shape == "circle":
        d.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
    elif shape == "square":
        s = r * 0.85
        d.rectangle((cx - s, cy - s, cx + s, cy + s), fill=fill)
    elif shape == "triangle":
        d.polygon([(cx, cy - r), (cx + r * 0.95, cy + r * 0.8), (cx - r * 0.95, cy + r * 0.8)], fill=fill)
    elif shape == "star":
        pts = []
        for i in range(10):
            rad = r if i % 2 == 0 else r * 0.45
            a = -math.pi / 2 + i * math.pi / 5
            pts.append((cx + rad * math.cos(a), cy + rad * math.sin(a)))
        d.polygon(pts, fill=fill)
    else:
        raise ValueError(f"unknown shape {shape!r}")


class _Scene:
    """A canvas that places non-overlapping objects by rejection sampling."""

    def __init__(self, rng: np.random.Generator):
        self.rng = rng
        base = int(rng.integers(200, 245))
        noise = rng.normal(0, 5, (SIZE, SIZE, 3))
        self.image = Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8))
        self.draw = ImageDraw.Draw(self.image)
        self.boxes: list[tuple[float, float, float]] = []
        self.objects: list[SceneObject] = []

    def place(self, r: float, margin: float = 2, region=(0, SIZE, 0, SIZE), tries: int | None = None):
        """A free centre for an object of radius r. tries=None: a task object, which must fit (an error
        after 200 misses); a number: an optional object, given up (None) after that many misses."""
        y0, y1, x0, x1 = region
        for _ in range(200 if tries is None else tries):
            cx = self.rng.uniform(x0 + r + margin, x1 - r - margin)
            cy = self.rng.uniform(y0 + r + margin, y1 - r - margin)
            if all(math.hypot(cx - x, cy - y) > r + rr + margin for x, y, rr in self.boxes):
                self.boxes.append((cx, cy, r))
                return cx, cy
        if tries is None:
            raise RuntimeError("scene too crowded")  # never with the task families' counts
        return None

    def shape(self, shape: str, colour: str, r: float, region=(0, SIZE, 0, SIZE), tries: int | None = None) -> bool:
        centre = self.place(r, region=region, tries=tries)
        if centre is None:
            return False
        cx, cy = centre
        draw_shape(self.draw, shape, cx, cy, r, COLOURS[colour])
        self.objects.append(SceneObject(f"shape:{shape}", colour, cy, cx, 2 * r))
        return True

    def text(self, text: str, size: int, colour: str, region=(0, SIZE, 0, SIZE), tries: int | None = None) -> bool:
        """Draw a digit or a letter (as its capital; answers and labels name it in lower case)."""
        font, shown = _font(size), shown_glyph(text)
        left, top, right, bottom = self.draw.textbbox((0, 0), shown, font=font)
        centre = self.place(max(right - left, bottom - top) / 2 + 1, region=region, tries=tries)
        if centre is None:
            return False
        cx, cy = centre
        self.draw.text((cx - (left + right) / 2, cy - (top + bottom) / 2), shown, font=font, fill=COLOURS[colour])
        kind = "digit" if text.isdigit() else "letter"
        self.objects.append(SceneObject(f"{kind}:{text}", colour, cy, cx, max(right - left, bottom - top)))
        return True


def _pick(rng, seq, exclude=()):
    options = [x for x in seq if x not in exclude]
    return options[int(rng.integers(len(options)))]


def _distractors(scene: _Scene, n: int, r_range=(7, 12), colours=tuple(COLOURS), shapes=SHAPES) -> None:
    for _ in range(n):
        scene.shape(_pick(scene.rng, shapes), _pick(scene.rng, colours), scene.rng.uniform(*r_range))


def _colour(scene: _Scene):
    rng = scene.rng
    colour = _pick(rng, COLOURS)
    scene.shape(_pick(rng, SHAPES), colour, rng.uniform(28, 40))
    _distractors(scene, int(rng.integers(2, 5)), (7, 14), colours=[c for c in COLOURS if c != colour])
    return "what colour is the largest shape?", colour


def _presence(scene: _Scene):
    rng = scene.rng
    colour, shape = _pick(rng, COLOURS), _pick(rng, SHAPES)
    present = bool(rng.integers(2))
    if present:
        scene.shape(shape, colour, 5)
    else:  # a hard negative: right colour, wrong shape, or right shape, wrong colour
        if rng.integers(2):
            scene.shape(_pick(rng, SHAPES, [shape]), colour, 5)
        else:
            scene.shape(shape, _pick(rng, COLOURS, [colour]), 5)
    for _ in range(int(rng.integers(1, 4))):  # other small objects never match the question
        s, c = _pick(rng, SHAPES), _pick(rng, COLOURS)
        if (s, c) != (shape, colour):
            scene.shape(s, c, 5)
    _distractors(scene, int(rng.integers(1, 3)), (12, 18))
    return f"is there a small {colour} {shape}?", "yes" if present else "no"


GLYPH_COLOURS = ("black", "blue", "red", "purple")
DIGIT_COLOURS = tuple(c for c in COLOURS if c not in ("yellow", "cyan"))  # legible on the pale background


def _glyph(scene: _Scene):
    """One small letter, in the corner the question names: reading it, not searching, is the test."""
    rng = scene.rng
    letter = _pick(rng, LETTERS)
    corner = list(CORNERS)[int(rng.integers(4))]
    row, col = CORNERS[corner]
    half = SIZE / 2
    rows = (0, 50) if row == 0 else (half + 30, SIZE)
    cols = (0, 50) if col == 0 else (half + 30, SIZE)
    scene.text(letter, GLYPH_PT, _pick(rng, GLYPH_COLOURS), region=(*rows, *cols))
    _distractors(scene, int(rng.integers(1, 3)), (8, 14))
    return f"which letter is in the {corner} corner?", letter


def _count(scene: _Scene):
    rng = scene.rng
    shape = _pick(rng, SHAPES)
    n = int(rng.integers(0, 7))
    for _ in range(n):
        scene.shape(shape, _pick(rng, COLOURS), rng.uniform(9, 13))
    _distractors(scene, int(rng.integers(0, 4)), (9, 13), shapes=[s for s in SHAPES if s != shape])
    return f"how many {shape}s are there?", str(n)


def _sum(scene: _Scene):
    rng = scene.rng
    a, b = int(rng.integers(10)), int(rng.integers(10))
    c1 = _pick(rng, DIGIT_COLOURS)
    scene.text(str(a), DIGIT_PT, c1, region=(0, SIZE, 0, SIZE / 2))
    scene.text(str(b), DIGIT_PT, _pick(rng, DIGIT_COLOURS, [c1]), region=(0, SIZE, SIZE / 2, SIZE))
    _distractors(scene, int(rng.integers(0, 3)), (6, 10))
    return "what is the sum of the two digits?", str(a + b)


GENERATORS = {"colour": _colour, "presence": _presence, "glyph": _glyph, "count": _count, "sum": _sum}


def make_sample(seed: int, index: int, family: str | None = None) -> Sample:
    """Sample `index` of the split with `seed`; families cycle so every split is balanced."""
    fam = family or FAMILIES[index % len(FAMILIES)]
    if fam not in GENERATORS:
        raise ValueError(f"unknown SynthVQA family {fam!r}; choose one of {list(FAMILIES)}")
    rng = np.random.default_rng([seed, index, FAMILIES.index(fam)])
    scene = _Scene(rng)
    question, answer = GENERATORS[fam](scene)
    return Sample(f"synthvqa-{seed}-{index}", scene.image, question, [answer] * 10, fam, tuple(scene.objects))


SMALL_SIZE = 10.5  # the presence family's small objects are 10 px across (radius 5)


def _small_objects(sample: Sample) -> list[tuple[str, str]]:
    """(shape, colour) of every small object in the scene, repeats kept."""
    return [(o.label.split(":")[1], o.colour) for o in sample.objects if o.size <= SMALL_SIZE]


def _small_of_shape(sample: Sample, shape: str) -> list[SceneObject]:
    """The scene's small objects of `shape`, in drawing order."""
    return [o for o in sample.objects if o.size <= SMALL_SIZE and o.label == f"shape:{shape}"]


def asked_object(question: str) -> tuple[str, str]:
    """(colour, shape) of "is there a small <colour> <shape>?"; the shape of "what colour is the small <shape>?"."""
    colour, shape = question.rstrip("?").split()[-2:]
    return colour, shape


def asks_presence(sample: Sample) -> bool:
    """Whether the sample asks "is there a small <colour> <shape>?" (not the attribute partner
    "what colour is the small <shape>?", which shares the presence family)."""
    return sample.family == "presence" and sample.question.startswith("is there")


def _counted_shape(question: str) -> str:
    """The shape of "how many <shape>s are there?"."""
    return question.split()[2][:-1]


PRESENCE_LOOKS = ("match", "shape")


def asked_objects(sample: Sample, presence: str = "match") -> tuple[SceneObject, ...]:
    """The objects whose presence answers a question, the ones a reader has to look at: the largest
    shape (colour), the small object of the asked colour and shape (presence: none on a "no"), the
    small objects of the asked shape ("what colour is the small <shape>?"), the objects of the asked
    shape (count), the letter (glyph), the digits (sum). Guided-attention training points the answer
    position at them (`training/aids/attention_guide.py`). `presence="shape"` answers "is there a small
    <colour> <shape>?" with the small objects of the asked shape instead, the ones whose colour decides
    (a reader's first step: find the small stars, then check their colour)."""
    if presence not in PRESENCE_LOOKS:
        raise ValueError(f"presence must be one of {PRESENCE_LOOKS}, got {presence!r}")
    objects, family = sample.objects, sample.family
    if family == "colour":
        return (max(objects, key=lambda o: o.size),)
    if family == "presence":
        colour, shape = asked_object(sample.question)
        of_shape = _small_of_shape(sample, shape)
        if asks_presence(sample) and presence == "match":
            return tuple(o for o in of_shape if o.colour == colour)
        return tuple(of_shape)  # its attribute partner
    if family == "count":
        return tuple(o for o in objects if o.label == f"shape:{_counted_shape(sample.question)}")
    if family in ("glyph", "sum"):
        kind = "letter:" if family == "glyph" else "digit:"
        return tuple(o for o in objects if o.label.startswith(kind))
    raise ValueError(f"asked_objects needs a SynthVQA family {FAMILIES}, got {family!r}")


PRESENCE_KINDS = ("present", "shape elsewhere", "colour elsewhere", "both elsewhere", "neither")


def presence_kind(sample: Sample) -> str:
    """What a presence scene's small objects share with the asked (colour, shape): "present", or for a
    "no" which attribute some small object has ("shape elsewhere": a small star, none of them red).
    Splits presence accuracy into what a model checks (diagnostics/error_report.py)."""
    if sample.family != "presence":
        raise ValueError(f"presence_kind needs a presence question, got family {sample.family!r}")
    colour, shape = asked_object(sample.question)
    small = _small_objects(sample)
    if (shape, colour) in small:
        return "present"
    has_shape, has_colour = any(x == shape for x, _ in small), any(c == colour for _, c in small)
    return {(True, False): "shape elsewhere", (False, True): "colour elsewhere", (True, True): "both elsewhere"}.get(
        (has_shape, has_colour), "neither"
    )


PAIR_MODES = ("hard", "easy", "attribute", "recolour")


def complement(sample: Sample, mode: str = "hard") -> Sample | None:
    """The same scene asked another question, or None where the family has none.

    Training aid in the spirit of VQAv2's balanced pairs: with both questions of a pair in one
    batch, an answer that ignores the question's words is wrong on one of them. Presence ("hard"):
    ask about a small object the scene holds when the answer was "no", else about a small object it
    lacks, sharing the colour or the shape (a hard negative, as the test questions have); "easy":
    sharing neither where the scene allows (else only the shape), so that checking one attribute
    already pays; "attribute": ask the colour of a small object whose shape no other small object
    has ("what colour is the small star?", the asked shape where it qualifies), else as "hard".
    A model can answer hard or easy pairs by matching the shape and ignoring the colour; the
    attribute question is the step presence needs, find the small object of a shape and read its
    colour, with eight answers where presence gives one bit. "recolour": the same question about the
    scene with one small object repainted (a minimal image pair, as in counterfactual VQA data): a
    "yes" scene's asked object in another colour (answer "no"), or a "no" scene's small object of
    the asked shape in the asked colour ("yes"); as "attribute" where no small object has the asked
    shape. Here only the colour at one object changes the answer, so answering presence from the
    shape alone is wrong on one question of the pair.
    Count: ask about another shape (every mode); the answer is counted from the annotation.
    """
    if mode not in PAIR_MODES:
        raise ValueError(f"unknown pair mode {mode!r}; choose one of {PAIR_MODES}")
    rng = np.random.default_rng([zlib.crc32(sample.id.encode()), 7])  # stable across processes
    if sample.family == "presence":
        objects = _small_objects(sample)
        small = set(objects)
        colour, shape = asked_object(sample.question)
        if mode == "recolour":
            of_shape = _small_of_shape(sample, shape)
            if of_shape:
                pick = of_shape[int(rng.integers(len(of_shape)))]  # drawn either way, so a seed's pairs never change
                if sample.answer == "no":
                    return _repainted(sample, pick, colour, "yes")
                match = next(o for o in of_shape if o.colour == colour)  # the generator draws exactly one
                return _repainted(sample, match, _pick(rng, COLOURS, [colour]), "no")
            mode = "attribute"
        if mode == "attribute":
            shapes = [x for x, _ in objects]  # with repeats: two green triangles are not "the small triangle"
            unique = sorted(x for x in set(shapes) if shapes.count(x) == 1)
            if unique:
                pick = shape if shape in unique else unique[int(rng.integers(len(unique)))]
                answer = next(c for x, c in small if x == pick)
                return _asked(sample, f"what colour is the small {pick}?", answer)
        if sample.answer == "no":
            shape, colour = sorted(small)[int(rng.integers(len(small)))]
            return _asked(sample, f"is there a small {colour} {shape}?", "yes")
        if mode == "easy":
            shapes = [x for x in SHAPES if x not in {s for s, _ in small}] or list(SHAPES)
            colours = [c for c in COLOURS if c not in {c for _, c in small}]
            options = [(x, c) for x in shapes for c in colours]
        else:
            options = [(x, colour) for x in SHAPES] + [(shape, c) for c in COLOURS]
        options = [o for o in options if o not in small]
        shape, colour = options[int(rng.integers(len(options)))]
        return _asked(sample, f"is there a small {colour} {shape}?", "no")
    if sample.family == "count":
        shape = _pick(rng, SHAPES, [_counted_shape(sample.question)])
        n = sum(o.label == f"shape:{shape}" for o in sample.objects)
        return _asked(sample, f"how many {shape}s are there?", str(n))
    return None


def _repainted(sample: Sample, target: SceneObject, colour: str, answer: str) -> Sample:
    """The sample's question about its scene with `target` (a flat-filled shape; objects never
    overlap) repainted in `colour`; the background's noise never equals a palette colour."""
    pixels = np.array(sample.image)
    r = target.size / 2 + 1
    y0, y1 = max(int(target.cy - r), 0), int(math.ceil(target.cy + r)) + 1
    x0, x1 = max(int(target.cx - r), 0), int(math.ceil(target.cx + r)) + 1
    box = pixels[y0:y1, x0:x1]
    box[(box == COLOURS[target.colour]).all(-1)] = COLOURS[colour]
    objects = tuple(o._replace(colour=colour) if o is target else o for o in sample.objects)
    return Sample(sample.id + "-c", Image.fromarray(pixels), sample.question, [answer] * 10, sample.family, objects)


def _asked(sample: Sample, question: str, answer: str) -> Sample:
    return Sample(sample.id + "-c", sample.image, question, [answer] * 10, sample.family, sample.objects)


class SynthVQA:
    """A split: `SynthVQA(seed, n)[i]` is deterministic; iterate or index lazily."""

    def __init__(self, seed: int, n: int, families: tuple[str, ...] = FAMILIES):
        unknown = set(families) - set(FAMILIES)
        if unknown or not families:
            raise ValueError(f"unknown SynthVQA families {sorted(unknown)}; choose from {list(FAMILIES)}")
        if n < 0:
            raise ValueError("n must be >= 0")
        self.seed, self.n, self.families = seed, n, tuple(families)

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> Sample:
        if not 0 <= i < self.n:
            raise IndexError(i)
        return make_sample(self.seed, i, self.families[i % len(self.families)])

    def __iter__(self):
        return (self[i] for i in range(self.n))


def dataset_spec(seed: int, n: int) -> dict:
    """The dataset entry an outcome table records for a SynthVQA split (with the generator's version)."""
    return {"kind": "synthvqa", "version": VERSION, "seed": seed, "n": n}


def vocabulary() -> list[str]:
    """Every word a SynthVQA question or answer uses (the tiny tokenizer must know them all)."""
    words = {"what", "colour", "is", "the", "largest", "shape", "there", "a", "small", "which", "letter", "in",
             "corner", "how", "many", "are", "sum", "of", "two", "digits", "yes", "no", "top", "bottom", "left",
             "right"}  # fmt: skip
    words |= set(COLOURS) | set(SHAPES) | {s + "s" for s in SHAPES} | set(LETTERS) | {str(i) for i in range(19)}
    return sorted(words)
