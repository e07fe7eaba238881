"""A word-level tokenizer for the CLIP text towers; imports neither framework.

Ids: `<pad>` 0, `<unk>` 1, the words, then `<start_of_text>` and `<end_of_text>` last, so that
the end-of-text token has the largest id and `tokens.argmax(-1)` finds it, as in CLIP. Every text
becomes `[sot, words..., eot]` cut to `context_length` (the last kept token is always `eot`) and
padded with 0. Saved as JSON beside a checkpoint (`tokenizer.json`).
"""

from __future__ import annotations

import collections
import json
import os
import re
from typing import Iterable, Sequence

import numpy as np

PAD, UNK, SOT, EOT = "<pad>", "<unk>", "<start_of_text>", "<end_of_text>"
FILENAME = "tokenizer.json"
_WORD = re.compile(r"[a-z0-9]+|[^\sa-z0-9]")


def split_words(text: str) -> list[str]:
    """Lower-cased runs of letters and digits, and each other non-space character alone."""
    return _WORD.findall(text.lower())


class Tokenizer:
    """texts -> (N, context_length) int64 ids; `decode` gives the words back."""

    def __init__(self, words: Sequence[str], context_length: int = 77):
        if context_length < 2:
            raise ValueError(f"context_length {context_length} leaves no room for <sot> and <eot>")
        words = list(dict.fromkeys(words))
        special = {PAD, UNK, SOT, EOT} & set(words)
        if special:
            raise ValueError(f"special tokens among the words: {sorted(special)}")
        self.context_length = context_length
        self.vocab = [PAD, UNK, *words, SOT, EOT]
        self.ids = {w: i for i, w in enumerate(self.vocab)}
        self.pad_id, self.unk_id, self.sot_id, self.eot_id = 0, 1, len(self.vocab) - 2, len(self.vocab) - 1

    @classmethod
    def from_texts(cls, texts: Iterable[str], context_length: int = 77, min_count: int = 1,
                   max_words: int | None = None) -> "Tokenizer":
        """The words of `texts` seen at least `min_count` times, most frequent first (ties in
        alphabetical order), at most `max_words` of them."""
        counts = collections.Counter(w for t in texts for w in split_words(t))
        words = sorted((w for w, c in counts.items() if c >= min_count), key=lambda w: (-counts[w], w))
        return cls(words[:max_words], context_length)

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    def encode(self, text: str) -> list[int]:
        """[sot, ids..., eot] without padding, cut to `context_length` keeping `eot` last."""
        ids = [self.ids.get(w, self.unk_id) for w in split_words(text)]
        return [self.sot_id, *ids[: self.context_length - 2], self.eot_id]

    def __call__(self, texts: str | Sequence[str]) -> np.ndarray:
        """(N, context_length) int64 ids, padded with 0; a single string gives N = 1."""
        texts = [texts] if isinstance(texts, str) else list(texts)
        out = np.full((len(texts), self.context_length), self.pad_id, np.int64)
        for row, text in zip(out, texts):
            ids = self.encode(text)
            row[: len(ids)] = ids
        return out

    def decode(self, ids: Iterable[int]) -> str:
        """The words between `sot` and `eot` (padding and special tokens dropped, `<unk>` kept)."""
        skip = {self.pad_id, self.sot_id}
        words = []
        for i in (int(i) for i in ids):
            if i == self.eot_id:
                break
            if i not in skip:
                words.append(self.vocab[i])
        return " ".join(words)

    def save(self, path: str | os.PathLike) -> str:
        """Write JSON to `path`, or to `path/tokenizer.json` when `path` is a directory."""
        path = os.path.join(path, FILENAME) if os.path.isdir(path) else os.fspath(path)
        with open(path, "w") as f:
            json.dump({"context_length": self.context_length, "vocab": self.vocab}, f, indent=0)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Tokenizer":
        path = os.path.join(path, FILENAME) if os.path.isdir(path) else os.fspath(path)
        with open(path) as f:
            spec = json.load(f)
        vocab = spec["vocab"]
        if vocab[:2] != [PAD, UNK] or vocab[-2:] != [SOT, EOT]:
            raise ValueError(f"{path}: not a tokenizer file (special tokens out of place)")
        return cls(vocab[2:-2], spec["context_length"])

    def __eq__(self, other) -> bool:
        return (isinstance(other, Tokenizer) and self.vocab == other.vocab
                and self.context_length == other.context_length)

    def __repr__(self) -> str:
        return f"Tokenizer(vocab_size={self.vocab_size}, context_length={self.context_length})"
