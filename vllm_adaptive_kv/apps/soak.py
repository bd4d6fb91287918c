"""Soak a real ``vllm serve --kv-policy fastgen``: mixed traffic, then prove nothing leaked.

Concurrent clients send, over plain HTTP (aiohttp), a seeded mix of:

- completions and chat, streaming and not, some with ``ignore_eos`` so outputs
  run long and the tight KV budget forces preemption;
- streams cancelled mid-way by closing the connection;
- per-request policy overrides (``vllm_xargs``), valid ones and invalid ones:
  an unknown policy, out-of-range values, wrong types, a misspelled key;
- prompts longer than ``max_model_len``;
- ``n`` > 1 and ``max_tokens`` = 1.

Before and after, greedy probe prompts run alone on the idle server. Afterwards
the soak checks that:

- the server is alive (``/health``) and idle (no request running or waiting);
- every head page is free: ``vllm_adaptive_kv:pages_free`` is back to its start
  value (the whole pool, when the server log names its size), the idle-pool
  audit ran again and ``vllm_adaptive_kv:pool_audit_failures_total`` is 0, and
  ``vllm:kv_cache_usage_perc`` is 0;
- the probes give the same text as before;
- every invalid request got a 4xx whose body names the bad field (for a stream
  vLLM may send it as the stream's error event after a 200, see
  ``stream_error_code``);
- no valid request got a 5xx (or any other error, or no answer in time).

``run_soak`` does this against a running server; ``VllmServer`` starts one the
way the tests and ``scripts/soak.py`` do. Every figure comes back in a
``SoakReport`` (its ``failures`` list is empty when the soak passed).
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .common import http_get, parse_metrics

MODEL_NAME = "soak-model"  # --served-model-name

# --------------------------------------------------------------------------- the server


@dataclass
class ServerSettings:
    """How ``VllmServer`` starts ``vllm serve`` (sizes for the embedded SmolLM2-135M)."""

    model_dir: str
    port: int
    budget_mib: int = 48  # --kv-cache-memory-bytes; 48 MiB = 33 blocks of 32 tokens in float32
    max_model_len: int = 1024
    dtype: str = "float32"  # vLLM CPU emulates bf16 on AVX2-only machines (~10x slower)
    kv_policy: str = "fastgen"
    shutdown_timeout: int = 5  # vLLM's grace period on SIGTERM (see docs/reliability.md)
    extra_args: tuple[str, ...] = ()
    env: dict[str, str] = field(default_factory=dict)

    def command(self) -> list[str]:
        vllm = str(Path(sys.executable).parent / "vllm")
        return [vllm, "serve", self.model_dir, "--kv-policy", self.kv_policy, "--host", "127.0.0.1",
                "--port", str(self.port), "--dtype", self.dtype, "--max-model-len", str(self.max_model_len),
                "--kv-cache-memory-bytes", str(self.budget_mib << 20), "--enforce-eager",
                "--served-model-name", MODEL_NAME, "--shutdown-timeout", str(self.shutdown_timeout),
                *self.extra_args]


class VllmServer:
    """A ``vllm serve`` process in its own process group, its output in ``log_path``."""

    def __init__(self, settings: ServerSettings, log_path: str | os.PathLike) -> None:
        self.settings = settings
        self.log_path = Path(log_path)
        self.base = f"http://127.0.0.1:{settings.port}"
        self.proc: subprocess.Popen | None = None

    def start(self, timeout_s: float) -> None:
        """Start and wait for ``/health``; raise RuntimeError with the log's tail if it fails."""
        with open(self.log_path, "w") as out:
            self.proc = subprocess.Popen(self.settings.command(), stdout=out, stderr=subprocess.STDOUT,
                                         start_new_session=True, env={**os.environ, **self.settings.env})
        deadline = time.time() + timeout_s
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"vllm serve exited with {self.proc.returncode} while starting:\n{self.log_tail()}")
            if self.healthy():
                return
            time.sleep(1)
        self.kill()
        raise RuntimeError(f"vllm serve did not answer /health in {timeout_s:.0f} s:\n{self.log_tail()}")

    def healthy(self) -> bool:
        try:
            http_get(self.base + "/health", timeout=5)
            return True
        except OSError:
            return False

    def log_tail(self, chars: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return "(no log)"

    def pool_pages(self) -> int | None:
        """The pool's head pages, from the worker's start-up line in the log (None if absent)."""
        try:
            match = re.search(r"vllm-adaptive-kv: (\d+) head pages", self.log_path.read_text(errors="replace"))
        except OSError:
            return None
        return int(match.group(1)) if match else None

    def group_members(self) -> list[int]:
        """Live processes of the server's process group (its engine core, workers, helpers)."""
        assert self.proc is not None
        members = []
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                if os.getpgid(int(entry)) == self.proc.pid and not _is_zombie(int(entry)):
                    members.append(int(entry))
            except (ProcessLookupError, PermissionError):
                continue
        return members

    def terminate(self, timeout_s: float) -> int | None:
        """SIGTERM the server; its exit code, or None if it outlived ``timeout_s`` (then it is killed)."""
        assert self.proc is not None
        if self.proc.poll() is not None:
            return self.proc.returncode
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.kill()
            return None

    def kill(self) -> None:
        """SIGKILL the whole process group (clean-up after a failure)."""
        if self.proc is None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait()


def _is_zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


# --------------------------------------------------------------------------- the traffic


@dataclass
class SoakConfig:
    clients: int = 4
    requests: int = 60  # requests sent in all (probes not counted)
    duration_s: float | None = None  # stop sending new requests after this long
    max_model_len: int = 1024
    seed: int = 0
    request_timeout_s: float = 600.0  # one request's answer; sized for a ~10x slower machine
    idle_timeout_s: float = 120.0  # the server going idle after the traffic
    max_output_tokens: int = 96


@dataclass
class Case:
    """One request: what to send and what must come back."""

    kind: str  # label for the figures, e.g. "chat_stream", "invalid_override"
    path: str  # /v1/completions or /v1/chat/completions
    body: dict
    expect: str = "ok"  # "ok" | "invalid" | "cancel"
    field: str | None = None  # for "invalid": text the 4xx body must contain
    cancel_after: int = 0  # for "cancel": data chunks read before closing the connection


@dataclass
class Outcome:
    kind: str
    expect: str
    status: int | None
    passed: bool
    detail: str = ""
    seconds: float = 0.0


# Valid per-request overrides (vllm_xargs) and invalid ones with the field the 400 must name.
VALID_OVERRIDES = (
    {"kv_policy": "full"},
    {"kv_policy": "fastgen", "recovery_ratio": 0.9},
    {"recovery_ratio": 0.8, "local_ratio": 0.2},
    {"kv_policy": "h2o", "budget_ratio": 0.5},
    {"kv_policy": "streamingllm", "budget_ratio": 0.4, "sink_tokens": 4},
    {"kv_policy": "snapkv", "budget_ratio": 0.5, "window": 16},
    {"observation_window": 32},
    {"kv_policy": "fastgen", "some_other_extension": 3},  # a foreign key passes through
)
INVALID_OVERRIDES = (
    ({"kv_policy": "nope"}, "kv_policy"),  # unknown policy
    ({"recovery_ratio": 7}, "recovery_ratio"),  # out of range
    ({"kv_policy": "h2o", "budget_ratio": -0.5}, "budget_ratio"),
    ({"kv_policy": "snapkv", "pool_kernel": 4}, "pool_kernel"),  # must be odd
    ({"recovery_ratio": "high"}, "recovery_ratio"),  # wrong type
    ({"kv_policy": "streamingllm", "sink_tokens": 2.5}, "sink_tokens"),
    ({"observation_window": "64"}, "observation_window"),
    ({"kv_policy": "fastgen", "recovery_ration": 0.9}, "recovery_ration"),  # misspelled key of ours
    ({"kv_policy": "fastgen", "budget_ratio": 0.5}, "budget_ratio"),  # key of another policy
)
TOO_LONG_FIELD = "maximum context length"

WORDS = ("river", "stone", "quiet", "market", "seven", "lantern", "orbit", "garden", "copper", "winter",
         "signal", "harbor", "violet", "engine", "paper", "thunder", "meadow", "silver", "bridge", "candle")
CHAT_TOPICS = ("the sea", "a small robot", "autumn", "a busy kitchen", "the night sky", "a long train ride")


def filler(rng: random.Random, words: int) -> str:
    """Deterministic prose of about ``words`` words (~1.3 tokens each for SmolLM2)."""
    out, sentence = [], []
    for _ in range(words):
        sentence.append(rng.choice(WORDS))
        if len(sentence) >= rng.randint(6, 12):
            out.append(" ".join(sentence).capitalize() + ".")
            sentence = []
    if sentence:
        out.append(" ".join(sentence).capitalize() + ".")
    return " ".join(out)


class CaseMaker:
    """A seeded stream of cases covering every kind the soak must exercise."""

    KINDS = (  # (kind, weight)
        ("completion", 3), ("completion_stream", 3), ("chat", 3), ("chat_stream", 3),
        ("cancel_stream", 4), ("valid_override", 3), ("invalid_override", 2), ("too_long", 1),
        ("n_gt_1", 2), ("max_tokens_1", 2),
    )

    def __init__(self, cfg: SoakConfig) -> None:
        self.cfg = cfg
        self.rng = random.Random(cfg.seed)
        self.count = 0

    def next(self) -> Case:
        # The first cases take each kind once, so even a short soak covers all of them.
        kinds = [k for k, _ in self.KINDS]
        if self.count < len(kinds):
            kind = kinds[self.count]
        else:
            kind = self.rng.choices(kinds, weights=[w for _, w in self.KINDS])[0]
        self.count += 1
        return getattr(self, f"_{kind}")()

    # --- building blocks

    def _prompt_words(self) -> int:
        # Mostly short and medium prompts, some long enough to crowd the KV budget.
        return self.rng.choice((20, 60, 120, 250, 400))

    def _body(self, chat: bool, stream: bool, max_tokens: int | None = None, long_output: bool = False) -> tuple:
        words = self._prompt_words()
        text = filler(self.rng, words)
        body: dict[str, Any] = {"model": MODEL_NAME, "stream": stream,
                                "max_tokens": max_tokens or self.rng.randint(4, self.cfg.max_output_tokens),
                                "temperature": self.rng.choice((0.0, 0.7)), "seed": self.rng.randint(0, 1000)}
        if long_output or self.rng.random() < 0.3:
            body["ignore_eos"] = True  # run to max_tokens: long decodes are what preempt
        if chat:
            topic = self.rng.choice(CHAT_TOPICS)
            body["messages"] = [{"role": "user", "content": f"{text}\n\nNow write a story about {topic}."}]
            return "/v1/chat/completions", body
        body["prompt"] = text
        return "/v1/completions", body

    def _plain(self, kind: str, chat: bool, stream: bool) -> Case:
        path, body = self._body(chat, stream)
        return Case(kind, path, body)

    # --- the kinds

    def _completion(self) -> Case:
        return self._plain("completion", chat=False, stream=False)

    def _completion_stream(self) -> Case:
        return self._plain("completion_stream", chat=False, stream=True)

    def _chat(self) -> Case:
        return self._plain("chat", chat=True, stream=False)

    def _chat_stream(self) -> Case:
        return self._plain("chat_stream", chat=True, stream=True)

    def _cancel_stream(self) -> Case:
        path, body = self._body(self.rng.random() < 0.5, stream=True, max_tokens=self.cfg.max_output_tokens,
                                long_output=True)
        return Case("cancel_stream", path, body, expect="cancel", cancel_after=self.rng.randint(1, 6))

    def _valid_override(self) -> Case:
        path, body = self._body(self.rng.random() < 0.5, stream=self.rng.random() < 0.5)
        body["vllm_xargs"] = dict(self.rng.choice(VALID_OVERRIDES))
        return Case("valid_override", path, body)

    def _invalid_override(self) -> Case:
        path, body = self._body(self.rng.random() < 0.5, stream=self.rng.random() < 0.5)
        override, name = self.rng.choice(INVALID_OVERRIDES)
        body["vllm_xargs"] = dict(override)
        return Case("invalid_override", path, body, expect="invalid", field=name)

    def _too_long(self) -> Case:
        chat = self.rng.random() < 0.5
        path, body = self._body(chat, stream=self.rng.random() < 0.5)
        text = filler(self.rng, int(self.cfg.max_model_len * 1.5))  # ~2 tokens a word: well over
        if chat:
            body["messages"] = [{"role": "user", "content": text}]
        else:
            body["prompt"] = text
        return Case("too_long", path, body, expect="invalid", field=TOO_LONG_FIELD)

    def _n_gt_1(self) -> Case:
        path, body = self._body(self.rng.random() < 0.5, stream=self.rng.random() < 0.5)
        body["n"] = self.rng.choice((2, 3))
        body["temperature"] = 0.8
        return Case("n_gt_1", path, body)

    def _max_tokens_1(self) -> Case:
        path, body = self._body(self.rng.random() < 0.5, stream=self.rng.random() < 0.5, max_tokens=1)
        return Case("max_tokens_1", path, body)


# --------------------------------------------------------------------------- sending


async def send(session, base: str, case: Case, timeout_s: float) -> Outcome:
    """Send one case and judge what came back."""
    import aiohttp

    start = time.perf_counter()
    try:
        async with session.post(base + case.path, json=case.body,
                                timeout=aiohttp.ClientTimeout(total=timeout_s)) as resp:
            outcome = await _judge(resp, case)
    except asyncio.TimeoutError:
        outcome = Outcome(case.kind, case.expect, None, False, f"no answer in {timeout_s:.0f} s")
    except aiohttp.ClientError as err:
        outcome = Outcome(case.kind, case.expect, None, False, f"{type(err).__name__}: {err}")
    outcome.seconds = time.perf_counter() - start
    return outcome


async def _judge(resp, case: Case) -> Outcome:
    status = resp.status
    if case.expect == "invalid":
        text = await resp.text()
        code = status if status != 200 else stream_error_code(text)
        passed = code is not None and 400 <= code < 500 and case.field in text
        detail = "" if passed else f"expected a 4xx naming {case.field!r}, got {status}: {text[:300]}"
        return Outcome(case.kind, case.expect, code, passed, detail)
    if status != 200:
        return Outcome(case.kind, case.expect, status, False, f"valid request got {status}: {(await resp.text())[:300]}")
    if case.expect == "cancel":
        return await _read_then_close(resp, case)
    if case.body.get("stream"):
        return await _check_stream(resp, case)
    return _check_body(await resp.json(), case)


def stream_error_code(text: str) -> int | None:
    """The ``code`` of a stream's error event, or None.

    vLLM 0.32 checks a request's sampling parameters with the custom logits
    processors (where the plugin's validator lives) inside ``generate``, which a
    streaming response runs after it has sent its 200 headers: the 400 then comes
    as the stream's error event, ``data: {"error": {..., "code": 400}}``.
    """
    for line in text.splitlines():
        if line.startswith("data: {"):
            error = json.loads(line[len("data: "):]).get("error")
            if isinstance(error, dict):
                return int(error.get("code") or 0) or None
    return None


async def _read_then_close(resp, case: Case) -> Outcome:
    """Read a few data chunks, then drop the connection (the server must abort the request)."""
    chunks = 0
    async for line in resp.content:
        if line.startswith(b"data: ") and line.strip() != b"data: [DONE]":
            chunks += 1
            if chunks >= case.cancel_after:
                resp.close()  # the connector is force_close: this closes the TCP connection
                return Outcome(case.kind, case.expect, 200, True, f"cancelled after {chunks} chunks")
    return Outcome(case.kind, case.expect, 200, True, "finished before the cancel point")


async def _check_stream(resp, case: Case) -> Outcome:
    done, text_chunks = False, 0
    async for line in resp.content:
        line = line.strip()
        if not line.startswith(b"data: "):
            continue
        data = line[len(b"data: "):]
        if data == b"[DONE]":
            done = True
            break
        chunk = json.loads(data)
        if "error" in chunk:  # an error inside a 200 stream is a server error
            return Outcome(case.kind, case.expect, 200, False, f"error in stream: {str(chunk['error'])[:300]}")
        text_chunks += 1
    if not done:
        return Outcome(case.kind, case.expect, 200, False, "stream ended without [DONE]")
    return Outcome(case.kind, case.expect, 200, text_chunks > 0, "" if text_chunks else "empty stream")


def _check_body(body: dict, case: Case) -> Outcome:
    n = case.body.get("n", 1)
    choices = body.get("choices", [])
    if len(choices) != n:
        return Outcome(case.kind, case.expect, 200, False, f"{len(choices)} choices for n={n}")
    if case.body.get("max_tokens") == 1 and body.get("usage", {}).get("completion_tokens") != n:
        return Outcome(case.kind, case.expect, 200, False,
                       f"max_tokens=1 gave {body.get('usage', {}).get('completion_tokens')} tokens")
    return Outcome(case.kind, case.expect, 200, True)


# --------------------------------------------------------------------------- probes and server state

PROBES = (
    ("/v1/completions", {"prompt": "The capital of France is", "max_tokens": 16}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Name three colors of the rainbow."}],
                              "max_tokens": 24}),
    ("/v1/completions", {"prompt": filler(random.Random(7), 300) + "\nIn short, the text above is about",
                         "max_tokens": 16}),
)


async def run_probes(session, base: str, timeout_s: float) -> list[str]:
    """Greedy probe texts, one request at a time on an idle server."""
    import aiohttp

    texts = []
    for path, extra in PROBES:
        body = {"model": MODEL_NAME, "temperature": 0.0, **extra}
        async with session.post(base + path, json=body, timeout=aiohttp.ClientTimeout(total=timeout_s)) as resp:
            if resp.status != 200:
                raise RuntimeError(f"probe {path} got {resp.status}: {(await resp.text())[:300]}")
            choice = (await resp.json())["choices"][0]
            texts.append(choice["text"] if "text" in choice else choice["message"]["content"])
    return texts


STATE_METRICS = {
    "running": "vllm:num_requests_running",
    "waiting": "vllm:num_requests_waiting",
    "kv_usage": "vllm:kv_cache_usage_perc",
    "preemptions": "vllm:num_preemptions_total",
    "pages_free": "vllm_adaptive_kv:pages_free",
    "pool_audits": "vllm_adaptive_kv:pool_audits_total",
    "pool_audit_failures": "vllm_adaptive_kv:pool_audit_failures_total",
}


def server_state(base: str) -> dict[str, float | None]:
    values = parse_metrics(http_get(base + "/metrics"))
    return {key: values.get(name) for key, name in STATE_METRICS.items()}


async def wait_idle(base: str, timeout_s: float, audits_above: float = -1.0,
                    pages_free: float | None = None) -> dict:
    """Poll /metrics until nothing runs or waits, an idle-pool audit newer than
    ``audits_above`` has been reported and, if given, ``pages_free`` is back; return
    that state (or the last one seen, on timeout: the caller judges it).

    The engine's last step before idling releases the finished requests' pages and
    reports the pool; its stats reach /metrics a moment after those of the step that
    finished the last request, so a poll may see "idle" a moment before the pool.
    """
    deadline = time.time() + timeout_s
    while True:
        state = await asyncio.to_thread(server_state, base)
        idle = state["running"] == 0 and state["waiting"] == 0
        audited = (state["pool_audits"] or 0) > audits_above
        pool_back = pages_free is None or state["pages_free"] == pages_free
        if idle and audited and pool_back or time.time() > deadline:
            return state
        await asyncio.sleep(0.5)


# --------------------------------------------------------------------------- the soak


@dataclass
class SoakReport:
    config: dict
    duration_s: float = 0.0
    requests: int = 0
    by_kind: dict[str, int] = field(default_factory=dict)
    statuses: dict[str, int] = field(default_factory=dict)
    cancellations: int = 0
    invalid_rejected: int = 0
    preemptions: float = 0.0
    pool_pages: int | None = None
    pages_free_start: float | None = None
    pages_free_end: float | None = None
    pool_audits: float = 0.0  # idle-pool audits during the soak (incl. the final one)
    pool_audit_failures: float | None = None
    probes_before: list[str] = field(default_factory=list)
    probes_after: list[str] = field(default_factory=list)
    slowest_request_s: float = 0.0
    failures: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return not self.failures

    def to_dict(self) -> dict:
        return {**asdict(self), "passed": self.passed}

    def summary(self) -> str:
        pages = f"{self.pages_free_end:.0f}/{self.pool_pages or '?'}" if self.pages_free_end is not None else "?"
        return (f"soak: {self.requests} requests in {self.duration_s:.0f} s, {self.cancellations} cancelled, "
                f"{self.invalid_rejected} invalid rejected, {self.preemptions:.0f} preemptions, pages free "
                f"{pages} (start {self.pages_free_start}), {self.pool_audits:.0f} idle audits, "
                f"{self.pool_audit_failures} audit failures: " + ("passed" if self.passed else
                                                                   f"FAILED ({len(self.failures)} failures)"))


async def _soak(base: str, cfg: SoakConfig, pool_pages: int | None) -> SoakReport:
    import aiohttp

    report = SoakReport(config=asdict(cfg), pool_pages=pool_pages)
    # force_close: one TCP connection per request, so closing a stream is a real disconnect.
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as session:
        report.probes_before = await run_probes(session, base, cfg.request_timeout_s)
        start = await wait_idle(base, cfg.idle_timeout_s, audits_above=0)
        report.pages_free_start = start["pages_free"]
        outcomes = await _traffic(session, base, cfg, report)
        end = await wait_idle(base, cfg.idle_timeout_s, start["pool_audits"] or 0, start["pages_free"])
        report.probes_after = await run_probes(session, base, cfg.request_timeout_s)
        final = await wait_idle(base, cfg.idle_timeout_s, end["pool_audits"] or 0, start["pages_free"])
    _tally(report, outcomes)
    _check_pool(report, start, end, final)
    if report.probes_after != report.probes_before:
        report.failures.append(f"greedy probes changed: before {report.probes_before!r}, after {report.probes_after!r}")
    return report


async def _traffic(session, base: str, cfg: SoakConfig, report: SoakReport) -> list[Outcome]:
    maker = CaseMaker(cfg)
    outcomes: list[Outcome] = []
    started = time.perf_counter()
    deadline = None if cfg.duration_s is None else started + cfg.duration_s

    async def client() -> None:
        while maker.count < cfg.requests and (deadline is None or time.perf_counter() < deadline):
            outcomes.append(await send(session, base, maker.next(), cfg.request_timeout_s))

    await asyncio.gather(*(client() for _ in range(cfg.clients)))
    report.duration_s = round(time.perf_counter() - started, 1)
    return outcomes


def _tally(report: SoakReport, outcomes: list[Outcome]) -> None:
    report.requests = len(outcomes)
    for o in outcomes:
        report.by_kind[o.kind] = report.by_kind.get(o.kind, 0) + 1
        key = str(o.status)
        report.statuses[key] = report.statuses.get(key, 0) + 1
        report.cancellations += o.expect == "cancel" and o.detail.startswith("cancelled")
        report.invalid_rejected += o.expect == "invalid" and o.passed
        report.slowest_request_s = round(max(report.slowest_request_s, o.seconds), 1)
        if not o.passed:
            report.failures.append(f"{o.kind}: {o.detail}")
    missing = [k for k, _ in CaseMaker.KINDS if k not in report.by_kind]
    if missing and report.requests >= len(CaseMaker.KINDS):
        report.failures.append(f"kinds never sent: {missing}")


def _check_pool(report: SoakReport, start: dict, end: dict, final: dict) -> None:
    report.pages_free_end = final["pages_free"]
    report.preemptions = (end["preemptions"] or 0) - (start["preemptions"] or 0)
    report.pool_audits = (final["pool_audits"] or 0) - (start["pool_audits"] or 0)
    report.pool_audit_failures = final["pool_audit_failures"]
    for name, state in (("after the traffic", end), ("after the probes", final)):
        if state["running"] != 0 or state["waiting"] != 0:
            report.failures.append(f"server not idle {name}: {state['running']} running, {state['waiting']} waiting")
        if state["pages_free"] != start["pages_free"]:
            report.failures.append(f"pages_free {name} is {state['pages_free']}, at the start {start['pages_free']}")
        if state["kv_usage"] not in (0, 0.0):
            report.failures.append(f"vllm:kv_cache_usage_perc {name} is {state['kv_usage']}, not 0")
    if report.pool_pages is not None and start["pages_free"] != report.pool_pages:
        report.failures.append(f"pages_free at the start is {start['pages_free']}, the pool has {report.pool_pages}")
    if report.pool_audits < 1:
        report.failures.append("no idle-pool audit was reported after the traffic")
    if final["pool_audit_failures"] is None:
        report.failures.append("vllm_adaptive_kv:pool_audit_failures_total is not on /metrics")
    elif final["pool_audit_failures"] != 0:
        report.failures.append(f"{final['pool_audit_failures']:.0f} idle-pool audits failed (see the server log)")


def run_soak(base: str, cfg: SoakConfig, pool_pages: int | None = None) -> SoakReport:
    """Soak the server at ``base`` (served model name ``MODEL_NAME``); see the module docstring."""
    report = asyncio.run(_soak(base, cfg, pool_pages))
    try:
        http_get(base + "/health", timeout=10)
    except OSError as err:
        report.failures.append(f"server not alive after the soak: {err}")
    return report


def cpu_flags() -> str:
    """'AVX-512' or 'AVX2' (or 'neither') from /proc/cpuinfo: what sets vLLM CPU's speed."""
    try:
        flags = next((line for line in open("/proc/cpuinfo") if line.startswith("flags")), "")
    except OSError:
        return "unknown"
    return "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else "neither AVX2 nor AVX-512"
