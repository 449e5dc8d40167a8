"""Tokenisers behind one small interface: a Hugging Face tokenizer, or a byte-level one for
the tiny random models the tests use (no vocabulary files, works on any text, offline).
"""

from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True)
class ByteTokenizer:
    """UTF-8 bytes shifted past four special ids: pad 0, bos/cls 1, eos/sep 2, unk 3.

    vocab_size = 260. Used with `--model=tiny`; decoding drops special ids.
    """

    pad_id: int = 0
    bos_id: int = 1
    eos_id: int = 2
    offset: int = 4
    vocab_size: int = 256 + 4

    def encode(self, text: str) -> list[int]:
        return [byte + self.offset for byte in text.encode("utf-8")]

    def decode(self, ids) -> str:
        data = bytes(int(i) - self.offset for i in ids if int(i) >= self.offset)
        return data.decode("utf-8", errors="replace")

    def encode_pair(self, first: str, second: str | None, max_length: int) -> list[int]:
        """[CLS] first [SEP] (second [SEP]), each text truncated to fit `max_length`."""
        budget = max_length - (3 if second is not None else 2)
        a = self.encode(first)
        b = self.encode(second) if second is not None else []
        a, b = _truncate_longest_first(a, b, budget)
        ids = [self.bos_id, *a, self.eos_id]
        if second is not None:
            ids += [*b, self.eos_id]
        return ids


@dataclasses.dataclass(frozen=True)
class HFTokenizer:
    """Adapter over a `transformers` tokenizer with the ByteTokenizer interface."""

    tokenizer: object

    @property
    def pad_id(self) -> int:
        tok = self.tokenizer
        if tok.pad_token_id is not None:
            return tok.pad_token_id
        return tok.eos_token_id if tok.eos_token_id is not None else 0

    @property
    def bos_id(self) -> int | None:
        return self.tokenizer.bos_token_id

    @property
    def eos_id(self) -> int | None:
        return self.tokenizer.eos_token_id

    @property
    def vocab_size(self) -> int:
        return len(self.tokenizer)

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def decode(self, ids) -> str:
        return self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=True)

    def encode_pair(self, first: str, second: str | None, max_length: int) -> list[int]:
        encoded = self.tokenizer(first, second, truncation=True, max_length=max_length, add_special_tokens=True)
        return list(encoded["input_ids"])


def load_tokenizer(name_or_path: str) -> HFTokenizer:
    """`AutoTokenizer.from_pretrained(name_or_path)` behind the common interface."""
    from transformers import AutoTokenizer

    return HFTokenizer(AutoTokenizer.from_pretrained(name_or_path))


def _truncate_longest_first(a: list[int], b: list[int], budget: int) -> tuple[list[int], list[int]]:
    while len(a) + len(b) > budget:
        if len(a) >= len(b):
            a = a[:-1]
        else:
            b = b[:-1]
    return a, b


def pad_to(ids: list[int], length: int, pad_id: int, *, left: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Pad (or right-truncate) `ids` to `length`.

    Returns:
      (ids (length,) int32, mask (length,) int32 with 1 on real tokens).
    """
    ids = list(ids)[:length]
    padding = [pad_id] * (length - len(ids))
    mask = [1] * len(ids)
    if left:
        return np.array(padding + ids, np.int32), np.array([0] * len(padding) + mask, np.int32)
    return np.array(ids + padding, np.int32), np.array(mask + [0] * len(padding), np.int32)
