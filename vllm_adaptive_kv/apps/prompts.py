"""Deterministic prompts for demos, tests and evaluation (no data downloads).

Passkey retrieval: a random 5-digit key hidden at a chosen depth inside
repetitive filler; the model must repeat it. Answers are checked by exact digit
match, so accuracy is a clean quality signal for eviction.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

FILLER = (
    "The grass is green. The sky is blue. The sun is yellow. "
    "Here we go. There and back again. "
)

CHAT_QUESTIONS = (
    "What is the capital of France? Answer in one sentence.",
    "Give three tips for staying focused while studying.",
    "Explain in two sentences why the sky looks blue.",
    "Write a haiku about autumn leaves.",
    "List the planets of the solar system in order from the Sun.",
    "What is the difference between a list and a tuple in Python?",
    "Summarize the plot of Romeo and Juliet in three sentences.",
    "How do I convert Celsius to Fahrenheit? Show the formula.",
)


@dataclass(frozen=True)
class PasskeyPrompt:
    text: str  # the user message: wrap it with chat_text(tokenizer, text)
    passkey: str
    depth: float  # where the key sits, 0 = start, 1 = end of the filler

    def is_correct(self, answer: str) -> bool:
        return self.passkey in answer


def passkey_prompt(num_filler: int, depth: float, seed: int) -> PasskeyPrompt:
    """A passkey prompt with ``num_filler`` filler sentences (~22 tokens each).

    ``depth`` in [0, 1] places the key line within the filler.
    """
    if num_filler < 1:
        raise ValueError(f"num_filler={num_filler} is invalid: allowed values are integers >= 1")
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth={depth} is invalid: allowed values are in [0, 1]")
    key = str(random.Random(seed).randint(10000, 99999))
    at = round(depth * num_filler)
    needle = f"The pass key is {key}. Remember it. {key} is the pass key. "
    body = FILLER * at + needle + FILLER * (num_filler - at)
    # A chat user message: the embedded 135M model answers this form reliably
    # (10/10 with the full cache at 1.0-1.6k tokens, all depths), so misses
    # measure the cache, not the prompt.
    text = (
        "Read the text and answer the question.\n\n"
        f"{body}\n\nQuestion: What is the pass key? Answer with the number only."
    )
    return PasskeyPrompt(text=text, passkey=key, depth=depth)


def passkey_suite(count: int, num_filler: int, seed: int = 0) -> list[PasskeyPrompt]:
    """``count`` prompts with depths spread evenly over [0.1, 0.9]."""
    depths = [0.1 + 0.8 * i / max(count - 1, 1) for i in range(count)]
    return [passkey_prompt(num_filler, d, seed * 1000 + i) for i, d in enumerate(depths)]


def chat_text(tokenizer, user_message: str) -> str:
    """Render one user turn with the tokenizer's chat template, ready for generation."""
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": user_message}], tokenize=False, add_generation_prompt=True
    )
