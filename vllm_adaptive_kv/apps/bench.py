"""`vllm-adaptive-kv bench`: serving throughput at a fixed KV budget, vanilla vLLM vs the plugin.

For each configuration (``vanilla`` = no ``--kv-policy``; ``full``, ``fastgen`` or
any other policy = the plugin), one real ``vllm serve`` process is started, warmed up
with one short request, driven by an async HTTP client that streams
``/v1/completions`` (so TTFT and TPOT are seen from the client), and stopped before
the next one starts. ``/metrics`` is polled meanwhile for the running requests
(peak) and the KV-cache usage (mean while requests are in flight).

Workload: N passkey prompts (chat-formatted, token length drawn uniformly from a
range) with an output length fixed or drawn from a range (``min_tokens = max_tokens``
and ``ignore_eos``, so every request generates exactly what was asked), arriving all
at once or as a Poisson process (``--rate``). The same workload (same seed) goes to
every configuration. Passkey accuracy (key found in the output) is the quality check.

Printed per configuration: output tokens/s, requests/s, peak running requests, mean
KV usage, TTFT and TPOT p50/p99, passkey accuracy, and ratios against vanilla; the
JSON file (``--out``) holds the same plus per-request details.

``bench --suite`` runs the benchmark matrix instead (``apps/bench_suite.py``: every
cell compared side by side; ``bench --suite --help``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import random
import re
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from .common import free_port, git_commit, http_get, machine_info, parse_metrics, token_counter

SCHEMA = "vllm-adaptive-kv-bench/1"
VANILLA = "vanilla"
SERVED_NAME = "bench"
_SIZE_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "m": 1000**2, "mb": 1000**2, "g": 1000**3, "gb": 1000**3,
               "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30}
# Ratios against vanilla: (result key path, label).
RATIO_KEYS = (("output_tokens_per_s",), ("requests_per_s",), ("peak_running",), ("mean_kv_usage",),
              ("mean_kv_usage_running",),
              ("ttft_s", "p50"), ("ttft_s", "p99"), ("tpot_s", "p50"), ("tpot_s", "p99"))


# --------------------------------------------------------------------------- CLI parsing (pure)


def parse_size(text: str) -> int:
    """Bytes from ``"67108864"``, ``"64MiB"``, ``"64M"`` (decimal) or ``"1.5GiB"``."""
    match = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([a-zA-Z]*)\s*", str(text))
    unit = match.group(2).lower() if match else None
    if not match or unit not in _SIZE_UNITS:
        raise ValueError(f"size {text!r} is invalid: allowed a number of bytes with an optional unit "
                         f"(B, K, M, G, KiB, MiB, GiB), e.g. 64MiB")
    value = int(float(match.group(1)) * _SIZE_UNITS[unit])
    if value <= 0:
        raise ValueError(f"size {text!r} is invalid: allowed > 0 bytes")
    return value


def parse_range(name: str, text: str, minimum: int = 1) -> tuple[int, int]:
    """``"16"`` -> (16, 16); ``"1200:1400"`` -> (1200, 1400); integers >= ``minimum``, lo <= hi."""
    parts = str(text).split(":")
    try:
        lo, hi = (int(parts[0]), int(parts[-1])) if len(parts) <= 2 else (None, None)
    except ValueError:
        lo = hi = None
    if lo is None or lo < minimum or hi < lo:
        raise ValueError(f"{name}={text!r} is invalid: allowed an integer N or a range LO:HI of integers "
                         f">= {minimum} with LO <= HI")
    return lo, hi


def parse_configs(text: str) -> list[str]:
    """Comma-separated configurations: ``vanilla`` and/or the plugin's policy names, no repeats."""
    from ..core.policies import POLICY_NAMES

    allowed = (VANILLA, *POLICY_NAMES)
    names = [c.strip() for c in str(text).split(",") if c.strip()]
    bad = [c for c in names if c not in allowed]
    if bad or not names or len(set(names)) != len(names):
        what = f"unknown {bad[0]!r}" if bad else ("repeated names" if names else "empty list")
        raise ValueError(f"--configs={text!r} is invalid ({what}): allowed a comma-separated list of "
                         f"distinct names from {', '.join(allowed)}")
    return names


def parse_policy_arg(text: str) -> tuple[str, str]:
    """``KEY=VALUE`` of ``--policy-arg`` (becomes ``--additional-config.KEY VALUE``)."""
    key, sep, value = str(text).partition("=")
    if not sep or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key) or not value:
        raise ValueError(f"--policy-arg {text!r} is invalid: allowed KEY=VALUE with KEY an identifier, "
                         f"e.g. recovery_ratio=0.9")
    return key, value


def _typed(parse):
    """argparse ``type`` from a parser raising ValueError (its message becomes argparse's error)."""
    def convert(text):
        try:
            return parse(text)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
    return convert


def _positive(kind):
    def convert(text):
        try:
            value = kind(text)
        except ValueError:
            value = None
        if value is None or not value > 0 or (isinstance(value, float) and not math.isfinite(value)):
            raise argparse.ArgumentTypeError(f"{text!r} is invalid: allowed a finite {kind.__name__} > 0")
        return value
    convert.__name__ = kind.__name__
    return convert


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vllm-adaptive-kv bench", description=__doc__.splitlines()[0])
    w = p.add_argument_group("workload")
    w.add_argument("--num-requests", "-n", type=_positive(int), default=16, help="requests (default 16)")
    w.add_argument("--prompt-tokens", type=_typed(lambda t: parse_range("--prompt-tokens", t, 64)), default="1250:1350",
                   metavar="N|LO:HI", help="prompt length in tokens (chat-formatted passkey prompt), drawn "
                   "uniformly (default 1250:1350)")
    w.add_argument("--output-tokens", type=_typed(lambda t: parse_range("--output-tokens", t, 1)), default="16",
                   metavar="N|LO:HI", help="output tokens per request, drawn uniformly; min_tokens = max_tokens "
                   "and ignore_eos (default 16)")
    w.add_argument("--rate", type=_positive(float), default=None,
                   help="Poisson arrivals at this many requests/s (default: all at once)")
    w.add_argument("--seed", type=int, default=0, help="workload seed: prompts, keys, depths, arrivals (default 0)")
    s = p.add_argument_group("servers")
    s.add_argument("--configs", type=_typed(parse_configs), default="vanilla,full,fastgen",
                   metavar="LIST", help="comma-separated: vanilla and/or plugin policies, run in this order "
                   "(default vanilla,full,fastgen)")
    s.add_argument("--model", default=None, help="model folder (default: the embedded SmolLM2-135M-Instruct)")
    s.add_argument("--kv-cache-memory-bytes", type=_typed(parse_size), default="64MiB", metavar="SIZE",
                   help="KV budget of every server (default 64MiB)")
    s.add_argument("--dtype", default="bfloat16", help="model dtype (default bfloat16)")
    s.add_argument("--max-model-len", type=_positive(int), default=2048, help="(default 2048)")
    s.add_argument("--max-num-seqs", type=_positive(int), default=None, help="(default: vLLM's)")
    s.add_argument("--block-size", type=_positive(int), default=None,
                   help="passed to every server (default: vLLM's for vanilla, the plugin's for policies)")
    s.add_argument("--enforce-eager", action=argparse.BooleanOptionalAction, default=True,
                   help="skip graph capture / compilation, ~60 s per start on CPU (default on)")
    s.add_argument("--vanilla-prefix-caching", action="store_true",
                   help="leave vLLM's prefix caching on for vanilla (default off: the plugin turns it off, and "
                   "the passkey prompts share long prefixes, so it would measure block sharing, not eviction)")
    s.add_argument("--kv-policy-config", default=None, metavar="YAML", help="passed to plugin servers")
    s.add_argument("--policy-arg", type=_typed(parse_policy_arg), action="append", default=[],
                   metavar="KEY=VALUE", help="plugin servers get --additional-config.KEY VALUE (repeatable)")
    s.add_argument("--serve-args", default="", metavar="ARGS",
                   help="extra `vllm serve` arguments for every server (one shell-quoted string)")
    s.add_argument("--vllm", default=str(Path(sys.executable).parent / "vllm"), help="the vllm executable (default: beside this Python)")
    s.add_argument("--port", type=_positive(int), default=None,
                   help="first server port; each server started takes the next (default: a free one each)")
    s.add_argument("--start-timeout", type=_positive(float), default=600.0, help="seconds for a server to start (default 600)")
    s.add_argument("--request-timeout", type=_positive(float), default=1800.0, help="seconds per request (default 1800)")
    o = p.add_argument_group("measurement and output")
    o.add_argument("--poll-interval", type=_positive(float), default=0.2, help="seconds between /metrics polls (default 0.2)")
    o.add_argument("--out", default=None, metavar="JSON", help="write the results here")
    o.add_argument("--log-dir", default=None, help="server logs (default: a new temporary folder)")
    return p


# --------------------------------------------------------------------------- workload (pure)


@dataclass(frozen=True)
class BenchRequest:
    index: int
    text: str  # the full prompt, chat template applied
    passkey: str
    depth: float
    prompt_tokens: int
    output_tokens: int
    arrival_s: float  # seconds after the start of the run


def arrival_times(n: int, rate: float | None, seed: int) -> list[float]:
    """All zeros without a rate; else a Poisson process (exponential gaps, first at 0)."""
    if not rate:
        return [0.0] * n
    rng = random.Random(f"arrivals-{seed}")
    times, t = [], 0.0
    for i in range(n):
        times.append(t)
        t += rng.expovariate(rate)
    return times


def filler_for_tokens(target: int, count_tokens) -> int:
    """Filler sentences that bring a passkey prompt closest to ``target`` tokens.

    ``count_tokens(num_filler)`` gives the prompt's token count; it is affine in the
    filler count up to a token or two, so two probes and one correction step suffice.
    """
    low, high = count_tokens(1), count_tokens(41)
    per = max((high - low) / 40.0, 1e-9)
    n = max(1, round(1 + (target - low) / per))
    best = min((abs(count_tokens(m) - target), m) for m in {max(1, n - 1), n, n + 1})
    return best[1]


def build_workload(n: int, prompt_range: tuple[int, int], output_range: tuple[int, int], seed: int,
                   rate: float | None, render, count) -> list[BenchRequest]:
    """``n`` passkey requests; deterministic in ``seed`` (prompts do not depend on ``rate``).

    ``render(message) -> prompt text`` (e.g. the chat template) and ``count(text) ->
    tokens`` come from the model's tokenizer (or fakes in tests).
    """
    from .prompts import passkey_prompt

    def tokens_with(num_filler: int) -> int:
        return count(render(passkey_prompt(num_filler, 0.5, seed=0).text))

    filler_cache: dict[int, int] = {}
    rng = random.Random(f"workload-{seed}")
    arrivals = arrival_times(n, rate, seed)
    requests = []
    for i in range(n):
        target = rng.randint(*prompt_range)
        out_tokens = rng.randint(*output_range)
        depth = round(rng.random(), 3)
        key_seed = rng.randrange(1 << 31)
        if target not in filler_cache:
            filler_cache[target] = filler_for_tokens(target, tokens_with)
        prompt = passkey_prompt(filler_cache[target], depth, key_seed)
        text = render(prompt.text)
        requests.append(BenchRequest(i, text, prompt.passkey, depth, count(text), out_tokens, arrivals[i]))
    return requests


def workload_summary(requests: list[BenchRequest], rate: float | None, seed: int) -> dict:
    prompt = [r.prompt_tokens for r in requests]
    output = [r.output_tokens for r in requests]

    def stats(v):
        return {"min": min(v), "max": max(v), "mean": sum(v) / len(v), "total": sum(v)}

    return {"requests": len(requests), "prompt_tokens": stats(prompt), "output_tokens": stats(output),
            "rate": rate, "seed": seed, "last_arrival_s": max(r.arrival_s for r in requests)}


# --------------------------------------------------------------------------- statistics (pure)


def percentile(values, q: float) -> float | None:
    """Linear-interpolated percentile (numpy's default), ``q`` in [0, 100]; None when empty."""
    v = sorted(values)
    if not v:
        return None
    if not 0 <= q <= 100:
        raise ValueError(f"q={q} is invalid: allowed 0 <= q <= 100")
    pos = (len(v) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(v) - 1)
    return v[lo] + (v[hi] - v[lo]) * (pos - lo)


def latency_stats(values) -> dict:
    values = [x for x in values if x is not None]
    return {"p50": percentile(values, 50), "p99": percentile(values, 99),
            "mean": sum(values) / len(values) if values else None}


def ratio(value, base) -> float | None:
    """value / base; None when either is missing or base is 0."""
    if value is None or base is None or base == 0:
        return None
    return value / base


def _dig(row: dict, path: tuple):
    for key in path:
        row = row.get(key) if isinstance(row, dict) else None
    return row


def add_ratios(rows: list[dict], baseline: str = VANILLA) -> None:
    """Set ``row["vs_vanilla"]`` on every row: metric ratios and accuracy difference in points."""
    base = next((r for r in rows if r["config"] == baseline), None)
    for row in rows:
        if base is None:
            row["vs_vanilla"] = None
            continue
        ratios = {"_".join(path): ratio(_dig(row, path), _dig(base, path)) for path in RATIO_KEYS}
        acc, base_acc = row.get("accuracy"), base.get("accuracy")
        ratios["accuracy_points"] = None if acc is None or base_acc is None else 100.0 * (acc - base_acc)
        row["vs_vanilla"] = ratios


# --------------------------------------------------------------------------- /metrics (pure)
# parse_metrics: .common


def metric_delta(after: dict, before: dict, name: str) -> float | None:
    if name not in after:
        return None
    return after[name] - before.get(name, 0.0)


def summarize_samples(samples: list[dict]) -> dict:
    """Peak running / waiting and KV usage (mean and max, as fractions) from /metrics samples.

    ``mean_kv_usage`` is over the samples taken while the client had requests in
    flight. vLLM publishes its gauges at the end of each engine step, after finished
    requests freed their blocks, so during a long step (a 1k-token prefill on CPU) they
    still show the previous step's end, often 0 running and 0 KV. Hence also
    ``mean_kv_usage_running``: the mean over in-flight samples that report running > 0.
    """
    busy = [s for s in samples if s["inflight"] > 0]
    usage = [s["kv_usage"] for s in busy if s["kv_usage"] is not None]
    usage_running = [s["kv_usage"] for s in busy if s["kv_usage"] is not None and s["running"]]
    running = [s["running"] for s in samples if s["running"] is not None]
    waiting = [s["waiting"] for s in samples if s["waiting"] is not None]
    return {"peak_running": max(running, default=None), "peak_waiting": max(waiting, default=None),
            "mean_kv_usage": sum(usage) / len(usage) if usage else None,
            "mean_kv_usage_running": sum(usage_running) / len(usage_running) if usage_running else None,
            "max_kv_usage": max(usage, default=None), "num_samples": len(samples)}


def summarize_run(config: str, results: list[dict], samples: list[dict], wall_s: float, workload) -> dict:
    """One configuration's row from its per-request results and /metrics samples."""
    done = [r for r in results if r["error"] is None]
    out_tokens = sum(r["output_tokens"] for r in done)
    row = {"config": config, "wall_s": wall_s, "completed": len(done), "failed": len(results) - len(done),
           "output_tokens": out_tokens,
           "output_tokens_per_s": out_tokens / wall_s if wall_s > 0 else None,
           "requests_per_s": len(done) / wall_s if wall_s > 0 else None,
           "ttft_s": latency_stats(r["ttft_s"] for r in done),
           "tpot_s": latency_stats(r["tpot_s"] for r in done),
           "latency_s": latency_stats(r["latency_s"] for r in done),
           "accuracy": sum(r["correct"] for r in results) / len(results) if results else None,
           "short_outputs": sum(1 for r, w in zip(results, workload) if r["error"] is None
                                and r["output_tokens"] != w.output_tokens)}
    row.update(summarize_samples(samples))
    return row


# --------------------------------------------------------------------------- printing (pure)


def _fmt(value, spec: str, scale: float = 1.0) -> str:
    return "-" if value is None else format(value * scale, spec)


def format_table(rows: list[dict]) -> str:
    head = (f"{'config':>9} {'out tok/s':>9} {'req/s':>7} {'peak run':>8} {'mean KV%':>8} {'KV% run':>7} "
            f"{'TTFT p50':>9} {'TTFT p99':>9} {'TPOT p50':>9} {'TPOT p99':>9} {'passkey':>7} {'failed':>6}")
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(
            f"{r['config']:>9} {_fmt(r['output_tokens_per_s'], '9.2f')} {_fmt(r['requests_per_s'], '7.3f')} "
            f"{_fmt(r['peak_running'], '8.0f')} {_fmt(r['mean_kv_usage'], '8.1f', 100)} "
            f"{_fmt(r.get('mean_kv_usage_running'), '7.1f', 100)} "
            f"{_fmt(r['ttft_s']['p50'], '8.2f')}s {_fmt(r['ttft_s']['p99'], '8.2f')}s "
            f"{_fmt(r['tpot_s']['p50'], '7.1f', 1e3)}ms {_fmt(r['tpot_s']['p99'], '7.1f', 1e3)}ms "
            f"{_fmt(r['accuracy'], '6.1f', 100)}% {r['failed']:>6}")
    ratio_rows = [r for r in rows if r.get("vs_vanilla") and r["config"] != VANILLA]
    if ratio_rows:
        lines.append("")
        lines.append(f"{'vs vanilla':>10} {'out tok/s':>9} {'req/s':>7} {'peak run':>8} {'mean KV':>8} {'KV run':>7} "
                     f"{'TTFT p50':>9} {'TTFT p99':>9} {'TPOT p50':>9} {'TPOT p99':>9} {'passkey':>7}")
        for r in ratio_rows:
            v = r["vs_vanilla"]
            cells = [_fmt(v[k], '8.2f') + "x" for k in ("output_tokens_per_s", "requests_per_s")]
            lines.append(
                f"{r['config']:>10} {cells[0]:>9} {cells[1]:>7} {_fmt(v['peak_running'], '7.2f')}x "
                f"{_fmt(v['mean_kv_usage'], '7.2f')}x {_fmt(v.get('mean_kv_usage_running'), '6.2f')}x "
                f"{_fmt(v['ttft_s_p50'], '8.2f')}x "
                f"{_fmt(v['ttft_s_p99'], '8.2f')}x {_fmt(v['tpot_s_p50'], '8.2f')}x "
                f"{_fmt(v['tpot_s_p99'], '8.2f')}x {_fmt(v['accuracy_points'], '+5.1f')}pt")
    return "\n".join(lines)


# --------------------------------------------------------------------------- servers


def server_command(config: str, args, model_dir: str, port: int) -> list[str]:
    """The ``vllm serve`` command line of one configuration."""
    cmd = [args.vllm, "serve", model_dir, "--host", "127.0.0.1", "--port", str(port),
           "--served-model-name", SERVED_NAME, "--dtype", args.dtype,
           "--max-model-len", str(args.max_model_len),
           "--kv-cache-memory-bytes", str(args.kv_cache_memory_bytes), "--seed", "0"]
    if args.enforce_eager:
        cmd.append("--enforce-eager")
    if args.max_num_seqs:
        cmd += ["--max-num-seqs", str(args.max_num_seqs)]
    if args.block_size:
        cmd += ["--block-size", str(args.block_size)]
    if config == VANILLA and not args.vanilla_prefix_caching:
        cmd.append("--no-enable-prefix-caching")
    if config != VANILLA:
        cmd += ["--kv-policy", config]
        if args.kv_policy_config:
            cmd += ["--kv-policy-config", args.kv_policy_config]
        for key, value in args.policy_arg:
            cmd += [f"--additional-config.{key}", value]
    return cmd + shlex.split(args.serve_args)


def start_server(cmd: list[str], log_path: Path) -> subprocess.Popen:
    """Start ``cmd`` in its own process group (so stop_server reaches every child)."""
    with open(log_path, "w") as log:
        return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)


def log_tail(log_path: Path, chars: int = 3000) -> str:
    try:
        return log_path.read_text(errors="replace")[-chars:]
    except OSError:
        return ""


def wait_healthy(base: str, proc: subprocess.Popen, timeout: float, log_path: Path) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"vllm serve exited with code {proc.returncode} during start-up "
                               f"(log {log_path}):\n{log_tail(log_path)}")
        try:
            http_get(base + "/health", timeout=5)
            return
        except OSError:
            time.sleep(1.0)
    raise RuntimeError(f"vllm serve was not healthy after {timeout:.0f} s (log {log_path}):\n{log_tail(log_path)}")


def stop_server(proc: subprocess.Popen, grace_s: float = 30.0) -> None:
    """SIGTERM the server's process group, then SIGKILL whatever is left after ``grace_s``."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            proc.wait(grace_s)
        except subprocess.TimeoutExpired:
            pass
    try:  # children may outlive the leader; the group id stays the leader's pid
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait()


# --------------------------------------------------------------------------- async client


def _request_body(req: BenchRequest) -> dict:
    return {"model": SERVED_NAME, "prompt": req.text, "max_tokens": req.output_tokens,
            "min_tokens": req.output_tokens, "ignore_eos": True, "temperature": 0.0, "stream": True,
            "stream_options": {"include_usage": True}}


def _result(req: BenchRequest, sent: float, token_times: list[float], text: str, usage_tokens, error) -> dict:
    n_out = usage_tokens if usage_tokens is not None else len(token_times)
    ttft = token_times[0] - sent if token_times else None
    tpot = (token_times[-1] - token_times[0]) / (n_out - 1) if token_times and n_out > 1 else None
    end = token_times[-1] if token_times else None
    return {"index": req.index, "prompt_tokens": req.prompt_tokens, "output_tokens": n_out if error is None else 0,
            "sent_s": sent, "ttft_s": ttft, "tpot_s": tpot, "latency_s": None if end is None else end - sent,
            "correct": error is None and req.passkey in text, "text": text, "error": error}


async def stream_request(session, url: str, req: BenchRequest, clock) -> dict:
    """One streaming completion; token arrival times taken from ``clock`` (seconds)."""
    sent = clock()
    token_times: list[float] = []
    pieces: list[str] = []
    usage_tokens = None
    try:
        async with session.post(url, json=_request_body(req)) as resp:
            if resp.status != 200:
                body = (await resp.text())[:500]
                return _result(req, sent, token_times, "", None, f"HTTP {resp.status}: {body}")
            async for raw in resp.content:
                line = raw.decode().strip()
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                chunk = json.loads(data)
                if chunk.get("usage"):
                    usage_tokens = chunk["usage"].get("completion_tokens")
                for choice in chunk.get("choices") or []:
                    token_times.append(clock())
                    pieces.append(choice.get("text") or "")
    except Exception as e:  # noqa: BLE001 - a failed request is a result, not a crash
        return _result(req, sent, token_times, "".join(pieces), None, f"{type(e).__name__}: {e}")
    return _result(req, sent, token_times, "".join(pieces), usage_tokens, None)


def _gauge(values: dict, name: str):
    return values.get(name)


async def poll_metrics(session, url: str, interval: float, state: dict, samples: list, clock) -> None:
    """Sample /metrics every ``interval`` s until cancelled."""
    while True:
        try:
            async with session.get(url) as resp:
                values = parse_metrics(await resp.text())
            samples.append({"t": clock(), "inflight": state["inflight"],
                            "running": _gauge(values, "vllm:num_requests_running"),
                            "waiting": _gauge(values, "vllm:num_requests_waiting"),
                            "kv_usage": _gauge(values, "vllm:kv_cache_usage_perc")})
        except Exception:  # noqa: BLE001 - a missed sample is not fatal
            pass
        await asyncio.sleep(interval)


async def drive(base: str, workload: list[BenchRequest], poll_interval: float,
                request_timeout: float, concurrency: int | None = None) -> tuple[list[dict], list[dict], float]:
    """Send the workload at its arrival times; returns (results, samples, wall seconds).

    With ``concurrency`` the arrival times are ignored: a closed loop of that many
    clients, each sending its next request (in workload order) when its last one ends,
    so exactly that many are in flight until the workload runs out.
    """
    import aiohttp

    t0 = time.perf_counter()

    def clock() -> float:
        return time.perf_counter() - t0

    state = {"inflight": 0}
    samples: list[dict] = []
    timeout = aiohttp.ClientTimeout(total=request_timeout)
    async with aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=0)) as session:
        slots = asyncio.Semaphore(concurrency) if concurrency else None

        async def send(req: BenchRequest) -> dict:
            state["inflight"] += 1
            try:
                return await stream_request(session, base + "/v1/completions", req, clock)
            finally:
                state["inflight"] -= 1

        async def one(req: BenchRequest) -> dict:
            if slots is None:
                await asyncio.sleep(max(0.0, req.arrival_s - clock()))
                return await send(req)
            async with slots:  # FIFO: gather starts the coroutines in workload order
                return await send(req)

        poller = asyncio.create_task(poll_metrics(session, base + "/metrics", poll_interval, state, samples, clock))
        try:
            results = await asyncio.gather(*(one(r) for r in workload))
        finally:
            poller.cancel()
        wall = clock()
    return list(results), samples, wall


async def warm_up(base: str) -> None:
    """One short request, so the first measured request pays no one-off costs."""
    import aiohttp

    body = {"model": SERVED_NAME, "prompt": "Hello", "max_tokens": 2, "temperature": 0.0}
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=300)) as session:
        async with session.post(base + "/v1/completions", json=body) as resp:
            if resp.status != 200:
                raise RuntimeError(f"warm-up request failed: HTTP {resp.status}: {(await resp.text())[:500]}")


# --------------------------------------------------------------------------- one configuration


def settled_metrics(base: str, timeout: float = 10.0) -> dict:
    """/metrics once nothing runs or waits (finished requests' counters have landed);
    {} if the server does not answer."""
    deadline = time.monotonic() + timeout
    values: dict = {}
    while True:
        try:
            values = parse_metrics(http_get(base + "/metrics"))
        except OSError:
            return values
        idle = not values.get("vllm:num_requests_running") and not values.get("vllm:num_requests_waiting")
        if idle or time.monotonic() > deadline:
            return values
        time.sleep(0.2)


class Server:
    """One ``vllm serve`` process, as a context: started, healthy and warmed up on
    enter; stopped (its whole process group) on exit, also on errors."""

    def __init__(self, label: str, cmd: list[str], port: int, log_path: Path, start_timeout: float) -> None:
        self.label, self.cmd, self.log_path, self.start_timeout = label, cmd, log_path, start_timeout
        self.base = f"http://127.0.0.1:{port}"
        self.proc: subprocess.Popen | None = None
        self.start_s: float | None = None

    def __enter__(self) -> "Server":
        print(f"[bench] {self.label}: starting `{shlex.join(self.cmd)}` (log {self.log_path})", flush=True)
        started = time.perf_counter()
        self.proc = start_server(self.cmd, self.log_path)
        try:
            wait_healthy(self.base, self.proc, self.start_timeout, self.log_path)
            self.start_s = time.perf_counter() - started
            asyncio.run(warm_up(self.base))
        except BaseException:
            stop_server(self.proc)
            raise
        print(f"[bench] {self.label}: up in {self.start_s:.1f} s", flush=True)
        return self

    def __exit__(self, *exc) -> None:
        if self.proc is not None:
            stop_server(self.proc)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


def mean_running(after: dict, before: dict, wall_s: float) -> float | None:
    """Time-averaged requests running during the run, by Little's law: the summed
    time each request spent from its first scheduling to its last token
    (``vllm:request_inference_time_seconds``, engine-side) over the wall time.

    Unlike the ``vllm:num_requests_running`` gauge, which is published after each
    step and so misses the requests a long prefill step has just admitted, this sees
    every request for its whole stay. A preempted request counts as running until it
    ends (vLLM keeps its first scheduling time), so read it beside the preemptions.
    """
    busy = metric_delta(after, before, "vllm:request_inference_time_seconds_sum")
    return None if busy is None or wall_s <= 0 else busy / wall_s


def measure(server: Server, config: str, workload: list[BenchRequest], args,
            concurrency: int | None = None) -> dict:
    """Run ``workload`` on a started ``server``; one result row (the server keeps running)."""
    before = settled_metrics(server.base)
    print(f"[bench] {server.label}: sending {len(workload)} requests"
          + (f", {concurrency} at a time" if concurrency else ""), flush=True)
    results, samples, wall = asyncio.run(drive(server.base, workload, args.poll_interval, args.request_timeout,
                                               concurrency))
    after = settled_metrics(server.base)
    row = summarize_run(config, results, samples, wall, workload)
    kept_sum = metric_delta(after, before, "vllm_adaptive_kv:kept_fraction_sum")
    kept_count = metric_delta(after, before, "vllm_adaptive_kv:kept_fraction_count")
    row.update({"server_cmd": server.cmd, "start_s": server.start_s, "server_alive_after": server.alive(),
                "loadavg_after": os.getloadavg() if hasattr(os, "getloadavg") else None,
                "preemptions": metric_delta(after, before, "vllm:num_preemptions_total"),
                "mean_running": mean_running(after, before, wall),
                "kept_fraction": ratio(kept_sum, kept_count), "log": str(server.log_path), "samples": samples,
                "requests": [{k: v for k, v in r.items() if k != "text"} | {"text": r["text"][:200]}
                             for r in results]})
    return row


def next_port(args) -> int:
    """``--port`` and up, one per server started, else a free port from the OS."""
    if args.port is None:
        return free_port()
    port = args.port + getattr(args, "_servers_started", 0)
    args._servers_started = getattr(args, "_servers_started", 0) + 1
    return port


def run_config(config: str, args, model_dir: str, workload: list[BenchRequest], log_dir: Path) -> dict:
    """Start the server, warm it up, run the workload, stop the server (always)."""
    port = next_port(args)
    cmd = server_command(config, args, model_dir, port)
    with Server(config, cmd, port, log_dir / f"serve-{config}.log", args.start_timeout) as server:
        return measure(server, config, workload, args)


# --------------------------------------------------------------------------- main


def tokenizer_fns(model_dir: str):
    """(render, count) for build_workload, from the model's own tokenizer."""
    from transformers import AutoTokenizer

    from .prompts import chat_text

    tok = AutoTokenizer.from_pretrained(model_dir)
    return (lambda message: chat_text(tok, message), token_counter(tok))


def write_json(path: str | None, doc: dict) -> None:
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(path).with_suffix(".tmp")
        tmp.write_text(json.dumps(doc, indent=1))
        tmp.replace(path)


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--suite" in argv:  # the benchmark matrix: its own options (bench --suite --help)
        from . import bench_suite

        return bench_suite.main([a for a in argv if a != "--suite"])
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.prompt_tokens[1] + args.output_tokens[1] > args.max_model_len:
        parser.error(f"--prompt-tokens up to {args.prompt_tokens[1]} plus --output-tokens up to "
                     f"{args.output_tokens[1]} exceed --max-model-len={args.max_model_len}: allowed a sum "
                     f"<= --max-model-len")
    if not Path(args.vllm).exists():
        parser.error(f"--vllm={args.vllm!r} does not exist: allowed the path of a vllm executable")
    if args.kv_policy_config and not Path(args.kv_policy_config).is_file():
        parser.error(f"--kv-policy-config={args.kv_policy_config!r} is not a file")
    if args.model is None:
        from ..model import prepare_model

        args.model = str(prepare_model("smollm2"))
    elif not Path(args.model).is_dir():
        parser.error(f"--model={args.model!r} is not a folder: allowed a Hugging Face model folder")
    log_dir = Path(args.log_dir or tempfile.mkdtemp(prefix="vllm-adaptive-kv-bench-"))
    log_dir.mkdir(parents=True, exist_ok=True)

    workload = build_workload(args.num_requests, args.prompt_tokens, args.output_tokens, args.seed, args.rate,
                              *tokenizer_fns(args.model))
    doc = {"schema": SCHEMA, "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **git_commit(),
           "machine": machine_info(), "args": {k: v for k, v in vars(args).items()},
           "workload": workload_summary(workload, args.rate, args.seed),
           "workload_requests": [{k: v for k, v in asdict(r).items() if k != "text"} for r in workload],
           "configs": []}
    w = doc["workload"]
    print(f"[bench] {w['requests']} passkey requests, prompt tokens {w['prompt_tokens']['min']}-"
          f"{w['prompt_tokens']['max']} (mean {w['prompt_tokens']['mean']:.0f}), output tokens "
          f"{w['output_tokens']['min']}-{w['output_tokens']['max']}, "
          f"{'all at once' if not args.rate else f'Poisson {args.rate}/s'}; KV budget "
          f"{args.kv_cache_memory_bytes:,} bytes, {args.dtype}; configs {','.join(args.configs)}", flush=True)

    previous = signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        for config in args.configs:
            doc["configs"].append(run_config(config, args, args.model, workload, log_dir))
            add_ratios(doc["configs"])
            write_json(args.out, doc)
    except KeyboardInterrupt:
        print("[bench] interrupted; servers stopped", file=sys.stderr)
        write_json(args.out, doc)
        return 130
    except RuntimeError as e:
        print(f"[bench] error: {e}", file=sys.stderr)
        write_json(args.out, doc)
        return 1
    finally:
        signal.signal(signal.SIGTERM, previous)

    print()
    print(format_table(doc["configs"]))
    if args.out:
        print(f"\n[bench] results in {args.out}")
        from .bench_plot import plot_beside  # the PNG beside the JSON (matplotlib loads only here)
        print(f"[bench] {plot_beside(args.out)}")
    failed = any(r["failed"] or not r["server_alive_after"] for r in doc["configs"])
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
