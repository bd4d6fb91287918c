"""scripts/bench_kernels.py --tiny: every family runs, on CPU under the Triton interpreter,
and the kernels agree with their torch references and the dense baselines (no timings)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "bench_kernels.py"


def run_script(*args, timeout=120):
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")  # --tiny is the CPU path even on a GPU machine
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=timeout,
                          env=env)


def test_tiny_run_checks_every_family(tmp_path):
    pytest.importorskip("triton")
    out = tmp_path / "kernels.json"
    proc = run_script("--tiny", "--out", str(out))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    doc = json.loads(out.read_text())
    assert doc["tiny"] and doc["failures"] == []
    assert "Triton interpreter" in doc["device"]
    rows = doc["rows"]
    families = {r["family"] for r in rows}
    assert families == {"decode", "prefill", "stats", "compact", "write"}
    variants = {(r["family"], r["variant"]) for r in rows}
    for expected in [("decode", "paged"), ("decode", "paged+score"), ("decode", "dense-sdpa"),
                     ("prefill", "paged"), ("stats", "paged"), ("stats", "dense-matmul-softmax"),
                     ("compact", "triton"), ("compact", "torch-gather-scatter"), ("write", "triton")]:
        assert expected in variants
    for r in rows:
        assert r["ms"] is None  # no timings in --tiny mode
        if "ok" in r:
            assert r["ok"], r
        if r.get("rel_err") is not None:
            assert r["rel_err"] < 1e-2, r
    assert any(r["family"] == "compact" and r["moves"] > 0 for r in rows)
    assert "### decode" in proc.stdout and "failures: none" in proc.stdout


@pytest.mark.parametrize("args,needle", [(["--kept", "1.5"], "(0, 1]"), (["--batch", "0"], "integers >= 1"),
                                         (["--families", "decode,nope"], "decode, prefill")])
def test_bad_arguments_are_named(args, needle):
    proc = run_script("--tiny", *args, timeout=60)
    assert proc.returncode == 2 and needle in proc.stderr, proc.stderr


def test_split_sweep_checks_every_forced_split_count():
    """scripts/split_sweep.py's per-shape sweep on CPU (interpreter, tiny shapes; times are
    stand-ins): every forced split count matches the torch reference, and the rule's
    choice is reported beside the best."""
    pytest.importorskip("triton")
    import argparse
    import importlib.util

    spec = importlib.util.spec_from_file_location("split_sweep", SCRIPT.parent / "split_sweep.py")
    sweep = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(sweep)
    from scripts.bench_kernels import TINY, KernelBench

    bench = KernelBench(argparse.Namespace(tiny=True, model=TINY, dtype="float32", seed=0, max_gib=None,
                                           warmup_ms=1, rep_ms=1))
    stand_ins = iter([3.0, 2.0, 1.0])  # --tiny times nothing: each forced count runs, then gets a stand-in

    def timed(fn):
        fn()
        return next(stand_ins)

    bench.timed = timed
    row = sweep.sweep_one(bench, 2, 72, 1.0, [1, 2, 3])
    assert set(row["rel_err"]) == {"1", "2", "3"}
    assert all(err < 1e-5 for err in row["rel_err"].values()), row["rel_err"]
    assert row["table_pages"] == 5 and row["programs"] == 2 * TINY.kv_heads
    assert row["rule"] == 1  # 5 pages: too short to split
    assert row["best"] == 3 and row["rule_over_best"] == 3.0 and row["nosplit_over_best"] == 3.0
