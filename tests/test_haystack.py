"""Needle QA haystacks from Python's documentation: deterministic, prose only, scored by
normalized match (no vLLM)."""

from __future__ import annotations

import pytest

from vllm_adaptive_kv.apps.haystack import (
    NEEDLE_TEMPLATES,
    answer_matches,
    build_haystack,
    documentation_paragraphs,
    make_needle,
    needle_prompt,
    normalize_answer,
    source_digest,
)


def words(text: str) -> int:
    return len(text.split())


@pytest.fixture(scope="module")
def paragraphs():
    return documentation_paragraphs()


def test_paragraphs_are_prose_not_code(paragraphs):
    assert len(paragraphs) > 200  # enough for 2k-token haystacks at many starts
    for p in paragraphs:
        assert "::=" not in p and ">>>" not in p
        assert p.endswith(".") and words(p) >= 12
        assert "\n" not in p and "  " not in p  # whitespace collapsed


def test_same_seed_same_prompt_and_digest(paragraphs):
    a = needle_prompt(paragraphs, 800, 0.5, seed=3, count_tokens=words)
    b = needle_prompt(documentation_paragraphs(), 800, 0.5, seed=3, count_tokens=words)
    assert a == b
    assert source_digest() == source_digest() and len(source_digest()) == 64


def test_different_seeds_give_different_haystacks(paragraphs):
    starts = {build_haystack(paragraphs, 300, words, seed)[0] for seed in range(10)}
    assert len(starts) > 5


def test_haystack_stays_within_budget_and_is_consecutive(paragraphs):
    chosen = build_haystack(paragraphs, 500, words, seed=11)
    assert sum(words(p) + 1 for p in chosen) <= 500
    first = paragraphs.index(chosen[0])
    assert chosen == [paragraphs[(first + i) % len(paragraphs)] for i in range(len(chosen))]
    # a budget smaller than any paragraph still gives one paragraph
    assert len(build_haystack(paragraphs, 1, words, seed=11)) == 1


def test_needle_sits_at_its_depth(paragraphs):
    for depth in (0.0, 0.5, 1.0):
        prompt = needle_prompt(paragraphs, 1000, depth, seed=5, count_tokens=words)
        body = prompt.text.split("\n\n")[1:-1]
        at = body.index(prompt.needle.fact)
        assert abs(at / (len(body) - 1) - depth) <= 0.15
        assert prompt.text.count(prompt.needle.fact) == 1
        assert prompt.text.endswith(prompt.needle.question)


def test_needle_answers_are_not_in_the_haystack_text(paragraphs):
    text = normalize_answer(" ".join(paragraphs))
    for _, _, answers in NEEDLE_TEMPLATES:
        for answer in answers:
            assert f" {normalize_answer(answer)} " not in f" {text} ", answer


def test_needles_use_every_template_with_seeded_answers():
    needles = [make_needle(seed) for seed in range(40)]
    assert {n.question for n in needles} == {t[1] for t in NEEDLE_TEMPLATES}
    for n in needles:
        assert n.answer in n.fact
    assert make_needle(42) == make_needle(42)


@pytest.mark.parametrize("output, answer, expected", [
    ("The wizard's cat is called Pepper.", "Pepper", True),
    ('The answer is: "pomegranate".', "pomegranate", True),
    ("The night guard is Léopold", "Leopold", True),
    ("PEPPER", "pepper", True),
    ("Peppermint tea", "Pepper", False),  # whole words only
    ("The cat is called Biscuit.", "Pepper", False),
    ("", "Pepper", False),
])
def test_answer_matches(output, answer, expected):
    assert answer_matches(output, answer) is expected


def test_normalize_answer_drops_case_accents_punctuation_articles():
    assert normalize_answer("The  Mango.") == "mango"
    assert normalize_answer('An "Éclair", a pie!') == "eclair pie"


def test_bad_arguments_name_the_value(paragraphs):
    with pytest.raises(ValueError, match="depth=1.5"):
        needle_prompt(paragraphs, 100, 1.5, seed=0, count_tokens=words)
    with pytest.raises(ValueError, match="max_tokens=0"):
        build_haystack(paragraphs, 0, words, seed=0)
