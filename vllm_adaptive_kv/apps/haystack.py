"""Deterministic natural-text haystacks with a needle fact, for needle QA.

The haystack text is the prose of Python's own documentation as shipped with the
interpreter (``pydoc_data.topics``, PSF licence), so nothing is downloaded and the
same Python version always gives the same text. Code samples and grammar lines are
dropped: the model should read prose, as in a real long document.

A needle is one short, distinctive fact ("The night guard of the museum is named
Oswald.") and a question whose answer is one word; the embedded 135M model answers
these reliably with the full cache, so misses measure the cache.
"""

from __future__ import annotations

import hashlib
import random
import re
import string
import unicodedata
from dataclasses import dataclass
from typing import Callable

# (fact template, question, answer choices): each answer is one distinctive word
# that does not occur in Python's documentation prose.
# The fact is stated twice, as the passkey is (prompts.passkey_prompt): once read,
# the 135M model must only retrieve it.
NEEDLE_TEMPLATES: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    ("The magic word that opens the castle gate is {0}. Remember it: the magic word is {0}.",
     "What is the magic word that opens the castle gate? Answer with the word only.",
     ("pineapple", "thunderbolt", "butterfly", "sunflower", "moonlight", "snowflake")),
    ("Anna's favourite fruit is the {0}. Remember it: Anna loves the {0}.",
     "What is Anna's favourite fruit? Answer with the fruit only.",
     ("mango", "papaya", "apricot", "pomegranate", "banana", "cherry")),
    ("The treasure of the pirate captain is buried in {0}. Remember it: the treasure is in {0}.",
     "In which city is the treasure of the pirate captain buried? Answer with the city only.",
     ("Lisbon", "Istanbul", "Nairobi", "Montreal", "Oslo", "Lima")),
    ("The wizard's cat is called {0}. Remember it: the cat's name is {0}.",
     "What is the wizard's cat called? Answer with the name only.",
     ("Pumpkin", "Biscuit", "Marmalade", "Pepper", "Waffles", "Noodle")),
)


@dataclass(frozen=True)
class Needle:
    fact: str
    question: str
    answer: str


@dataclass(frozen=True)
class NeedlePrompt:
    text: str  # the user message: wrap it with prompts.chat_text(tokenizer, text)
    needle: Needle
    depth: float  # where the fact sits, 0 = start, 1 = end of the haystack

    def is_correct(self, answer: str) -> bool:
        return answer_matches(answer, self.needle.answer)


def normalize_answer(text: str) -> str:
    """Lower case, accents, punctuation and articles removed, whitespace collapsed (SQuAD-style)."""
    # Accents off ("Léopold" -> "leopold"): the model sometimes adds them.
    text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode()
    text = text.lower().translate(str.maketrans("", "", string.punctuation))
    words = [w for w in text.split() if w not in ("a", "an", "the")]
    return " ".join(words)


def answer_matches(output: str, answer: str) -> bool:
    """True when the normalized answer occurs as whole words in the normalized output.

    Containment rather than equality: a small chat model often answers "The cat is
    called Pepper." instead of "Pepper".
    """
    out, ans = normalize_answer(output), normalize_answer(answer)
    return bool(ans) and f" {ans} " in f" {out} "


def _is_prose(paragraph: str) -> bool:
    """A paragraph of running text: not code, grammar, a heading or a table."""
    lines = paragraph.split("\n")
    if any(line.startswith((" ", "\t")) for line in lines):
        return False  # indented: code samples, grammar rules, nested lists
    if re.fullmatch(r"[*=\-~^+]+", lines[-1].strip()):
        return False  # a heading with its underline
    text = " ".join(lines)
    return len(text.split()) >= 12 and "::=" not in text and ">>>" not in text and text.rstrip().endswith(".")


def documentation_paragraphs() -> list[str]:
    """Prose paragraphs of pydoc_data.topics, topics in sorted order, whitespace collapsed."""
    from pydoc_data.topics import topics

    paragraphs = []
    for name in sorted(topics):
        for block in re.split(r"\n\s*\n", topics[name]):
            if _is_prose(block.strip("\n")):
                paragraphs.append(" ".join(block.split()))
    return paragraphs


def source_digest() -> str:
    """sha256 of the haystack source text: results name the exact text they used."""
    return hashlib.sha256("\n".join(documentation_paragraphs()).encode()).hexdigest()


def make_needle(seed: int) -> Needle:
    # Template and answer both from the seeded generator, so a suite whose seeds
    # step with the depth does not tie one template to one depth.
    rng = random.Random(seed)
    fact, question, answers = rng.choice(NEEDLE_TEMPLATES)
    answer = rng.choice(answers)
    return Needle(fact=fact.format(answer), question=question, answer=answer)


def build_haystack(paragraphs: list[str], max_tokens: int, count_tokens: Callable[[str], int],
                   seed: int) -> list[str]:
    """Consecutive paragraphs from a seeded start whose total stays within ``max_tokens``.

    Consecutive, so the haystack reads like one document; the start varies with the
    seed so prompts differ. Always at least one paragraph.
    """
    if max_tokens < 1:
        raise ValueError(f"max_tokens={max_tokens} is invalid: allowed values are integers >= 1")
    if not paragraphs:
        raise ValueError("no haystack paragraphs to build from")
    start = random.Random(seed).randrange(len(paragraphs))
    chosen: list[str] = []
    total = 0
    for i in range(len(paragraphs)):
        paragraph = paragraphs[(start + i) % len(paragraphs)]
        cost = count_tokens(paragraph) + 1  # +1: the blank line between paragraphs
        if chosen and total + cost > max_tokens:
            break
        chosen.append(paragraph)
        total += cost
    return chosen


def needle_prompt(paragraphs: list[str], max_tokens: int, depth: float, seed: int,
                  count_tokens: Callable[[str], int]) -> NeedlePrompt:
    """A needle QA user message: a haystack of about ``max_tokens`` with the fact at ``depth``."""
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth={depth} is invalid: allowed values are in [0, 1]")
    needle = make_needle(seed)
    haystack = build_haystack(paragraphs, max_tokens, count_tokens, seed)
    at = round(depth * len(haystack))
    body = "\n\n".join(haystack[:at] + [needle.fact] + haystack[at:])
    text = (
        "Read the document and answer the question.\n\n"
        f"{body}\n\nQuestion: {needle.question}"
    )
    return NeedlePrompt(text=text, needle=needle, depth=depth)
