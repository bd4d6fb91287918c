"""Token-class table on the embedded model's real tokenizer, and the text rule itself."""

from __future__ import annotations

import pytest
import torch

from vllm_adaptive_kv.core.layout import FLAG_PUNCT, FLAG_SPECIAL
from vllm_adaptive_kv.core.token_classes import build_token_flags, flags_for_tokens, is_punctuation_text


@pytest.mark.parametrize("text", [".", ",", "\n", " ?", "```", "...\n\n", "—", "«", "$", "  "])
def test_punctuation_text(text):
    assert is_punctuation_text(text)


@pytest.mark.parametrize("text", ["", "a", " the", "3", ".a", "\ufffd", "é"])
def test_not_punctuation_text(text):
    assert not is_punctuation_text(text)


@pytest.fixture(scope="module")
def tokenizer(smollm2_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(smollm2_dir))


@pytest.fixture(scope="module")
def table(tokenizer):
    return build_token_flags(tokenizer)


def test_special_tokens_of_the_chat_template_are_special(tokenizer, table):
    for token in ("<|im_start|>", "<|im_end|>", "<|endoftext|>"):
        token_id = tokenizer.convert_tokens_to_ids(token)
        assert table[token_id] & FLAG_SPECIAL, token
        assert not table[token_id] & FLAG_PUNCT, "special tokens are not also punctuation"
    added = [int(i) for i in tokenizer.added_tokens_decoder]
    assert bool((table[added] & FLAG_SPECIAL).all()), "every added token is special"


def test_punctuation_and_words_in_real_text(tokenizer, table):
    text = "Hello, world. The capital of France is Paris!\nNext line: (yes)"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    flags = flags_for_tokens(table, ids)
    punct_texts = {tokenizer.decode([i]) for i, f in zip(ids, flags.tolist()) if f & FLAG_PUNCT}
    word_texts = {tokenizer.decode([i]) for i, f in zip(ids, flags.tolist()) if not f}
    assert {",", ".", "!", "\n", ":", "("} <= {t.strip(" ") or t for t in punct_texts}
    assert {"Hello", " world", " Paris"} <= word_texts


def test_table_covers_the_vocabulary_and_is_mostly_words(tokenizer, table):
    assert table.dtype == torch.uint8 and table.numel() == len(tokenizer)
    punct_share = float((table & FLAG_PUNCT).bool().float().mean())
    assert 0.001 < punct_share < 0.2, punct_share


def test_padded_vocab_and_out_of_range_ids(tokenizer):
    padded = build_token_flags(tokenizer, vocab_size=len(tokenizer) + 7)
    assert padded.numel() == len(tokenizer) + 7 and int(padded[-7:].sum()) == 0
    with pytest.raises(ValueError, match="token id out of range"):
        flags_for_tokens(padded, [0, len(tokenizer) + 7])
