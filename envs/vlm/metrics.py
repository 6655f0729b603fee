"""VQA answer normalisation, exact match and VQA soft accuracy (the official evaluation's rules)."""

from __future__ import annotations

import re

NUMBER_WORDS = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5", "six": "6",
    "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}  # fmt: skip
ARTICLES = {"a", "an", "the"}
CONTRACTIONS = {
    "dont": "don't", "doesnt": "doesn't", "isnt": "isn't", "arent": "aren't", "cant": "can't", "wont": "won't",
    "didnt": "didn't", "wasnt": "wasn't", "im": "i'm", "ive": "i've", "youre": "you're", "thats": "that's",
}  # fmt: skip
PUNCT = [";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!"]
_PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")
_COMMA_STRIP = re.compile(r"(\d)(,)(\d)")


def normalize_answer(text: str) -> str:
    """Lowercase; strip punctuation (keeping decimal points); number words to digits; drop articles."""
    text = text.replace("\n", " ").replace("\t", " ").strip().lower()
    for p in PUNCT:
        if (p + " " in text or " " + p in text) or _COMMA_STRIP.search(text) is not None:
            text = text.replace(p, "")
        else:
            text = text.replace(p, " ")
    text = _PERIOD_STRIP.sub("", text)
    words = []
    for w in text.split():
        w = NUMBER_WORDS.get(w, w)
        if w not in ARTICLES:
            words.append(CONTRACTIONS.get(w, w))
    return " ".join(words)


def exact_match(prediction: str, answers: list[str]) -> float:
    """1.0 when the normalised prediction equals the normalised majority answer."""
    if not answers:
        raise ValueError("exact match needs at least one reference answer")
    normed = [normalize_answer(a) for a in answers]
    majority = max(set(normed), key=lambda a: (normed.count(a), a))
    return float(normalize_answer(prediction) == majority)


def vqa_soft_accuracy(prediction: str, answers: list[str]) -> float:
    """min(#matching annotators / 3, 1) averaged over the leave-one-out subsets of the annotators."""
    if not answers:
        raise ValueError("VQA accuracy needs at least one reference answer")
    pred = normalize_answer(prediction)
    normed = [normalize_answer(a) for a in answers]
    if len(normed) == 1:
        return float(pred == normed[0])
    scores = []
    for i in range(len(normed)):
        others = normed[:i] + normed[i + 1 :]
        scores.append(min(1.0, sum(a == pred for a in others) / 3))
    return sum(scores) / len(scores)
