"""Text tokenizer: a `tokenizers.Tokenizer` plus the Molmo special tokens the VLM needs.

The tiny model uses a word-level vocabulary built here (no download); a converted real checkpoint
brings its own `tokenizer.json`, which must contain the same special tokens.
"""

from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer, decoders, normalizers, pre_tokenizers
from tokenizers.models import WordLevel

from envs.atomic import atomic_path
from envs.vlm.errors import CheckpointError

SPECIAL_TOKENS = {
    "pad": "<pad>",
    "unk": "<unk>",
    "bos": "<bos>",
    "eos": "<eos>",
    "im_start": "<im_start>",
    "im_end": "<im_end>",
    "im_col": "<im_col>",
    "im_patch": "<im_patch>",
}
# Molmo's (OLMo tokenizer) spellings, tried when ours are absent.
MOLMO_SPELLINGS = {
    "pad": "<|padding|>",
    "unk": "<|endoftext|>",
    "bos": "<|endoftext|>",
    "eos": "<|endoftext|>",
}

# Words for synthetic scene questions and answers; anything else maps to <unk>.
BASE_WORDS = (
    "user assistant what which where how many is are there a an the of in on at to and or "
    "colour color shape size largest smallest biggest big small large tiny left right top bottom "
    "upper lower middle centre center corner image picture scene glyph letter digit number "
    "written shown sum plus minus difference count circle circles square squares triangle triangles "
    "star stars shape shapes object objects red green blue yellow purple orange white black gray grey "
    "pink brown cyan yes no more fewer than greater less same different zero one two three four "
    "five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen seventeen "
    "eighteen nineteen twenty does do any next bigger smaller first second digits letters "
    "circles squares triangles stars"
).split()


def build_word_tokenizer(words: list[str] | tuple[str, ...] = BASE_WORDS) -> Tokenizer:
    """A lowercase word-level tokenizer: specials, letters, punctuation, numbers 0-99, then `words`."""
    vocab: dict[str, int] = {}
    chars = list("abcdefghijklmnopqrstuvwxyz?.,:;!'-+=") + [str(i) for i in range(100)]
    for tok in [*SPECIAL_TOKENS.values(), *chars, *words]:
        vocab.setdefault(tok, len(vocab))
    tok = Tokenizer(WordLevel(vocab, unk_token=SPECIAL_TOKENS["unk"]))
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    tok.add_special_tokens(list(SPECIAL_TOKENS.values()))
    return tok


class TextTokenizer:
    """Encodes prompts and decodes answers; knows the ids of the special tokens."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self.ids: dict[str, int] = {}
        for name, text in SPECIAL_TOKENS.items():
            idx = tokenizer.token_to_id(text)
            if idx is None and name in MOLMO_SPELLINGS:
                idx = tokenizer.token_to_id(MOLMO_SPELLINGS[name])
            if idx is None:
                raise CheckpointError(f"tokenizer lacks the special token {text!r}")
            self.ids[name] = idx

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size()

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True).strip()

    def prompt_ids(self, question: str, start_with_space: bool = False) -> list[int]:
        """Molmo's chat format: 'User: {question} Assistant:', led by a space where the model's config
        sets `always_start_with_space` (Molmo's does: its first token is then 'ĠUser')."""
        return self.encode(f"{' ' if start_with_space else ''}User: {question} Assistant:")

    def save(self, path: Path) -> None:
        with atomic_path(path) as tmp:
            self.tokenizer.save(str(tmp))

    @classmethod
    def load(cls, path: Path) -> TextTokenizer:
        if not Path(path).is_file():
            raise CheckpointError(f"missing tokenizer file {path}")
        return cls(Tokenizer.from_file(str(path)))
