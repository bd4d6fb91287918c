"""GuideLLM, vLLM's own load-testing client, against vanilla and plugin servers at one KV budget.

For each configuration one ``vllm serve`` starts exactly as ``vllm-adaptive-kv bench``
starts it (same command line: ``bench.server_command``), is warmed up, and
``guidellm run`` (from its own virtualenv, ``scripts/guidellm_setup.sh``) drives it
through each profile in turn; the server is stopped before the next configuration.
GuideLLM's synthetic prompts replace our passkey prompts; it sends ``ignore_eos`` so
every request generates exactly ``--output-tokens``. Meanwhile ``/metrics`` is polled
for the running / waiting requests and KV usage, which GuideLLM does not see.

    python -m vllm_adaptive_kv.apps.guidellm_bench --out-dir out/guidellm \\
        --profiles throughput,constant:0.2 --max-requests 16

Each profile writes GuideLLM's own JSON (``<config>-<profile>.json``); the summary
(``summary.json`` and a table on stdout) takes from it output tokens/s, requests/s,
TTFT and ITL percentiles, and mean concurrency (``parse_report``).
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
DEFAULT_GUIDELLM = REPO / ".venv-guidellm" / "bin" / "guidellm"


# --------------------------------------------------------------------------- GuideLLM's command and report (pure)


def parse_profile(text: str) -> tuple[str, dict]:
    """``throughput`` / ``constant:0.5`` / ``poisson:0.5`` / ``concurrent:4`` / ``sweep`` -> (kind, config)."""
    kind, _, value = text.partition(":")
    keys = {"constant": "rate", "poisson": "rate", "concurrent": "streams", "throughput": "max_concurrency"}
    if kind not in (*keys, "sweep", "synchronous"):
        raise ValueError(f"profile {text!r} is invalid: allowed throughput[:N], constant:R, poisson:R, "
                         "concurrent:N, synchronous, sweep")
    if not value:
        if kind in ("constant", "poisson", "concurrent"):
            raise ValueError(f"profile {text!r} needs a value ({kind}:{keys[kind]})")
        return kind, {}
    number = float(value) if keys.get(kind) == "rate" else int(value)
    return kind, {keys[kind]: number}


def profile_label(kind: str, config: dict) -> str:
    return kind + "".join(f"-{v:g}" for v in config.values())


def guidellm_command(guidellm: str, target: str, model_dir: str, kind: str, config: dict, prompt_tokens: int,
                     output_tokens: int, max_requests: int, out: Path, seed: int = 0) -> list[str]:
    """``guidellm run`` for one profile against one server (GuideLLM 0.8's ``kind=...`` options).

    ``throughput`` without a limit sends every request at once (``max_concurrency`` =
    ``max_requests``), which is our bench's default arrival.
    """
    if kind == "throughput" and "max_concurrency" not in config:
        config = {**config, "max_concurrency": max_requests}
    profile = ",".join([f"kind={kind}", *(f"{k}={v:g}" for k, v in config.items())])
    return [guidellm, "run",
            "--backend", f"kind=openai_http,target={target},model=bench",
            "--tokenizer", f"kind=huggingface_auto,model={model_dir}",
            "--profile", profile,
            "--constraint", f"kind=max_requests,count={max_requests}",
            "--data", f"kind=synthetic_text,prompt_tokens={prompt_tokens},output_tokens={output_tokens}",
            "--seed", f"kind=static,value={seed}",
            "--output", f"kind=json,path={out}",
            "--disable-console-interactive"]


def _dig(obj, *path, default=None):
    for key in path:
        if not isinstance(obj, dict) or key not in obj:
            return default
        obj = obj[key]
    return obj


def _stat(metrics: dict, name: str, field: str) -> float | None:
    """A successful-request statistic of one GuideLLM metric (``median``, ``mean``, ``percentiles.p99`` ...)."""
    dist = _dig(metrics, name, "successful")
    if dist is None:
        return None
    if field.startswith("percentiles."):
        return _dig(dist, "percentiles", field.split(".", 1)[1])
    return dist.get(field)


def parse_report(doc: dict) -> list[dict]:
    """One row per benchmark (strategy) of a GuideLLM JSON report: the numbers we compare with our bench."""
    rows = []
    for bench in doc.get("benchmarks", []):
        m = bench.get("metrics", {})
        totals = _dig(m, "request_totals") or {}
        rows.append({
            "strategy": _dig(bench, "config", "strategy", "type_") or _dig(bench, "scheduler", "strategy", "type_"),
            "rate": _dig(bench, "config", "strategy", "rate"),
            "completed": totals.get("successful"), "errored": totals.get("errored"),
            "output_tokens_per_s": _stat(m, "output_tokens_per_second", "mean"),
            "requests_per_s": _stat(m, "requests_per_second", "mean"),
            "ttft_ms_p50": _stat(m, "time_to_first_token_ms", "median"),
            "ttft_ms_p99": _stat(m, "time_to_first_token_ms", "percentiles.p99"),
            "itl_ms_p50": _stat(m, "inter_token_latency_ms", "median"),
            "latency_s_p50": _stat(m, "request_latency", "median"),
            "concurrency_mean": _stat(m, "request_concurrency", "mean"),
            "output_tokens_mean": _stat(m, "output_token_count", "mean"),
            "prompt_tokens_mean": _stat(m, "prompt_token_count", "mean"),
        })
    return rows


def _f(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def format_rows(rows: list[dict]) -> str:
    lines = [f"{'config':>8} {'profile':>14} {'done':>5} {'out tok/s':>9} {'req/s':>6} {'TTFT p50':>9} "
             f"{'TTFT p99':>9} {'ITL p50':>8} {'conc.':>5} {'peak run':>8} {'peak wait':>9} {'max KV':>6}"]
    for r in rows:
        lines.append(
            f"{r['config']:>8} {r['profile']:>14} {_f(r['completed'], 'd'):>5} {_f(r['output_tokens_per_s'], '.2f'):>9} "
            f"{_f(r['requests_per_s'], '.3f'):>6} {_f(r['ttft_ms_p50'] and r['ttft_ms_p50'] / 1000, '.2f'):>8}s "
            f"{_f(r['ttft_ms_p99'] and r['ttft_ms_p99'] / 1000, '.2f'):>8}s {_f(r['itl_ms_p50'], '.1f'):>6}ms "
            f"{_f(r['concurrency_mean'], '.1f'):>5} {_f(r.get('peak_running'), '.0f'):>8} "
            f"{_f(r.get('peak_waiting'), '.0f'):>9} {_f(r.get('max_kv_usage') and 100 * r['max_kv_usage'], '.0f'):>5}%")
    return "\n".join(lines)


# --------------------------------------------------------------------------- the server side


class MetricsPoller(threading.Thread):
    """Polls a server's /metrics for running / waiting / KV usage while GuideLLM drives it."""

    def __init__(self, base: str, interval: float = 0.5) -> None:
        super().__init__(daemon=True)
        self.url, self.interval, self.samples = base + "/metrics", interval, []
        self._stop_event = threading.Event()

    def run(self) -> None:
        from .bench import parse_metrics

        start = time.perf_counter()
        while not self._stop_event.is_set():
            try:
                with urllib.request.urlopen(self.url, timeout=5) as resp:
                    values = parse_metrics(resp.read().decode())
                self.samples.append({"t": time.perf_counter() - start,
                                     "running": values.get("vllm:num_requests_running"),
                                     "waiting": values.get("vllm:num_requests_waiting"),
                                     "kv_usage": values.get("vllm:kv_cache_usage_perc")})
            except Exception:  # noqa: BLE001 - a missed sample is not fatal
                pass
            self._stop_event.wait(self.interval)

    def stop(self) -> dict:
        self._stop_event.set()
        self.join(timeout=10)

        def peak(key):
            values = [s[key] for s in self.samples if s[key] is not None]
            return max(values, default=None)

        return {"peak_running": peak("running"), "peak_waiting": peak("waiting"), "max_kv_usage": peak("kv_usage")}


def run_profiles(server, config: str, args, out_dir: Path) -> list[dict]:
    rows = []
    for kind, cfg in args.profiles:
        label = profile_label(kind, cfg)
        report = out_dir / f"{config}-{label}.json"
        cmd = guidellm_command(args.guidellm, server.base, args.model, kind, cfg, args.prompt_tokens,
                               args.output_tokens, args.max_requests, report, args.seed)
        print(f"[guidellm] {config}: `{shlex.join(cmd)}`", flush=True)
        poller = MetricsPoller(server.base)
        poller.start()
        with open(out_dir / f"{config}-{label}.log", "w") as log:
            rc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT).returncode
        server_side = poller.stop()
        if rc != 0 or not report.exists():
            raise RuntimeError(f"guidellm exited {rc} for {config} {label}; see {out_dir / f'{config}-{label}.log'}")
        for row in parse_report(json.loads(report.read_text())):
            rows.append({"config": config, "profile": label, "command": cmd, **row, **server_side})
    return rows


def build_parser() -> argparse.ArgumentParser:
    from .bench import _typed, parse_size

    p = argparse.ArgumentParser(prog="python -m vllm_adaptive_kv.apps.guidellm_bench",
                                description=__doc__.splitlines()[0])
    p.add_argument("--configs", default="vanilla,fastgen", help="vanilla and/or plugin policies (default vanilla,fastgen)")
    p.add_argument("--profiles", type=_typed(lambda t: [parse_profile(x) for x in t.split(",") if x]),
                   default="throughput", help="comma-separated GuideLLM profiles (default throughput: all at once)")
    p.add_argument("--max-requests", type=int, default=16, help="requests per profile (default 16)")
    p.add_argument("--prompt-tokens", type=int, default=1300, help="synthetic prompt tokens (default 1300)")
    p.add_argument("--output-tokens", type=int, default=16, help="output tokens (default 16)")
    p.add_argument("--kv-cache-memory-bytes", type=_typed(parse_size), default="64MiB", metavar="SIZE",
                   help="KV budget of every server (default 64MiB: the bench's memory-bound shape)")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--max-model-len", type=int, default=2048)
    p.add_argument("--port", type=int, default=19040, help="first server port (default 19040)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--model", default=None, help="model folder (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--guidellm", default=str(DEFAULT_GUIDELLM),
                   help="the guidellm executable (default: .venv-guidellm/bin/guidellm; scripts/guidellm_setup.sh)")
    p.add_argument("--out-dir", required=True, help="GuideLLM reports, logs and summary.json go here")
    return p


def main(argv=None) -> int:
    from . import bench

    args = build_parser().parse_args(argv)
    if not Path(args.guidellm).exists():
        print(f"guidellm_bench: {args.guidellm} does not exist: run scripts/guidellm_setup.sh", file=sys.stderr)
        return 2
    if args.model is None:
        from ..model import prepare_model

        args.model = str(prepare_model("smollm2"))
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    # The bench's own server options, so both clients meet the same servers.
    server_args = bench.build_parser().parse_args([
        "--configs", args.configs, "--kv-cache-memory-bytes", str(args.kv_cache_memory_bytes), "--dtype", args.dtype,
        "--max-model-len", str(args.max_model_len), "--port", str(args.port)])
    rows = []
    for config in server_args.configs:
        port = bench.next_port(server_args)
        cmd = bench.server_command(config, server_args, args.model, port)
        with bench.Server(config, cmd, port, out_dir / f"serve-{config}.log", server_args.start_timeout) as server:
            rows += run_profiles(server, config, args, out_dir)
        (out_dir / "summary.json").write_text(json.dumps({"args": {k: v for k, v in vars(args).items()},
                                                          "rows": rows}, indent=1))
    print(format_rows(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
