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
