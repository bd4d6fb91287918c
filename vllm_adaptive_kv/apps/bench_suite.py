"""`vllm-adaptive-kv bench --suite`: the benchmark matrix, every cell compared in one run.

A *cell* is one workload (memory budget x output length x arrivals) served by every
configuration, one after the other, on the same machine:

    vanilla        vanilla vLLM at its defaults (vLLM CPU: 128-token blocks)
    vanilla-bs32   vanilla vLLM at the plugin's block size (32): the clean baseline for `full`
    full           the plugin, no eviction
    fastgen        the plugin, FastGen

Budgets (``--budgets``), in KV bytes of the model (every layer and KV head):

    ample      holds every request of a cell, prompt and long output, uncompressed
    bound-K    holds K whole requests (largest prompt + long output, in 128-token blocks)

Each (budget, configuration) gets one ``vllm serve``; every cell of that budget runs
on it (short and long outputs, then Poisson arrivals), so servers start
``budgets x configurations`` times. The Poisson rate of a (budget, output) pair is
``--poisson-load`` times the first configuration's requests/s in the burst cell
(vanilla's capacity when it runs first, as by default).

Order (``--order``). A shared machine's speed drifts by minutes, so by default
(``interleaved``) every configuration's server of a budget is started at once (idle
servers wait on their sockets) and each cell runs the configurations back to back,
in turns that reverse from one cell, or round, to the next::

    cell 1, round 1:  vanilla  vanilla-bs32  full     fastgen
    cell 1, round 2:  fastgen  full          vanilla-bs32  vanilla
    cell 2, round 1:  vanilla  vanilla-bs32  full     fastgen      ...

so a steady drift lands on both sides of every ratio. ``--rounds R`` runs each cell R
times; a cell's ratios are then the median of its per-round ratios (each round pairs
runs minutes apart), its rows the run with the median output tokens/s. ``by-config``
runs one server at a time, the whole budget on it (least memory: one server up).

``--fresh-servers`` starts every server anew for each round (and the budget's cells
run round by round, in the same turns). One server instance can run the same load a
few percent faster or slower than another of the same configuration for its whole
life (on a 2-core AVX2 machine, an ample short burst on two pairs of servers gave
fastgen / `full` 1.07x on one pair and 1.00x on the next, 0.92x on the suite's own
pair); rounds on the same servers repeat that offset instead of sampling it.

Beside the rows of ``bench``, each cell reports the ratios the targets are about,
the attention kernel each configuration ran (vLLM CPU picks "amx" for bf16 at block
sizes that are multiples of 32 when the CPU has AMX, else "vec", or "vec16"; the
plugin always runs "vec"), preemptions, and, for memory-bound cells, the
concurrency that fastgen's measured kept fraction allows under the admission rule
(a whole prompt must fit uncompressed) and without it (admission by chunk).

The batching curve (``--curve-points``): output tokens/s with exactly k requests in
flight (a closed loop of k clients), ample memory, long outputs; from it, the
throughput each curve predicts at fastgen's mean running count in the memory-bound
long-output cells.

``--quick`` shrinks everything (4 short prompts, 4/8 output tokens, one bound-2
budget, curve 1 and 2) to check the pipeline and the JSON, not the numbers.
``bench --suite --report SUITE.json`` prints a finished run as markdown tables.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import signal
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from . import bench
from .common import cpu_info, git_commit, http_get, machine_info

SCHEMA = "vllm-adaptive-kv-bench-suite/1"
PLUGIN_BLOCK = 32  # plugin/engine_args.DEFAULT_BLOCK_SIZE (tests check they agree)
ROUND_TOKENS = 128  # budgets are whole 128-token blocks per request: vLLM CPU's default block, a multiple of 32


@dataclass(frozen=True)
class SuiteConfig:
    """One configuration: ``policy`` None is vanilla vLLM; ``block_size`` None is the server's default."""

    label: str
    policy: str | None
    block_size: int | None
    serve_args: tuple[str, ...] = ()
    note: str = ""


CONFIGS = {c.label: c for c in (
    SuiteConfig("vanilla", None, None, note="vanilla vLLM at its defaults"),
    SuiteConfig(f"vanilla-bs{PLUGIN_BLOCK}", None, PLUGIN_BLOCK, note="vanilla vLLM at the plugin's block size"),
    SuiteConfig("full", "full", None, note="the plugin, no eviction"),
    SuiteConfig("fastgen", "fastgen", None, note="the plugin, FastGen"),
    # Experiment for the admission question: vLLM checks only the first prefill chunk
    # against free blocks; the plugin still compresses at the prompt's end.
    SuiteConfig("fastgen-chunk-admit", "fastgen", None, ("--no-scheduler-reserve-full-isl",),
                "fastgen admitted by its first prefill chunk (--no-scheduler-reserve-full-isl)"),
    # ... and compressing at every chunk's end, so a prompt never holds all its pages.
    SuiteConfig("fastgen-chunk-compress", "fastgen", None,
                ("--no-scheduler-reserve-full-isl", "--additional-config.compress_by_chunk", "true"),
                "fastgen admitted by chunk and compressed at every chunk's end (compress_by_chunk)"),
)}
DEFAULT_CONFIGS = ("vanilla", f"vanilla-bs{PLUGIN_BLOCK}", "full", "fastgen")
SAME_BLOCK_VANILLA = f"vanilla-bs{PLUGIN_BLOCK}"
ORDERS = ("interleaved", "by-config")
QUICK = {"num_requests": 4, "prompt_tokens": (150, 250), "short_output": 4, "long_output": 8,
         "budgets": ["bound-2"], "curve_points": [1, 2], "max_model_len": 512}


# --------------------------------------------------------------------------- CLI parsing (pure)


def parse_budget(text: str) -> tuple[str, int | None]:
    """``ample`` -> ("ample", None); ``bound-8`` -> ("bound-8", 8)."""
    text = text.strip()
    if text == "ample":
        return text, None
    match = re.fullmatch(r"bound-([1-9][0-9]*)", text)
    if not match:
        raise ValueError(f"budget {text!r} is invalid: allowed 'ample' or 'bound-K' (K whole requests, K >= 1)")
    return text, int(match.group(1))


def parse_list(name: str, text: str, item, allowed=None) -> list:
    """Comma-separated distinct items, each through ``item`` (a ValueError names the bad one)."""
    names = [t.strip() for t in str(text).split(",") if t.strip()]
    if not names or len(set(names)) != len(names):
        raise ValueError(f"{name}={text!r} is invalid ({'repeated items' if names else 'empty list'}): allowed "
                         f"a comma-separated list of distinct items" + (f" from {', '.join(allowed)}" if allowed
                                                                       else ""))
    if allowed is not None:
        bad = [n for n in names if n not in allowed]
        if bad:
            raise ValueError(f"{name}={text!r} is invalid (unknown {bad[0]!r}): allowed {', '.join(allowed)}")
    return [item(n) for n in names]


def _points(text: str) -> list[int]:
    def point(t):
        if not t.isdigit() or int(t) < 1:
            raise ValueError(f"--curve-points={text!r} is invalid ({t!r}): allowed integers >= 1")
        return int(t)
    if text.strip() == "none":
        return []
    return sorted(parse_list("--curve-points", text, point))


def build_parser() -> argparse.ArgumentParser:
    typed, positive = bench._typed, bench._positive
    p = argparse.ArgumentParser(prog="vllm-adaptive-kv bench --suite", description=__doc__.splitlines()[0])
    w = p.add_argument_group("matrix")
    w.add_argument("--quick", action="store_true", help="tiny sizes that check the pipeline and the JSON in "
                   "about a minute, not the numbers (explicit options still win)")
    w.add_argument("--num-requests", "-n", type=positive(int), default=16, help="requests per cell (default 16)")
    w.add_argument("--prompt-tokens", type=typed(lambda t: bench.parse_range("--prompt-tokens", t, 64)),
                   default="1250:1350", metavar="LO:HI", help="prompt tokens, drawn uniformly (default 1250:1350)")
    w.add_argument("--short-output", type=positive(int), default=16, help="short output tokens (default 16)")
    w.add_argument("--long-output", type=positive(int), default=256, help="long output tokens (default 256)")
    w.add_argument("--outputs", type=typed(lambda t: parse_list("--outputs", t, str, ("short", "long"))),
                   default="short,long", help="which output lengths (default short,long)")
    w.add_argument("--budgets", type=typed(lambda t: parse_list("--budgets", t, lambda b: parse_budget(b)[0])),
                   default="ample,bound-2,bound-8", metavar="LIST",
                   help="'ample' and/or 'bound-K' (default ample,bound-2,bound-8)")
    w.add_argument("--arrivals", type=typed(lambda t: parse_list("--arrivals", t, str, ("burst", "poisson"))),
                   default="burst,poisson", help="burst (all at once) and/or poisson (default both)")
    w.add_argument("--poisson-load", type=positive(float), default=0.9,
                   help="Poisson rate as a fraction of the first configuration's burst requests/s (default 0.9)")
    w.add_argument("--configs", type=typed(lambda t: parse_list("--configs", t, str, tuple(CONFIGS))),
                   default=",".join(DEFAULT_CONFIGS), metavar="LIST",
                   help=f"run in this order (default {','.join(DEFAULT_CONFIGS)}; also fastgen-chunk-admit, "
                        "fastgen-chunk-compress)")
    w.add_argument("--curve-points", type=typed(_points), default="1,2,4,8,16", metavar="LIST",
                   help="batching curve: requests in flight ('none' to skip; default 1,2,4,8,16)")
    w.add_argument("--curve-configs", type=typed(lambda t: parse_list("--curve-configs", t, str, tuple(CONFIGS))),
                   default="vanilla,full", metavar="LIST", help="configurations measured for the curve, on the "
                   "ample budget's servers (or the largest budget's; default vanilla,full)")
    w.add_argument("--curve-rounds", type=positive(int), default=1,
                   help="requests per client at each curve point (default 1)")
    w.add_argument("--order", choices=ORDERS, default="interleaved",
                   help="interleaved: a budget's servers up at once, each cell runs every configuration back "
                   "to back in alternating turns (default); by-config: one server at a time")
    w.add_argument("--rounds", type=positive(int), default=1,
                   help="runs of each cell per configuration; ratios are the median over rounds (default 1)")
    w.add_argument("--fresh-servers", action="store_true",
                   help="start the servers anew for each round, so that rounds sample server instances "
                   "(each start costs a server start-up)")
    w.add_argument("--seed", type=int, default=0, help="workload seed (default 0)")
    s = p.add_argument_group("servers (as in bench)")
    s.add_argument("--model", default=None, help="model folder (default: the embedded SmolLM2-135M-Instruct)")
    s.add_argument("--dtype", default="bfloat16", help="(default bfloat16)")
    s.add_argument("--max-model-len", type=positive(int), default=2048, help="(default 2048)")
    s.add_argument("--max-num-seqs", type=positive(int), default=None, help="(default: vLLM's)")
    s.add_argument("--kv-policy-config", default=None, metavar="YAML")
    s.add_argument("--policy-arg", type=typed(bench.parse_policy_arg), action="append", default=[],
                   metavar="KEY=VALUE")
    s.add_argument("--serve-args", default="", metavar="ARGS", help="extra `vllm serve` arguments for every server")
    s.add_argument("--vllm", default=str(Path(sys.executable).parent / "vllm"))
    s.add_argument("--port", type=positive(int), default=None, help="first server port (default: free ones)")
    s.add_argument("--start-timeout", type=positive(float), default=600.0)
    s.add_argument("--request-timeout", type=positive(float), default=1800.0)
    o = p.add_argument_group("output")
    o.add_argument("--poll-interval", type=positive(float), default=0.2)
    o.add_argument("--out", default=None, metavar="JSON", help="write the results here")
    o.add_argument("--log-dir", default=None, help="server logs (default: a new temporary folder)")
    return p


def parse_args(argv) -> argparse.Namespace:
    """Parse; ``--quick`` changes the defaults, so options given explicitly still win."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.quick:
        parser.set_defaults(**QUICK)
        args = parser.parse_args(argv)
    longest = args.prompt_tokens[1] + max(args.short_output, args.long_output)
    if longest > args.max_model_len:
        parser.error(f"--prompt-tokens={args.prompt_tokens[0]}:{args.prompt_tokens[1]} plus outputs up to "
                     f"{max(args.short_output, args.long_output)} exceed --max-model-len={args.max_model_len}: "
                     f"allowed a sum <= --max-model-len")
    if "poisson" in args.arrivals and "burst" not in args.arrivals:
        parser.error(f"--arrivals={','.join(args.arrivals)!r} is invalid: poisson needs burst too (its rate is "
                     f"the first configuration's burst requests/s)")
    if not Path(args.vllm).exists():
        parser.error(f"--vllm={args.vllm!r} does not exist: allowed the path of a vllm executable")
    args.parser = parser
    return args


# --------------------------------------------------------------------------- budgets and workloads (pure)


def kv_bytes_per_token(model_config: dict, dtype: str) -> int:
    """KV bytes of one token over every layer and KV head (K and V)."""
    heads = model_config["num_attention_heads"]
    head_dim = model_config.get("head_dim") or model_config["hidden_size"] // heads
    kv_heads = model_config.get("num_key_value_heads", heads)
    width = 4 if dtype in ("float32", "float") else 2
    return 2 * model_config["num_hidden_layers"] * kv_heads * head_dim * width


def round_up(value: int, unit: int) -> int:
    return -(-value // unit) * unit


def budget_bytes(name: str, request_tokens: int, num_requests: int, bytes_per_token: int) -> int:
    """Bytes of a budget: ``ample`` holds ``num_requests``, ``bound-K`` K requests of
    ``request_tokens`` (largest prompt + long output), each in whole 128-token blocks."""
    _, k = parse_budget(name)
    count = num_requests if k is None else k
    return count * round_up(request_tokens, ROUND_TOKENS) * bytes_per_token


def cell_workloads(args, render, count) -> dict:
    """{(output, arrivals): workload}; prompts are the same in every cell (same seed)."""
    lengths = {"short": args.short_output, "long": args.long_output}
    return {out: bench.build_workload(args.num_requests, args.prompt_tokens, (lengths[out], lengths[out]),
                                      args.seed, None, render, count) for out in args.outputs}


def with_arrivals(workload: list, rate: float, seed: int) -> list:
    """The same requests, arriving as a Poisson process at ``rate``."""
    times = bench.arrival_times(len(workload), rate, seed)
    return [bench.BenchRequest(**{**asdict(r), "arrival_s": t}) for r, t in zip(workload, times)]


# --------------------------------------------------------------------------- concurrency (pure)


def ideal_running(capacity_tokens: int, block_size: int, prompt_tokens: float, output_tokens: int,
                  kept_fraction: float, num_requests: int, max_num_seqs: int | None = None) -> dict:
    """How many requests can run at once, from the KV capacity and the measured kept fraction.

    A compressed request holds ``kept x (prompt + output)`` slots in each (layer, KV
    head) list, plus half a page of rounding on average. Under the admission rule a
    new request also needs its whole prompt free, uncompressed, so::

        by_rule  = 1 + floor((capacity - prompt rounded to pages) / compressed)
        by_chunk = floor(capacity / compressed)     (admission by chunk: no whole-prompt room)
        full     = floor(capacity / (prompt + output) rounded to pages)   (nothing evicted)

    each at most the requests of the cell (and ``max_num_seqs``). ``memory_binds`` says
    whether the budget, not that cap, sets ``by_rule``: where it does not, every request
    of the cell fits at once after compression and the cell does not test fastgen's
    memory-bound concurrency (raise ``--num-requests`` for that).
    """
    cap = min(num_requests, max_num_seqs or num_requests)
    compressed = kept_fraction * (prompt_tokens + output_tokens) + block_size / 2
    prompt_room = round_up(math.ceil(prompt_tokens), block_size)
    by_rule = 0 if capacity_tokens < prompt_room else 1 + math.floor((capacity_tokens - prompt_room) / compressed)
    by_chunk = math.floor(capacity_tokens / compressed)
    full = math.floor(capacity_tokens / round_up(math.ceil(prompt_tokens + output_tokens), block_size))
    return {"by_rule": min(by_rule, cap), "by_chunk": min(by_chunk, cap), "full": min(full, cap),
            "compressed_tokens": compressed, "memory_binds": by_rule < cap}


def burst_mean(num_requests: int, at_once: int) -> float | None:
    """Time-averaged running count of a burst of equal requests run ``at_once`` at a
    time: the last wave runs short (16 requests 3 at a time: 16 / 6 = 2.67)."""
    if at_once <= 0:
        return None
    return num_requests / math.ceil(num_requests / at_once)


def curve_predict(points: list[dict], running: float | None) -> float | None:
    """Output tokens/s at ``running`` in flight, linear between the measured points
    (clamped to the ends); None without points or a running count."""
    pts = sorted((p["in_flight"], p["output_tokens_per_s"]) for p in points
                 if p.get("output_tokens_per_s") is not None)
    if not pts or running is None:
        return None
    if running <= pts[0][0]:
        return pts[0][1]
    for (x0, y0), (x1, y1) in zip(pts, pts[1:]):
        if running <= x1:
            return y0 + (y1 - y0) * (running - x0) / (x1 - x0)
    return pts[-1][1]


# --------------------------------------------------------------------------- ratios and targets (pure)


def _tps(runs: dict, label: str):
    row = runs.get(label)
    return None if row is None else row.get("output_tokens_per_s")


def _points_diff(runs: dict, a: str, b: str):
    ra, rb = runs.get(a), runs.get(b)
    if not ra or not rb or ra.get("accuracy") is None or rb.get("accuracy") is None:
        return None
    return 100.0 * (ra["accuracy"] - rb["accuracy"])


def cell_ratios(runs: dict) -> dict:
    """The ratios the targets are about, from one cell's rows (None where a side is missing)."""
    r = bench.ratio
    return {
        "full_vs_vanilla_same_block": r(_tps(runs, "full"), _tps(runs, SAME_BLOCK_VANILLA)),
        "fastgen_vs_full": r(_tps(runs, "fastgen"), _tps(runs, "full")),
        "fastgen_vs_vanilla": r(_tps(runs, "fastgen"), _tps(runs, "vanilla")),
        "fastgen_vs_vanilla_same_block": r(_tps(runs, "fastgen"), _tps(runs, SAME_BLOCK_VANILLA)),
        "full_vs_vanilla": r(_tps(runs, "full"), _tps(runs, "vanilla")),
        "vanilla_same_block_vs_vanilla": r(_tps(runs, SAME_BLOCK_VANILLA), _tps(runs, "vanilla")),
        "passkey_points_fastgen_vs_full": _points_diff(runs, "fastgen", "full"),
        "passkey_points_fastgen_vs_vanilla": _points_diff(runs, "fastgen", "vanilla"),
    }


def median_ratios(rounds: list[dict]) -> dict:
    """Each ratio's median over a cell's rounds ({label: row} each), every round's ratio
    taken between runs made minutes apart; None where no round has both sides."""
    per_round = [cell_ratios(runs) for runs in rounds]
    medians = {}
    for key in per_round[0]:
        values = [r[key] for r in per_round if r[key] is not None]
        medians[key] = statistics.median(values) if values else None
    return medians


def median_runs(rounds: list[dict]) -> dict:
    """Per configuration, its row with the median output tokens/s over the rounds (the
    lower middle for an even count): the row the tables show."""
    labels = dict.fromkeys(label for runs in rounds for label in runs)
    chosen = {}
    for label in labels:
        rows = sorted((runs[label] for runs in rounds if label in runs),
                      key=lambda row: row.get("output_tokens_per_s") or 0.0)
        chosen[label] = rows[(len(rows) - 1) // 2]
    return chosen


def turn_order(labels: list[str], turn: int) -> list[str]:
    """The configurations in the given order on even turns, reversed on odd ones."""
    return list(labels) if turn % 2 == 0 else list(reversed(labels))


def cell_concurrency(cell: dict, capacity: dict, block_sizes: dict, max_num_seqs) -> dict | None:
    """Fastgen's (and chunk-admit's) ideal vs measured running for a memory-bound cell."""
    if cell["budget_k"] is None:
        return None
    w = cell["workload"]
    prompt, output, n = w["prompt_tokens"]["mean"], w["output_tokens"]["max"], w["requests"]
    out = {}
    for label in ("fastgen", "fastgen-chunk-admit", "fastgen-chunk-compress"):
        row = cell["runs"].get(label)
        if not row or row.get("kept_fraction") is None or label not in capacity:
            continue
        ideal = ideal_running(capacity[label], block_sizes[label], prompt, output, row["kept_fraction"], n,
                              max_num_seqs)
        mean = row.get("mean_running")
        at_once = ideal["by_chunk" if label == "fastgen-chunk-compress" else "by_rule"]  # what its admission allows
        target = burst_mean(n, at_once) if cell["arrivals"] == "burst" else at_once
        out[label] = {"ideal": ideal, "peak_running": row.get("peak_running"), "mean_running": mean,
                      "ideal_mean": target, "mean_vs_ideal": bench.ratio(mean, target),
                      "preemptions": row.get("preemptions")}
    for label in ("vanilla", SAME_BLOCK_VANILLA, "full"):
        row = cell["runs"].get(label)
        if row and label in capacity:
            full = ideal_running(capacity[label], block_sizes[label], prompt, output, 1.0, n, max_num_seqs)["full"]
            out[label] = {"ideal": {"full": full}, "peak_running": row.get("peak_running"),
                          "mean_running": row.get("mean_running"), "preemptions": row.get("preemptions")}
    return out


def ample_mean_running(cells: list[dict]) -> dict:
    """{(output, arrivals): fastgen's mean running in the ample cell of that workload}.

    With every request's KV fitting, a burst's time-average is still bounded by how fast
    the scheduler prefills its prompts (12 prompts of 1.3k tokens, one chunk a step):
    the rule's ideal counts all of them at once, which no budget reaches. The ample
    cell measures that bound on the same workload and machine.
    """
    return {(c["output"], c["arrivals"]): c["runs"]["fastgen"].get("mean_running")
            for c in cells if c["budget_k"] is None and "fastgen" in c["runs"]}


INSTANCE_SPREAD = 1.10  # one server instance can run ~10% faster than another of the same config


def admission_headroom(cells: list[dict]) -> list[dict]:
    """What any change to admission could buy fastgen, per memory-bound burst cell.

    Two upper bounds, both from this run::

        withheld    rule's ideal -> by-chunk ideal: the requests the whole-prompt rule
                    keeps out at the measured kept fraction; admitting by chunk and
                    compressing as chunks arrive could add at most these
        ample_gain  fastgen's output tok/s with ample memory (same workload, same run)
                    over its output tok/s here: what no memory limit at all would buy

    and ``ttft_ratio``, fastgen's TTFT p50 here over its TTFT p50 with ample memory
    (1.0: the budget delayed no first token; prefill paced them all). The rule
    ``limits`` a cell only where both bounds leave room: a request withheld, and
    ample memory faster by more than the server-instance spread. ``limits`` is None
    without an ample cell of the same workload.
    """
    ample = {(c["output"], c["arrivals"]): c["runs"]["fastgen"]
             for c in cells if c["budget_k"] is None and "fastgen" in c["runs"]}
    out = []
    for cell in cells:
        fg = (cell.get("concurrency") or {}).get("fastgen")
        if cell["budget_k"] is None or cell["arrivals"] != "burst" or not fg:
            continue
        here, roomy = cell["runs"]["fastgen"], ample.get((cell["output"], cell["arrivals"]))
        withheld = fg["ideal"]["by_chunk"] - fg["ideal"]["by_rule"]
        gain = bench.ratio(roomy["output_tokens_per_s"], here["output_tokens_per_s"]) if roomy else None
        ttft = bench.ratio(here["ttft_s"]["p50"], roomy["ttft_s"]["p50"]) if roomy else None
        limits = None if gain is None else (withheld >= 1 and gain > INSTANCE_SPREAD)
        out.append({"cell": cell["name"], "by_rule": fg["ideal"]["by_rule"], "by_chunk": fg["ideal"]["by_chunk"],
                    "withheld": withheld, "ample_gain": gain, "ttft_ratio": ttft, "limits": limits})
    return out


def format_headroom(rows: list[dict]) -> str:
    """The console lines of ``admission_headroom``; "" without a memory-bound burst cell."""
    if not rows:
        return ""
    lines = ["\n== admission headroom (what admitting by chunk, or no memory limit, could buy fastgen)"]
    for r in rows:
        verdict = {None: "no ample cell in this run", True: "the rule limits",
                   False: "the rule does not limit"}[r["limits"]]
        lines.append(f"{r['cell']:<24} rule {r['by_rule']} -> by chunk {r['by_chunk']} (+{r['withheld']}); "
                     f"ample memory {_f(r['ample_gain'], '.2f', suffix='x')} output tok/s, "
                     f"TTFT p50 here / ample {_f(r['ttft_ratio'], '.2f')}: {verdict}")
    return "\n".join(lines)


def target_checks(cells: list[dict]) -> list[dict]:
    """One line per (target, cell): the measured value, the bar, met or not (None: not measured)."""
    checks = []
    ample_means = ample_mean_running(cells)

    def add(target, cell, value, bar, note=""):
        checks.append({"target": target, "cell": cell["name"], "value": value, "bar": bar,
                       "met": None if value is None else value >= bar, "note": note})

    for cell in cells:
        ratios = cell["ratios"]
        if cell["budget_k"] is None:
            add("ample: full >= 0.97x vanilla at the same block size", cell,
                ratios["full_vs_vanilla_same_block"], 0.97)
            add("ample: fastgen >= 0.97x full", cell, ratios["fastgen_vs_full"], 0.97)
        else:
            fg = (cell.get("concurrency") or {}).get("fastgen")
            if cell["arrivals"] == "burst":  # Poisson arrivals need not keep the budget full
                add("memory-bound: fastgen mean running >= 0.9x ideal (admission rule)", cell,
                    fg and fg["mean_vs_ideal"], 0.9, "ideal: the burst's time-average at the rule's count"
                    + (fg and unbound_note(fg["ideal"]) or ""))
                ample = ample_means.get((cell["output"], cell["arrivals"]))
                if fg and ample:  # a reading beside the target: what memory cost, prefill pacing aside
                    add("(reading) fastgen mean running >= 0.9x min(ideal, ample memory's)", cell,
                        bench.ratio(fg["mean_running"], min(fg["ideal_mean"], ample)), 0.9,
                        f"ample memory, same workload: fastgen mean running {ample:.2f}")
            if cell["output"] == "long":
                for curve_label, pred in (cell.get("curve_prediction") or {}).items():
                    add(f"memory-bound: fastgen >= 0.9x the {curve_label} curve at its mean running", cell,
                        bench.ratio(_tps(cell["runs"], "fastgen"), pred), 0.9)
            add("memory-bound: fastgen >= full", cell, ratios["fastgen_vs_full"], 1.0)
        diff = ratios["passkey_points_fastgen_vs_full"]
        add("passkey: fastgen within 5 points of full", cell, diff, -5.0, "value: fastgen - full, in points")
    return checks


# --------------------------------------------------------------------------- servers and kernels


def server_args(args, config: SuiteConfig, kv_bytes: int) -> argparse.Namespace:
    """bench's server options for one configuration at one budget."""
    serve = " ".join([args.serve_args, *config.serve_args]).strip()
    return argparse.Namespace(vllm=args.vllm, dtype=args.dtype, max_model_len=args.max_model_len,
                              kv_cache_memory_bytes=kv_bytes, enforce_eager=True, max_num_seqs=args.max_num_seqs,
                              block_size=config.block_size, vanilla_prefix_caching=False,
                              kv_policy_config=args.kv_policy_config, policy_arg=args.policy_arg,
                              serve_args=serve, poll_interval=args.poll_interval,
                              request_timeout=args.request_timeout, start_timeout=args.start_timeout)


def cache_info(metrics_text: str) -> dict:
    """Block size, blocks and KV tokens from vLLM's ``vllm:cache_config_info`` labels."""
    for line in metrics_text.splitlines():
        if line.startswith("vllm:cache_config_info{"):
            labels = dict(re.findall(r'([a-zA-Z_][a-zA-Z0-9_]*)="([^"]*)"', line))
            as_int = {k: int(labels[k]) for k in ("block_size", "num_gpu_blocks") if labels.get(k, "").isdigit()}
            if "block_size" in as_int and "num_gpu_blocks" in as_int:
                as_int["capacity_tokens"] = as_int["block_size"] * as_int["num_gpu_blocks"]
            return as_int
    return {}


PLUGIN_PATH = re.compile(r"vllm-adaptive-kv: .* attention path (\S+)")


def attention_kernel(config: SuiteConfig, log_text: str, dtype: str, block_size: int | None,
                     head_dim: int) -> dict:
    """Which CPU attention kernel a server ran.

    Vanilla: vLLM's own choice, ``_get_attn_isa`` of its CPU backend, evaluated here
    with the server's dtype, block size and head_dim (it depends only on those and
    the CPU). The plugin: its log names the path; the native one calls vLLM's
    kernel with the "vec" ISA whatever the CPU offers.
    """
    if config.policy is None:
        try:
            import torch
            from vllm.v1.attention.backends.cpu_attn import _get_attn_isa

            isa = _get_attn_isa(getattr(torch, dtype), block_size, head_dim, "auto")
        except Exception as e:  # noqa: BLE001 - a record, not a requirement
            isa = f"unknown ({type(e).__name__}: {e})"
        return {"path": "vllm-cpu-attn", "isa": isa}
    match = PLUGIN_PATH.search(log_text)
    path = match.group(1) if match else None
    if path == "vllm-cpu-kernel":
        from ..plugin.cpu.attention import ISA

        return {"path": path, "isa": ISA}
    return {"path": path, "isa": None}


# --------------------------------------------------------------------------- running


class Suite:
    """Runs the matrix, fills ``doc`` and writes it after every measurement."""

    def __init__(self, args, model_dir: str, log_dir: Path) -> None:
        self.args, self.model_dir, self.log_dir = args, model_dir, log_dir
        self.model_config = json.loads((Path(model_dir) / "config.json").read_text())
        heads = self.model_config["num_attention_heads"]
        self.head_dim = self.model_config.get("head_dim") or self.model_config["hidden_size"] // heads
        self.bytes_per_token = kv_bytes_per_token(self.model_config, args.dtype)
        self.tokenizer = bench.tokenizer_fns(model_dir)  # (render, count)
        self.rates: dict[tuple[str, str], float] = {}
        self.doc: dict = {}

    # --- set-up -----------------------------------------------------------------------

    def begin(self, workloads: dict) -> None:
        args = self.args
        sample = next(iter(workloads.values()))
        request_tokens = max(r.prompt_tokens for r in sample) + args.long_output
        curve_n = max(args.curve_points, default=0) * args.curve_rounds
        budgets = []
        for name in args.budgets:
            _, k = parse_budget(name)
            size = budget_bytes(name, request_tokens, max(args.num_requests, curve_n), self.bytes_per_token)
            if size // self.bytes_per_token < args.max_model_len:
                args.parser.error(f"budget {name} holds {size // self.bytes_per_token} tokens, fewer than "
                                  f"--max-model-len={args.max_model_len} (vLLM refuses to start): lower it")
            budgets.append({"name": name, "k": k, "bytes": size, "servers": {}})
        self.doc = {"schema": SCHEMA, "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **git_commit(),
                    "machine": machine_info(), "uptime_before": uptime(),
                    "args": {k: v for k, v in vars(args).items() if k != "parser"},
                    "kv_bytes_per_token": self.bytes_per_token, "request_tokens": request_tokens,
                    "configs": {c: asdict(CONFIGS[c]) for c in args.configs},
                    "budgets": budgets, "cells": [], "curve": {}, "targets": []}

    # --- one budget -----------------------------------------------------------------------

    def run_budget(self, budget: dict, workloads: dict, curve_here: bool) -> None:
        """Every cell of ``budget``; the servers up together (interleaved) or one at a time."""
        labels = list(self.args.configs)
        groups = [labels] if self.args.order == "interleaved" else [[label] for label in labels]
        every = range(self.args.rounds)
        spans = [every[i:i + 1] for i in every] if self.args.fresh_servers else [every]
        for group in groups:
            for rounds in spans:  # the servers of ``group`` live for ``rounds``
                servers = {}
                try:
                    for label in group:
                        servers[label] = self.start_server(budget, label)
                    self.run_cells(servers, budget, workloads, rounds)
                    for label in group:
                        if (curve_here and rounds[-1] == every[-1] and label in self.args.curve_configs
                                and self.args.curve_points):
                            self.run_curve(servers[label], label, budget["name"])
                finally:
                    for server in servers.values():
                        server.__exit__(None, None, None)

    def run_cells(self, servers: dict, budget: dict, workloads: dict, rounds: range | None = None) -> None:
        """Each cell, for each of ``rounds`` (default: all ``--rounds``), the servers'
        configurations in alternating turns.

        A cell's round r takes turn ``cell * R + r`` (cells in arrivals-then-outputs order, R
        = ``--rounds``), so the turns are the same whether the rounds share servers or not.
        """
        rounds = range(self.args.rounds) if rounds is None else rounds
        cells = [(arrivals, out) for arrivals in self.args.arrivals for out in self.args.outputs]
        for cell_index, (arrivals, out) in enumerate(cells):
            for round_index in rounds:
                for label in turn_order(list(servers), cell_index * self.args.rounds + round_index):
                    servers[label] = self.run_cell_once_more_if_died(
                        servers[label], budget, label, out, arrivals, workloads[out], round_index)

    def start_server(self, budget: dict, label: str) -> bench.Server:
        """A started server of ``label`` at ``budget``; records its cache, kernel and start-up."""
        config = CONFIGS[label]
        sargs = server_args(self.args, config, budget["bytes"])
        port = bench.next_port(self.args)
        cmd = bench.server_command(config.policy or bench.VANILLA, sargs, self.model_dir, port)
        starts = budget.setdefault("starts", {}).get(label, 0)
        log_path = self.log_dir / f"serve-{budget['name']}-{label}{f'-{starts}' if starts else ''}.log"
        server = bench.Server(f"{budget['name']} {label}", cmd, port, log_path, self.args.start_timeout).__enter__()
        server.sargs = sargs
        budget["starts"][label] = starts + 1
        info = cache_info(http_get(server.base + "/metrics"))
        info.update({"start_s": server.start_s, "server_cmd": cmd, "log": str(log_path), "starts": starts + 1,
                     "kernel": attention_kernel(config, bench.log_tail(log_path, 10**6), self.args.dtype,
                                                info.get("block_size"), self.head_dim)})
        budget["servers"][label] = info
        self.save()
        return server

    def run_cell_once_more_if_died(self, server, budget, label, out, arrivals, workload,
                                   round_index: int = 0) -> bench.Server:
        """Run a cell; if the server died meanwhile (on a shared machine, the kernel's OOM
        killer), start a fresh one and run the cell once more. Returns the live server."""
        self.run_cell(server, budget, label, out, arrivals, workload, round_index=round_index)
        if server.alive():
            return server
        print(f"[suite] {budget['name']} {label}: the server died during {out}/{arrivals} "
              f"(log {server.log_path}); starting a fresh one and running the cell once more", flush=True)
        server.__exit__(None, None, None)
        server = self.start_server(budget, label)
        self.run_cell(server, budget, label, out, arrivals, workload, retry=True, round_index=round_index)
        return server

    def cell(self, budget: dict, out: str, arrivals: str) -> dict:
        name = f"{budget['name']}/{out}/{arrivals}"
        for c in self.doc["cells"]:
            if c["name"] == name:
                return c
        c = {"name": name, "budget": budget["name"], "budget_k": budget["k"], "budget_bytes": budget["bytes"],
             "output": out, "arrivals": arrivals, "rate": None, "workload": None, "runs": {}, "rounds": []}
        self.doc["cells"].append(c)
        return c

    def run_cell(self, server, budget: dict, label: str, out: str, arrivals: str, workload: list,
                 retry: bool = False, round_index: int = 0) -> None:
        cell = self.cell(budget, out, arrivals)
        if arrivals == "poisson":
            rate = self.rates.get((budget["name"], out))
            if rate is None:  # no burst cell ran first to measure the capacity
                return
            workload = with_arrivals(workload, rate, self.args.seed)
            cell["rate"] = rate
        cell["workload"] = bench.workload_summary(workload, cell["rate"], self.args.seed)
        row = bench.measure(server, label, workload, server.sargs)
        row.pop("samples")  # the suite keeps summaries only (bench keeps every sample)
        row["kernel"] = budget["servers"][label]["kernel"]
        row["retry"] = retry  # the first server died during this cell
        row["round"] = round_index
        while len(cell["rounds"]) <= round_index:
            cell["rounds"].append({})
        cell["rounds"][round_index][label] = row
        first = label == self.args.configs[0]  # the rate is the first configuration's, whatever ran first
        if arrivals == "burst" and first and (budget["name"], out) not in self.rates and row["requests_per_s"] \
                and not row["failed"]:
            self.rates[(budget["name"], out)] = self.args.poisson_load * row["requests_per_s"]
        self.finish_cell(cell)
        print(format_cell(cell), flush=True)
        self.save()

    def finish_cell(self, cell: dict) -> None:
        servers = next(b for b in self.doc["budgets"] if b["name"] == cell["budget"])["servers"]
        capacity = {k: v["capacity_tokens"] for k, v in servers.items() if "capacity_tokens" in v}
        blocks = {k: v["block_size"] for k, v in servers.items() if "block_size" in v}
        rounds = [runs for runs in cell.get("rounds") or [] if runs] or [cell["runs"]]
        chosen = median_runs(rounds)
        cell["runs"] = {label: chosen[label] for label in self.args.configs if label in chosen}
        cell["ratios"] = median_ratios(rounds)
        cell["round_ratios"] = [cell_ratios(runs) for runs in rounds] if len(rounds) > 1 else None
        cell["concurrency"] = cell_concurrency(cell, capacity, blocks, self.args.max_num_seqs)
        fg = (cell["concurrency"] or {}).get("fastgen")
        cell["curve_prediction"] = {label: curve_predict(c["points"], fg and fg["mean_running"])
                                    for label, c in self.doc["curve"].items()} if fg else {}

    # --- the batching curve -------------------------------------------------------------------

    def run_curve(self, server, label: str, budget_name: str) -> None:
        args = self.args
        need = max(args.curve_points) * args.curve_rounds
        workload = bench.build_workload(need, args.prompt_tokens, (args.long_output, args.long_output), args.seed,
                                        None, *self.tokenizer)
        curve = self.doc["curve"].setdefault(label, {"budget": budget_name, "output_tokens": args.long_output,
                                                     "points": []})
        for k in args.curve_points:
            row = bench.measure(server, label, workload[:k * args.curve_rounds], server.sargs, concurrency=k)
            curve["points"].append({"in_flight": k, "output_tokens_per_s": row["output_tokens_per_s"],
                                    "mean_running": row["mean_running"], "peak_running": row["peak_running"],
                                    "tpot_s": row["tpot_s"], "wall_s": row["wall_s"], "failed": row["failed"],
                                    "preemptions": row["preemptions"]})
            print(f"[suite] curve {label}: {k} in flight -> {row['output_tokens_per_s']:.2f} output tok/s "
                  f"(mean running {_f(row['mean_running'], '.2f')})", flush=True)
            self.save()
        for cell in self.doc["cells"]:
            self.finish_cell(cell)

    # --- output -----------------------------------------------------------------------

    def finish(self) -> None:
        for cell in self.doc["cells"]:
            self.finish_cell(cell)
        self.doc["targets"] = target_checks(self.doc["cells"])
        self.doc["uptime_after"] = uptime()
        self.doc["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        self.save()

    def save(self) -> None:
        bench.write_json(self.args.out, self.doc)


def uptime() -> dict:
    return {"time": time.strftime("%H:%M:%S"), "loadavg": os.getloadavg() if hasattr(os, "getloadavg") else None}


# --------------------------------------------------------------------------- printing (pure)


def _f(value, spec: str, scale: float = 1.0, suffix: str = "") -> str:
    if value is None:
        return "-"
    return format(value * scale if scale != 1.0 else value, spec) + suffix


def format_cell(cell: dict) -> str:
    rate = f", Poisson {cell['rate']:.3f}/s" if cell.get("rate") else ", all at once"
    w = cell["workload"]
    lines = [f"\n== {cell['name']}: {w['requests']} requests, prompt {w['prompt_tokens']['min']}-"
             f"{w['prompt_tokens']['max']} tokens, {w['output_tokens']['max']} out{rate}, "
             f"{cell['budget_bytes'] / 2**20:.1f} MiB",
             f"{'config':>20} {'kernel':>6} {'out tok/s':>9} {'peak run':>8} {'mean run':>8} {'preempt':>7} "
             f"{'kept':>5} {'TTFT p50':>8} {'TTFT p99':>8} {'TPOT p50':>8} {'TPOT p99':>8} {'passkey':>7}"]
    for label, r in cell["runs"].items():
        lines.append(
            f"{label:>20} {str(r['kernel'].get('isa') or r['kernel'].get('path')):>6} "
            f"{_f(r['output_tokens_per_s'], '9.2f')} {_f(r['peak_running'], '8.0f')} "
            f"{_f(r.get('mean_running'), '8.2f')} {_f(r.get('preemptions'), '7.0f')} "
            f"{_f(r.get('kept_fraction'), '5.2f')} {_f(r['ttft_s']['p50'], '7.2f', suffix='s')} "
            f"{_f(r['ttft_s']['p99'], '7.2f', suffix='s')} {_f(r['tpot_s']['p50'], '6.0f', 1e3, 'ms')} "
            f"{_f(r['tpot_s']['p99'], '6.0f', 1e3, 'ms')} {_f(r['accuracy'], '6.1f', 100, '%')}")
    ratios = cell.get("ratios") or {}
    shown = [f"{k} {v:.2f}x" for k, v in ratios.items() if v is not None and not k.startswith("passkey")]
    if shown:
        lines.append(("median ratios over rounds: " if cell.get("round_ratios") else "ratios: ") + ", ".join(shown))
    for key in ROUND_SHOWN:
        spread = round_spread(cell, key)
        if spread:
            lines.append(f"{key} by round: {spread}")
    for label, c in (cell.get("concurrency") or {}).items():
        ideal = c["ideal"]
        if "by_rule" in ideal:
            lines.append(f"{label}: ideal running {ideal['by_rule']} under the admission rule, {ideal['by_chunk']} "
                         f"admitting by chunk, {ideal['full']} uncompressed; measured peak "
                         f"{_f(c['peak_running'], '.0f')}, mean {_f(c['mean_running'], '.2f')} "
                         f"(ideal mean {_f(c['ideal_mean'], '.2f')}: {_f(c['mean_vs_ideal'], '.2f')}x), "
                         f"preemptions {_f(c['preemptions'], '.0f')}" + unbound_note(ideal))
        else:
            lines.append(f"{label}: {ideal['full']} whole requests fit; measured peak {_f(c['peak_running'], '.0f')}, "
                         f"mean {_f(c['mean_running'], '.2f')}, preemptions {_f(c['preemptions'], '.0f')}")
    for label, pred in (cell.get("curve_prediction") or {}).items():
        if pred is not None:
            lines.append(f"{label} curve predicts {pred:.2f} output tok/s at fastgen's mean running")
    return "\n".join(lines)


def unbound_note(ideal: dict) -> str:
    """"; memory does not bind ..." when the request cap, not memory, sets the rule's ideal, else ""."""
    if ideal.get("memory_binds", True):
        return ""
    return f"; memory does not bind: all {ideal['by_rule']} requests fit compressed (raise --num-requests)"


ROUND_SHOWN = ("full_vs_vanilla_same_block", "fastgen_vs_full")  # the ample targets' ratios


def round_spread(cell: dict, key: str) -> str:
    """A ratio's value in each round, "0.98 / 1.03 / 1.01"; "" for a single round."""
    rounds = cell.get("round_ratios") or []
    values = [r.get(key) for r in rounds]
    if len(values) < 2 or all(v is None for v in values):
        return ""
    return " / ".join(_f(v, ".2f") for v in values)


def format_targets(checks: list[dict]) -> str:
    lines = ["\n== targets (only ratios measured side by side in this run mean anything)"]
    for c in checks:
        verdict = "n/a" if c["met"] is None else ("met" if c["met"] else "MISSED")
        lines.append(f"{verdict:>6}  {c['cell']:<24} {_f(c['value'], '.2f'):>6} (bar {c['bar']:.2f})  {c['target']}")
    return "\n".join(lines)


def _md(rows: list[list[str]]) -> str:
    head, *body = rows
    return "\n".join(["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
                     + ["| " + " | ".join(r) + " |" for r in body])


def markdown_report(doc: dict) -> str:
    """The suite's JSON as the markdown tables of docs/performance.md."""
    out = []
    kernels = [["budget", "config", "block size", "KV capacity (tokens)", "attention kernel", "start-up"]]
    for b in doc["budgets"]:
        for label, srv in b["servers"].items():
            k = srv.get("kernel") or {}
            kernels.append([f"{b['name']} ({b['bytes'] / 2**20:.1f} MiB)", label, str(srv.get("block_size", "-")),
                            _f(srv.get("capacity_tokens"), ",d"), f"{k.get('isa') or '-'} ({k.get('path')})",
                            _f(srv.get("start_s"), ".0f", suffix=" s")])
    args = doc.get("args") or {}
    fresh = (f" (started anew for each of the {args.get('rounds')} rounds, `--fresh-servers`; the last start shown)"
             if args.get("fresh_servers") else "")
    out += [f"Servers{fresh}:", "", _md(kernels), ""]
    runs = [["cell", "config", "out tok/s", "peak run", "mean run", "preempt", "kept", "TTFT p50 / p99",
             "TPOT p50 / p99", "passkey", "load after"]]
    for c in doc["cells"]:
        rounds = [r for r in c.get("rounds") or [] if r] or [c["runs"]]
        every = [(f"{label} (round {i + 1})" if len(rounds) > 1 else label, r)
                 for i, round_runs in enumerate(rounds) for label, r in round_runs.items()]
        for label, r in every:
            runs.append([c["name"] + (f" ({c['rate']:.3f}/s)" if c.get("rate") else ""), label,
                         _f(r["output_tokens_per_s"], ".2f"), _f(r["peak_running"], ".0f"),
                         _f(r.get("mean_running"), ".2f"), _f(r.get("preemptions"), ".0f"),
                         _f(r.get("kept_fraction"), ".3f"),
                         f"{_f(r['ttft_s']['p50'], '.1f')} / {_f(r['ttft_s']['p99'], '.1f')} s",
                         f"{_f(r['tpot_s']['p50'], '.0f', 1e3)} / {_f(r['tpot_s']['p99'], '.0f', 1e3)} ms",
                         f"{round(r['accuracy'] * r['completed']) if r.get('accuracy') is not None else '-'}"
                         f"/{r['completed'] + r['failed']}",
                         _f((r.get("loadavg_after") or [None])[0], ".1f")])
    out += ["Every run:", "", _md(runs), ""]
    ratios = [["cell", "full / vanilla-bs32", "fastgen / full", "fastgen / vanilla", "vanilla-bs32 / vanilla",
               "passkey fastgen - full"]]

    def with_rounds(c, key):  # the median, then each round's value when there are several
        spread = round_spread(c, key)
        return _f((c.get("ratios") or {}).get(key), ".2f", suffix="x") + (f" ({spread})" if spread else "")

    for c in doc["cells"]:
        r = c.get("ratios") or {}
        ratios.append([c["name"], with_rounds(c, "full_vs_vanilla_same_block"),
                       with_rounds(c, "fastgen_vs_full"), _f(r.get("fastgen_vs_vanilla"), ".2f", suffix="x"),
                       _f(r.get("vanilla_same_block_vs_vanilla"), ".2f", suffix="x"),
                       _f(r.get("passkey_points_fastgen_vs_full"), "+.1f", suffix=" pt")])
    rounds = (doc.get("args") or {}).get("rounds") or 1
    title = ("Output tokens/s ratios (same cell, same run" + (f"; median of {rounds} rounds, each round's value "
             "in brackets):" if rounds > 1 else "):"))
    out += [title, "", _md(ratios), ""]
    conc = [["cell", "whole requests fit (vanilla / bs32)", "fastgen ideal: rule / by chunk", "fastgen peak / mean",
             "mean / ideal mean", "preemptions (v / v32 / full / fastgen)", "curve predicts", "fastgen out tok/s"]]
    for c in doc["cells"]:
        cc = c.get("concurrency")
        if not cc:
            continue
        fg = cc.get("fastgen") or {}
        fits = " / ".join(_f((cc.get(k) or {}).get("ideal", {}).get("full"), "d") for k in ("vanilla", SAME_BLOCK_VANILLA))
        ideal = fg.get("ideal") or {}
        pre = " / ".join(_f((cc.get(k) or {}).get("preemptions"), ".0f")
                         for k in ("vanilla", SAME_BLOCK_VANILLA, "full", "fastgen"))
        pred = ", ".join(f"{k} {v:.2f}" for k, v in (c.get("curve_prediction") or {}).items() if v is not None)
        conc.append([c["name"], fits, f"{_f(ideal.get('by_rule'), 'd')} / {_f(ideal.get('by_chunk'), 'd')}"
                     + unbound_note(ideal),
                     f"{_f(fg.get('peak_running'), '.0f')} / {_f(fg.get('mean_running'), '.2f')}",
                     f"{_f(fg.get('mean_vs_ideal'), '.2f')} (ideal mean {_f(fg.get('ideal_mean'), '.2f')})", pre,
                     pred if c["output"] == "long" else "-", _f(_tps(c["runs"], "fastgen"), ".2f")])
    if len(conc) > 1:
        out += ["Memory-bound concurrency:", "", _md(conc), ""]
    head = [["cell", "fastgen ideal: rule -> by chunk", "ample memory's fastgen out tok/s / here",
             "fastgen TTFT p50 here / ample", "the admission rule"]]
    headroom = [[r["cell"], f"{r['by_rule']} -> {r['by_chunk']} (+{r['withheld']})",
                 _f(r["ample_gain"], ".2f", suffix="x"), _f(r["ttft_ratio"], ".2f"),
                 {None: "- (no ample cell)", True: "**limits**", False: "does not limit"}[r["limits"]]]
                for r in admission_headroom(doc["cells"])]
    if headroom:
        out += ["Admission headroom (what admitting by chunk, or no memory limit, could buy fastgen):", "",
                _md(head + headroom), ""]
    for label, curve in doc.get("curve", {}).items():
        rows = [["in flight", "output tok/s", "mean running", "TPOT p50", "wall"]]
        for p in curve["points"]:
            rows.append([str(p["in_flight"]), _f(p["output_tokens_per_s"], ".2f"), _f(p["mean_running"], ".2f"),
                         _f(p["tpot_s"]["p50"], ".0f", 1e3, " ms"), _f(p["wall_s"], ".0f", suffix=" s")])
        out += [f"Batching curve, {label} ({curve['budget']} budget, {curve['output_tokens']} output tokens):", "",
                _md(rows), ""]
    targets = [["target", "cell", "value", "bar", "verdict"]]
    for t in target_checks(doc["cells"]):  # today's rules, also for older files
        verdict = "n/a" if t["met"] is None else ("met" if t["met"] else "**missed**")
        targets.append([t["target"], t["cell"], _f(t["value"], ".2f"), f"{t['bar']:.2f}", verdict])
    if len(targets) > 1:
        out += ["Targets:", "", _md(targets), ""]
    return "\n".join(out)


# --------------------------------------------------------------------------- main


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--report"]:  # markdown tables of a finished run: bench --suite --report JSON
        if len(argv) != 2 or not Path(argv[1]).is_file():
            print("usage: vllm-adaptive-kv bench --suite --report SUITE.json", file=sys.stderr)
            return 2
        print(markdown_report(json.loads(Path(argv[1]).read_text())))
        return 0
    args = parse_args(argv)
    if args.model is None:
        from ..model import prepare_model

        args.model = str(prepare_model("smollm2"))
    elif not Path(args.model).is_dir():
        args.parser.error(f"--model={args.model!r} is not a folder: allowed a Hugging Face model folder")
    log_dir = Path(args.log_dir or tempfile.mkdtemp(prefix="vllm-adaptive-kv-suite-"))
    log_dir.mkdir(parents=True, exist_ok=True)
    suite = Suite(args, args.model, log_dir)
    workloads = cell_workloads(args, *suite.tokenizer)
    suite.begin(workloads)
    cpu = cpu_info()
    print(f"[suite] {cpu['model']}, key flags {' '.join(cpu['key_flags']) or '-'}; configs {','.join(args.configs)}; "
          f"budgets " + ", ".join(f"{b['name']} {b['bytes'] / 2**20:.1f} MiB" for b in suite.doc["budgets"])
          + f"; logs in {log_dir}", flush=True)
    budgets = suite.doc["budgets"]
    curve_budget = next((b for b in budgets if b["k"] is None), max(budgets, key=lambda b: b["bytes"]))
    previous = signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        for budget in budgets:  # in --budgets order: put first what must finish first
            suite.run_budget(budget, workloads, budget is curve_budget)
    except KeyboardInterrupt:
        print("[suite] interrupted; servers stopped", file=sys.stderr)
        suite.save()
        return 130
    except RuntimeError as e:
        print(f"[suite] error: {e}", file=sys.stderr)
        suite.save()
        return 1
    finally:
        signal.signal(signal.SIGTERM, previous)
    suite.finish()
    print(format_targets(suite.doc["targets"]))
    print(format_headroom(admission_headroom(suite.doc["cells"])))
    if args.out:
        print(f"\n[suite] results in {args.out}")
    failed = any(r["failed"] or not r["server_alive_after"] for c in suite.doc["cells"] for r in c["runs"].values())
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
