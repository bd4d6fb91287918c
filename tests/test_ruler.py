"""RULER-style tasks (apps/ruler.py): deterministic, within their token budget, answerable
from the prompt, and scored the way RULER scores."""

from __future__ import annotations

import random
import re
from collections import Counter

import pytest

from vllm_adaptive_kv.apps.haystack import documentation_paragraphs
from vllm_adaptive_kv.apps.ruler import (
    NIAH_NEEDLE,
    RULER_TASKS,
    ruler_prompt,
    score_output,
    string_match_all,
    string_match_part,
)

PARAGRAPHS = documentation_paragraphs()


def words(text: str, prefix: str) -> int:
    """Words as tokens: enough to size a prompt without a model."""
    return len((text + prefix).split())


@pytest.mark.parametrize("task", RULER_TASKS)
def test_prompts_are_deterministic_fit_and_hold_their_answers(task):
    a = ruler_prompt(task, 600, seed=3, count_tokens=words, paragraphs=PARAGRAPHS)
    b = ruler_prompt(task, 600, seed=3, count_tokens=words, paragraphs=PARAGRAPHS)
    other = ruler_prompt(task, 600, seed=4, count_tokens=words, paragraphs=PARAGRAPHS)
    assert a == b and a.text != other.text
    assert 450 <= words(a.text, a.answer_prefix) <= 600  # the largest haystack that fits
    assert a.answers and all(ans.lower() in a.text.lower() for ans in a.answers if task != "qa")
    assert a.metric == ("part" if task == "qa" else "all")
    assert a.score(" ".join(a.answers)) == 1.0 and a.score("nothing useful") == 0.0


def test_niah_variants_hide_the_right_needles():
    single = ruler_prompt("niah_single", 500, 0, words, PARAGRAPHS)
    assert single.text.count("One of the special magic numbers") == 1 and "The grass is green." in single.text
    multikey = ruler_prompt("niah_multikey", 500, 0, words, PARAGRAPHS)
    needles = re.findall(r"One of the special magic numbers for (\S+) is: (\d+)\.", multikey.text)
    assert len(needles) == 4 and len({k for k, _ in needles}) == 4
    asked = multikey.info["keys"][0]
    assert [v for k, v in needles if k == asked] == list(multikey.answers)
    assert multikey.text.endswith(f"for {asked} mentioned in the provided text?")
    multivalue = ruler_prompt("niah_multivalue", 500, 0, words, PARAGRAPHS)
    needles = re.findall(r"One of the special magic numbers for (\S+) is: (\d+)\.", multivalue.text)
    assert len({k for k, _ in needles}) == 1 and sorted(v for _, v in needles) == sorted(multivalue.answers)
    multiquery = ruler_prompt("niah_multiquery", 500, 0, words, PARAGRAPHS)
    assert len(multiquery.answers) == 4 and all(k in multiquery.text.split("?")[-2] for k in multiquery.info["keys"])
    assert NIAH_NEEDLE.format(kind="numbers", key="k", value="1") == "One of the special magic numbers for k is: 1."


def test_variable_tracking_chain():
    p = ruler_prompt("vt", 500, 0, words, PARAGRAPHS)
    value = p.info["value"]
    first, *rest = p.answers
    assert f"VAR {first} = {value}." in p.text
    for prev, name in zip(p.answers, rest):
        assert f"VAR {name} = VAR {prev}." in p.text
    assert p.answer_prefix.startswith(f" Answer: According to the chain(s) of variable assignment in the text above, "
                                      f"5 variables are assigned the value {value}")


def test_common_and_frequent_words_answers_are_the_most_frequent():
    cwe = ruler_prompt("cwe", 800, 1, words, PARAGRAPHS)
    listed = Counter(re.findall(r"\d+\. (\S+)", cwe.text.split("\n")[1]))
    top = {w for w, _ in listed.most_common(10)}
    assert top == set(cwe.answers) and min(listed[w] for w in cwe.answers) > 3
    fwe = ruler_prompt("fwe", 800, 1, words, PARAGRAPHS)
    body = fwe.text.split("coded words. ", 1)[1].split("\nQuestion:")[0].split()
    counts = Counter(w for w in body if w != "....")
    assert [w for w, _ in counts.most_common(3)] == list(fwe.answers)
    assert Counter(body).most_common(1)[0][0] == "...."  # the noise token: most frequent, not an answer


def test_qa_is_a_cloze_over_one_document():
    p = ruler_prompt("qa", 800, 2, words, PARAGRAPHS)
    (word,) = p.answers
    question = p.text.rsplit("Question: ", 1)[1]
    assert "____" in question and word not in question
    gold = p.text.split(f"Document {p.info['gold_document']}:\n", 1)[1].split("\n\nDocument ")[0]
    cloze = question.split('"')[1].rstrip(".")
    assert cloze.replace("____", word) in gold
    assert p.text.count("Document ") >= p.info["documents"]


def test_string_match_scores_are_rulers():
    assert string_match_all("The numbers are 123 and 456.", ["123", "456", "789"]) == pytest.approx(2 / 3)
    assert string_match_part("It is Paris.", ["paris", "Lyon"]) == 1.0
    assert string_match_part("It is Rome.", ["Paris", "Lyon"]) == 0.0
    assert score_output("ABC", ["abc"], "all") == 1.0
    with pytest.raises(ValueError, match="metric='some' is invalid: allowed values are all, part"):
        score_output("x", ["x"], "some")


@pytest.mark.parametrize("task, target, message", [
    ("niah_double", 500, "task='niah_double' is invalid: allowed values are niah_single"),
    ("vt", 50, "target_tokens=50 is invalid"),
])
def test_bad_arguments_are_named(task, target, message):
    with pytest.raises(ValueError, match=message):
        ruler_prompt(task, target, 0, words, PARAGRAPHS)


def test_qa_draws_another_haystack_when_one_has_no_cloze():
    """A haystack whose every candidate word repeats elsewhere cannot be asked about; the
    generator draws another start instead of failing (it did, at ~500 tokens, seed 10007)."""
    from vllm_adaptive_kv.apps import ruler

    repetitive = "the module returns values for objects and functions in python code here. " * 3
    paragraphs = [repetitive] * 5 + ["Reading configuration files requires careful validation of every "
                                     "recognised keyword before processing continues."]
    context, query, answers, info = ruler._qa(random.Random(0), 1, paragraphs, "qa")
    assert info["documents"] == 1 and answers[0] in paragraphs[-1] and "____" in query
    with pytest.raises(ValueError, match="out of 64 draws"):
        ruler._qa(random.Random(0), 1, [repetitive], "qa")
