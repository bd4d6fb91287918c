"""Per-vocabulary token-class table: which token ids are special, which are punctuation.

FastGen's ``special`` and ``punct`` policies need to know, for every cached token,
whether it is a special token or punctuation. We precompute one uint8 flag per
vocabulary id once per tokenizer; at run time a token's flags are a gather.

- special: every id in the tokenizer's special tokens and added tokens
  (BOS/EOS, chat-template markers such as ``<|im_start|>``).
- punct: ids whose decoded text is non-empty and made only of punctuation,
  symbols and whitespace ("." "," "\\n" " ?" "```"). Whitespace-only tokens count:
  newlines and indentation act as separators that heads attend to like punctuation.
"""

from __future__ import annotations

import string
import unicodedata
from typing import Any, Iterable

import torch

from .layout import FLAG_PUNCT, FLAG_SPECIAL

_ASCII_PUNCT = frozenset(string.punctuation)


def is_punctuation_text(text: str) -> bool:
    """True when ``text`` is non-empty and holds only punctuation/symbols/whitespace.

    The replacement character (a partial UTF-8 byte sequence decoded alone) is not
    punctuation: such a token is a fragment of some other character.
    """
    if not text or "\ufffd" in text:
        return False
    return all(_is_punct_or_space(ch) for ch in text)


def _is_punct_or_space(ch: str) -> bool:
    if ch.isspace() or ch in _ASCII_PUNCT:
        return True
    category = unicodedata.category(ch)
    return category.startswith("P") or category.startswith("S")


def special_token_ids(tokenizer: Any) -> set[int]:
    """Ids of all special and added tokens of a Hugging Face tokenizer."""
    ids = set(int(i) for i in getattr(tokenizer, "all_special_ids", []) or [])
    added = getattr(tokenizer, "added_tokens_decoder", None) or {}
    ids.update(int(i) for i in added)
    return ids


def build_token_flags(tokenizer: Any, vocab_size: int | None = None) -> torch.Tensor:
    """Flags for every id: ``uint8 [vocab_size]`` with FLAG_SPECIAL / FLAG_PUNCT bits.

    ``vocab_size`` defaults to ``len(tokenizer)``; pass the model's (possibly padded)
    embedding size so that every id the model can emit has an entry.
    """
    size = len(tokenizer) if vocab_size is None else int(vocab_size)
    if size <= 0:
        raise ValueError(f"vocab_size must be positive, got {size}")
    flags = torch.zeros(size, dtype=torch.uint8)
    special = torch.zeros(size, dtype=torch.bool)
    special[[i for i in special_token_ids(tokenizer) if 0 <= i < size]] = True
    decodable = min(size, len(tokenizer))
    texts = tokenizer.batch_decode([[i] for i in range(decodable)], skip_special_tokens=False)
    punct = torch.zeros(size, dtype=torch.bool)
    punct[:decodable] = torch.tensor([is_punctuation_text(t) for t in texts], dtype=torch.bool)
    flags[special] |= FLAG_SPECIAL
    flags[punct & ~special] |= FLAG_PUNCT  # a special token is never also punctuation
    return flags


def flags_for_tokens(table: torch.Tensor, token_ids: torch.Tensor | Iterable[int]) -> torch.Tensor:
    """Gather the flags of ``token_ids`` (any shape) from a table built above."""
    ids = torch.as_tensor(token_ids, dtype=torch.long, device=table.device)
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= table.numel()):
        raise ValueError(
            f"token id out of range [0, {table.numel()}): min {int(ids.min())}, max {int(ids.max())}"
        )
    return table[ids]
