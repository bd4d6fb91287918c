"""RULER-style synthetic long-context tasks, generated locally and deterministically.

Follows the task definitions of RULER (Hsieh et al., "RULER: What's the Real Context
Size of Your Long-Context Language Models?", 2024): the same task families, prompt
templates, answer prefixes and string-match scoring, with our own generator code and
word lists. Nothing is downloaded; the same seed and tokenizer give the same prompt.

=================  ==========================================================  =====
task               what the prompt holds / what is asked                       score
=================  ==========================================================  =====
niah_single        one needle "One of the special magic numbers for <key> is:  all
                   <7 digits>." in repetitive noise; asked for <key>
niah_multikey      four needles with different keys in real prose; one asked   all
niah_multivalue    four needles with the same key and four values; all asked   all
niah_multiquery    four needles, four keys, all four asked                     all
vt                 variable tracking: VAR A = 12345, VAR B = VAR A, ... (one   all
                   chain of 4 hops) in noise; which variables hold 12345
cwe                common words: a numbered list where 10 words appear often   all
                   and the rest 3 times each; the 10 most common
fwe                frequent words: coded words drawn from a Zipf law           all
                   (alpha 2); the 3 most frequent (the noise token '....'
                   is the most frequent and is not an answer)
qa                 documents: prose paragraphs of Python's documentation; a    part
                   cloze question about a sentence of one document, answered
                   by its missing word (no QA data set ships on the machine)
=================  ==========================================================  =====

Scores are RULER's: ``all`` = the fraction of the references that appear in the
output (case-insensitive substring), ``part`` = 1 if any reference appears. A task's
score is the mean over prompts, in percent.

For chat models the RULER template is the user message and the answer prefix starts
the assistant's turn (``chat_text(...) + answer_prefix``), as RULER does for
instruction-tuned models. Haystacks: RULER's "noise" is the repetitive passkey
filler; its "essay" (Paul Graham's essays) is replaced by the prose paragraphs of
Python's own documentation (``haystack.documentation_paragraphs``, PSF licence).
"""

from __future__ import annotations

import random
import string
from dataclasses import dataclass
from typing import Callable

RULER_TASKS = ("niah_single", "niah_multikey", "niah_multivalue", "niah_multiquery", "vt", "cwe", "fwe", "qa")

# Output tokens per task (RULER's, trimmed where they only pad a CPU run: the answers
# fit well inside these).
ANSWER_TOKENS = {"niah_single": 32, "niah_multikey": 32, "niah_multivalue": 64, "niah_multiquery": 64,
                 "vt": 30, "cwe": 120, "fwe": 50, "qa": 32}

NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."

NIAH_TEMPLATE = ("Some special magic {kind} are hidden within the following text. Make sure to memorize it. "
                 "I will quiz you about the {kind} afterwards.\n{context}\n"
                 "What are all the special magic {kind} for {query} mentioned in the provided text?")
NIAH_PREFIX = " The special magic {kind} for {query} mentioned in the provided text are"
NIAH_NEEDLE = "One of the special magic {kind} for {key} is: {value}."
VT_TEMPLATE = ("Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n"
               "{context}\nQuestion: Find all variables that are assigned the value {query} in the text above.")
VT_PREFIX = (" Answer: According to the chain(s) of variable assignment in the text above, {count} variables "
             "are assigned the value {query}, they are: ")
CWE_TEMPLATE = ("Below is a numbered list of words. In these words, some appear more often than others. "
                "Memorize the ones that appear most often.\n{context}\n"
                "Question: What are the 10 most common words in the above list?")
CWE_PREFIX = " Answer: The top 10 words that appear most often in the list are:"
FWE_TEMPLATE = ("Read the following coded text and track the frequency of each coded word. Find the three most "
                "frequently appeared coded words. {context}\nQuestion: Do not provide any explanation. Please "
                "ignore the dots '....'. What are the three most frequently appeared words in the above coded text?")
FWE_PREFIX = " Answer: According to the coded text above, the three most frequently appeared words are:"
QA_INSTRUCTION = ("Answer the question based on the given documents. Only give me the answer and do not output "
                  "any other words.")
QA_TEMPLATE = (QA_INSTRUCTION + "\n\nThe following are given documents.\n\n{context}\n\n" + QA_INSTRUCTION
               + "\n\nQuestion: {query}")
QA_PREFIX = " Answer:"

ADJECTIVES = (
    "ancient", "bitter", "brave", "bright", "calm", "clever", "crooked", "curious", "damp", "eager", "early",
    "fancy", "fierce", "fragile", "gentle", "giant", "golden", "graceful", "grumpy", "hidden", "hollow",
    "humble", "icy", "jolly", "lazy", "little", "lively", "lonely", "loud", "lucky", "mighty", "misty",
    "modern", "narrow", "nervous", "noisy", "odd", "orange", "patient", "plain", "polite", "proud", "purple",
    "quiet", "rapid", "rare", "restless", "rough", "rusty", "sandy", "scarlet", "shiny", "silent", "silver",
    "sleepy", "slow", "smooth", "sour", "spicy", "steady", "sticky", "stormy", "sturdy", "sunny", "swift",
    "tall", "tender", "tidy", "tiny", "vast", "velvet", "wandering", "warm", "wicked", "wild", "windy",
    "wise", "wooden", "young", "zealous",
)
NOUNS = (
    "anchor", "apple", "badger", "balloon", "banjo", "barrel", "beacon", "bicycle", "blanket", "bridge",
    "bucket", "butter", "cabin", "camel", "candle", "canyon", "carpet", "castle", "cherry", "chimney",
    "cloud", "comet", "compass", "cookie", "copper", "cottage", "crayon", "cricket", "dolphin", "dragon",
    "drum", "eagle", "engine", "falcon", "feather", "fiddle", "forest", "fountain", "garden", "giraffe",
    "glacier", "hammer", "harbor", "helmet", "island", "jacket", "jungle", "kettle", "ladder", "lantern",
    "lemon", "lizard", "magnet", "meadow", "mirror", "monkey", "mountain", "needle", "orchard", "otter",
    "oyster", "paddle", "parrot", "pebble", "pencil", "pepper", "piano", "pillow", "planet", "pocket",
    "puzzle", "rabbit", "ribbon", "river", "rocket", "saddle", "sailor", "shovel", "spider", "squirrel",
    "statue", "tiger", "tomato", "tractor", "trumpet", "tulip", "turtle", "umbrella", "valley", "violin",
    "wagon", "walnut", "whistle", "window", "wizard", "zebra",
)


@dataclass(frozen=True)
class RulerPrompt:
    """One RULER prompt: the user message, the assistant's answer prefix, and the references."""

    task: str
    text: str  # the user message (wrap with prompts.chat_text, then append answer_prefix)
    answer_prefix: str
    answers: tuple[str, ...]
    metric: str  # "all" | "part"
    info: dict  # JSON-ready facts (depths, keys, ...)

    def score(self, output: str) -> float:
        return score_output(output, self.answers, self.metric)


def string_match_all(output: str, answers) -> float:
    """RULER's string_match_all for one prompt: the fraction of references found in the output."""
    out = output.lower()
    return sum(a.lower() in out for a in answers) / len(answers)


def string_match_part(output: str, answers) -> float:
    """RULER's string_match_part for one prompt: 1 if any reference is found in the output."""
    out = output.lower()
    return float(any(a.lower() in out for a in answers))


def score_output(output: str, answers, metric: str) -> float:
    if metric == "all":
        return string_match_all(output, answers)
    if metric == "part":
        return string_match_part(output, answers)
    raise ValueError(f"metric={metric!r} is invalid: allowed values are all, part")


# --- pieces -----------------------------------------------------------------------------


def _key(rng: random.Random, taken: set[str]) -> str:
    while True:
        key = f"{rng.choice(ADJECTIVES)}-{rng.choice(NOUNS)}"
        if key not in taken:
            taken.add(key)
            return key


def _number(rng: random.Random, taken: set[str]) -> str:
    while True:
        value = str(rng.randint(1_000_000, 9_999_999))
        if value not in taken:
            taken.add(value)
            return value


def _insert_at_depths(units: list[str], inserts: list[str], depths: list[float]) -> list[str]:
    """``units`` with each insert placed at its depth (fraction of the units), in order."""
    out = list(units)
    for text, depth in sorted(zip(inserts, depths), key=lambda p: p[1], reverse=True):
        out.insert(round(depth * len(units)), text)
    return out


def _prose_sentences(paragraphs: list[str], start: int) -> list[str]:
    """Consecutive sentences of the documentation prose from paragraph ``start`` (wrapping)."""
    sentences = []
    for i in range(len(paragraphs)):
        for s in paragraphs[(start + i) % len(paragraphs)].split(". "):
            s = s.strip()
            if s:
                sentences.append(s if s.endswith(".") else s + ".")
        if len(sentences) > 4000:
            break
    return sentences


# --- generators: (rng, units) -> (context, query, answers, info) -------------------------
# ``units`` is the haystack size (sentences, list items, words or documents); the builder
# searches for the largest that fits the token budget.


def _niah(rng: random.Random, units: int, paragraphs: list[str], task: str):
    keys_taken: set[str] = set()
    values_taken: set[str] = set()
    keys = [_key(rng, keys_taken) for _ in range(4)]
    if task == "niah_single":
        needles = [(keys[0], _number(rng, values_taken))]
        asked = [keys[0]]
        haystack = [NOISE] * units
    elif task == "niah_multikey":
        needles = [(k, _number(rng, values_taken)) for k in keys]
        asked = [keys[0]]
        haystack = None
    elif task == "niah_multivalue":
        needles = [(keys[0], _number(rng, values_taken)) for _ in range(4)]
        asked = [keys[0]]
        haystack = None
    else:  # niah_multiquery
        needles = [(k, _number(rng, values_taken)) for k in keys]
        asked = list(keys)
        haystack = None
    if haystack is None:
        haystack = _prose_sentences(paragraphs, rng.randrange(len(paragraphs)))[:units]
    rng.shuffle(needles)
    depths = sorted(rng.uniform(0.05, 0.95) for _ in needles)
    texts = [NIAH_NEEDLE.format(kind="numbers", key=k, value=v) for k, v in needles]
    context = " ".join(_insert_at_depths(haystack, texts, depths))
    answers = [v for k, v in needles if k in asked]
    query = ", ".join(asked[:-1]) + (", and " if len(asked) > 1 else "") + asked[-1]
    return context, query, answers, {"depths": [round(d, 3) for d in depths], "keys": asked}


def _variable_name(rng: random.Random, taken: set[str]) -> str:
    while True:
        name = "".join(rng.choice(string.ascii_uppercase) for _ in range(5))
        if name not in taken:
            taken.add(name)
            return name


def _vt(rng: random.Random, units: int, paragraphs: list[str], task: str):
    taken: set[str] = set()
    names = [_variable_name(rng, taken) for _ in range(5)]  # one chain, four hops
    value = str(rng.randint(10000, 99999))
    lines = [f"VAR {names[0]} = {value}."] + [f"VAR {names[i]} = VAR {names[i - 1]}." for i in range(1, 5)]
    depths = sorted(rng.uniform(0.05, 0.95) for _ in lines)
    context = " ".join(_insert_at_depths([NOISE] * units, lines, depths))
    return context, value, names, {"depths": [round(d, 3) for d in depths], "value": value}


def _cwe(rng: random.Random, units: int, paragraphs: list[str], task: str):
    """``units`` list items: 10 common words, each a quarter... of the list; the rest 3 times each."""
    words = list(NOUNS + ADJECTIVES)
    rng.shuffle(words)
    common, others = words[:10], words[10:]
    freq_common = max(3 + 1, min(30, units // 20))  # RULER: 30 for long lists; fewer when the list is short
    uncommon = max(0, min(len(others), (units - 10 * freq_common) // 3))
    items = [w for w in common for _ in range(freq_common)] + [w for w in others[:uncommon] for _ in range(3)]
    rng.shuffle(items)
    context = " ".join(f"{i + 1}. {w}" for i, w in enumerate(items))
    return context, "", common, {"common_frequency": freq_common, "uncommon_words": uncommon}


def _fwe(rng: random.Random, units: int, paragraphs: list[str], task: str):
    """``units`` coded words drawn by a Zipf law (alpha 2) over a vocabulary whose rank 0 is '....'."""
    vocab = ["...."]
    seen = set(vocab)
    while len(vocab) < 200:
        word = "".join(rng.choice(string.ascii_lowercase) for _ in range(6))
        if word not in seen:
            seen.add(word)
            vocab.append(word)
    weights = [1.0 / (rank + 1) ** 2.0 for rank in range(len(vocab))]
    draws = rng.choices(range(len(vocab)), weights=weights, k=units)
    counts: dict[int, int] = {}
    for r in draws:
        counts[r] = counts.get(r, 0) + 1
    ranked = sorted((r for r in counts if r != 0), key=lambda r: (-counts[r], r))
    answers = [vocab[r] for r in ranked[:3]]
    return " ".join(vocab[r] for r in draws), "", answers, {"counts": [counts[r] for r in ranked[:3]]}


QA_ATTEMPTS = 64  # haystacks tried (each from another paragraph) before giving up


def _qa(rng: random.Random, units: int, paragraphs: list[str], task: str):
    """``units`` documents (consecutive documentation paragraphs); a cloze about one of them.

    A haystack with no sentence whose word occurs nowhere else in it cannot carry a cloze
    with one answer: the next draw starts from another paragraph (the first draw, which
    usually succeeds, consumes the generator as it always did).
    """
    for _ in range(QA_ATTEMPTS):
        start = rng.randrange(len(paragraphs))
        docs = [paragraphs[(start + i) % len(paragraphs)] for i in range(max(1, units))]
        found = _cloze(rng, docs)
        if found is not None:
            return found
    raise ValueError(f"no haystack of {units} documents out of {QA_ATTEMPTS} draws has a sentence with a word "
                     "found nowhere else")


def _cloze(rng: random.Random, docs: list[str]):
    others = " ".join(docs).lower()
    order = list(range(len(docs)))
    rng.shuffle(order)
    for gold in order:  # the first document with a sentence whose word is found nowhere else
        sentences = [s.strip() for s in docs[gold].split(". ") if 8 <= len(s.split()) <= 40]
        for sentence in sentences:
            words = [w for w in sentence.split() if w.isalpha() and len(w) >= 6 and w.islower()]
            unique = [w for w in words if others.count(w) == 1]
            if unique:
                word = unique[0]
                cloze = sentence.replace(word, "____", 1).rstrip(".")
                query = f'Which word is missing in this sentence from the documents: "{cloze}."?'
                context = "\n\n".join(f"Document {i + 1}:\n{d}" for i, d in enumerate(docs))
                return context, query, [word], {"gold_document": gold + 1, "documents": len(docs)}
    return None


GENERATORS: dict[str, Callable] = {
    "niah_single": _niah, "niah_multikey": _niah, "niah_multivalue": _niah, "niah_multiquery": _niah,
    "vt": _vt, "cwe": _cwe, "fwe": _fwe, "qa": _qa,
}
# Haystack units per 100 tokens, a first guess for the size search.
UNITS_PER_100_TOKENS = {"niah_single": 4.5, "niah_multikey": 4, "niah_multivalue": 4, "niah_multiquery": 4,
                        "vt": 4.5, "cwe": 25, "fwe": 40, "qa": 1.2}


def _render(task: str, context: str, query: str, answers: list[str]) -> tuple[str, str]:
    if task.startswith("niah"):
        return (NIAH_TEMPLATE.format(kind="numbers", context=context, query=query),
                NIAH_PREFIX.format(kind="numbers", query=query))
    if task == "vt":
        return VT_TEMPLATE.format(context=context, query=query), VT_PREFIX.format(count=len(answers), query=query)
    if task == "cwe":
        return CWE_TEMPLATE.format(context=context), CWE_PREFIX
    if task == "fwe":
        return FWE_TEMPLATE.format(context=context), FWE_PREFIX
    return QA_TEMPLATE.format(context=context, query=query), QA_PREFIX


def ruler_prompt(task: str, target_tokens: int, seed: int, count_tokens: Callable[[str, str], int],
                 paragraphs: list[str]) -> RulerPrompt:
    """The largest prompt of ``task`` whose rendered length stays within ``target_tokens``.

    ``count_tokens(text, answer_prefix)`` counts the whole rendered prompt (chat
    template included); the haystack size is searched for with it. Deterministic in
    (task, target_tokens, seed, tokenizer, paragraphs).
    """
    if task not in GENERATORS:
        raise ValueError(f"task={task!r} is invalid: allowed values are {', '.join(RULER_TASKS)}")
    if target_tokens < 100:
        raise ValueError(f"target_tokens={target_tokens} is invalid: allowed values are integers >= 100")

    def build(units: int):
        rng = random.Random(f"{task}-{seed}")
        context, query, answers, info = GENERATORS[task](rng, units, paragraphs, task)
        text, prefix = _render(task, context, query, answers)
        return text, prefix, answers, info

    lo, hi = 1, max(2, int(UNITS_PER_100_TOKENS[task] * target_tokens / 100 * 1.5))
    while count_tokens(*build(hi)[:2]) <= target_tokens:  # make sure hi is too big
        lo, hi = hi, hi * 2
    best = None
    while lo <= hi:
        mid = (lo + hi) // 2
        built = build(mid)
        if count_tokens(*built[:2]) <= target_tokens:
            best, lo = (mid, built), mid + 1
        else:
            hi = mid - 1
    if best is None:
        raise ValueError(f"{task}: even the smallest haystack exceeds {target_tokens} tokens")
    units, (text, prefix, answers, info) = best
    metric = "part" if task == "qa" else "all"
    return RulerPrompt(task, text, prefix, tuple(answers), metric, {**info, "units": units})
