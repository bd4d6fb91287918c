#!/usr/bin/env python
"""Soak a real ``vllm serve --kv-policy fastgen`` and check that nothing leaked.

Starts the server on the embedded model (SmolLM2-135M, prepared by ``make setup``)
under a tight KV budget, runs ``vllm_adaptive_kv.apps.soak`` (concurrent clients,
cancelled streams, valid and invalid overrides, over-long prompts, n > 1,
max_tokens = 1), checks the server is idle with every head page free and the
greedy probes unchanged, then stops it with SIGTERM. Prints one summary line and
writes every figure as JSON with --out. Exit status 0 when the soak passed.

  python scripts/soak.py --clients 8 --requests 2000 --duration 1800 --budget-mib 48

--url soaks a server that is already running instead (served model name
``soak-model``; nothing is started or stopped, the pool size is not known).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--clients", type=int, default=6, help="concurrent clients (default 6)")
    p.add_argument("--requests", type=int, default=300, help="requests to send in all (default 300)")
    p.add_argument("--duration", type=float, default=None, metavar="S",
                   help="stop sending new requests after S seconds (default: no limit)")
    p.add_argument("--budget-mib", type=int, default=48, help="KV budget, --kv-cache-memory-bytes in MiB (default 48)")
    p.add_argument("--max-model-len", type=int, default=1024, help="default 1024")
    p.add_argument("--max-output-tokens", type=int, default=96, help="largest max_tokens sent (default 96)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--port", type=int, default=18650)
    p.add_argument("--url", default=None, help="soak this running server instead of starting one")
    p.add_argument("--log", default=None, help="server log file (default: a temporary file)")
    p.add_argument("--out", default=None, help="write the report as JSON here")
    return p.parse_args(argv)


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    from vllm_adaptive_kv.apps.common import machine_info
    from vllm_adaptive_kv.apps.soak import ServerSettings, SoakConfig, VllmServer, cpu_flags, run_soak

    cfg = SoakConfig(clients=args.clients, requests=args.requests, duration_s=args.duration,
                     max_model_len=args.max_model_len, seed=args.seed, max_output_tokens=args.max_output_tokens)
    server = None
    if args.url is None:
        from vllm_adaptive_kv.model import prepare_model

        settings = ServerSettings(str(prepare_model("smollm2")), args.port, args.budget_mib, args.max_model_len)
        log = args.log or tempfile.mkstemp(prefix="soak-serve-", suffix=".log")[1]
        server = VllmServer(settings, log)
        started = time.perf_counter()
        server.start(timeout_s=900)
        print(f"vllm serve up in {time.perf_counter() - started:.0f} s (log {log})", flush=True)
    try:
        report = run_soak(args.url or server.base, cfg, server.pool_pages() if server else None)
    finally:
        exit_code = server.terminate(timeout_s=120) if server else None
    result = {**report.to_dict(), "budget_mib": args.budget_mib, "cpu": cpu_flags(), "machine": machine_info(),
              "server_exit_code": exit_code}
    print(report.summary())
    for failure in report.failures[:20]:
        print("  " + failure)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)
    return 0 if report.passed else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
