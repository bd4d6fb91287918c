"""scripts/gpu_check.py: --help without CUDA, and the --dry-run (CPU, Triton interpreter, tiny
shapes) that runs every check and timing code path of the GPU script and writes its JSON."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "gpu_check.py"
CHECKS = ("full_vs_dense_fp32", "triton_vs_torch_fastgen", "triton_vs_torch_h2o", "triton_vs_torch_snapkv",
          "pool_audit", "kernel_checks")


def run_script(*args, timeout=60, **env):
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", **env)  # the CPU path even on a GPU machine
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=timeout,
                          env=env)


def test_help_needs_no_cuda():
    proc = run_script("--help")
    assert proc.returncode == 0, proc.stderr
    assert "--dry-run" in proc.stdout and "--quick" in proc.stdout and "--out" in proc.stdout


def test_without_cuda_it_asks_for_the_dry_run(tmp_path):
    proc = run_script("--out", str(tmp_path / "x.json"))
    assert proc.returncode == 2 and "--dry-run" in proc.stderr, proc.stderr
    assert not (tmp_path / "x.json").exists()


@pytest.mark.timeout(360)
def test_dry_run_passes_every_check_and_times_every_kernel(tmp_path):
    pytest.importorskip("triton")
    pytest.importorskip("transformers")
    out = tmp_path / "check.json"
    proc = run_script("--dry-run", "--out", str(out), timeout=330, TRITON_INTERPRET="1")
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    doc = json.loads(out.read_text())
    assert doc["schema"] == "vllm-adaptive-kv-gpu-check/1" and doc["mode"] == "dry-run"
    for key in ("device", "torch", "triton", "transformers", "model", "workload", "checks", "runs", "timing",
                "passed", "failures", "skipped", "seconds"):
        assert key in doc, key
    assert "Triton interpreter" in doc["device"]
    assert doc["passed"] and doc["failures"] == [] and doc["skipped"] == []
    for name in CHECKS:
        assert doc["checks"][name]["passed"] is True, (name, doc["checks"][name])
    full = doc["checks"]["full_vs_dense_fp32"]
    assert full["positions"] > 0 and full["greedy_mismatches"] == 0 and full["max_abs_dlogit"] < 1e-4
    for policy in ("fastgen", "h2o", "snapkv"):
        check = doc["checks"][f"triton_vs_torch_{policy}"]
        assert check["lists"] > 0 and check["kept_mismatches"] == 0 and check["choice_mismatches"] == 0
        assert check["evicted_tokens"] > 0 and check["slots_kept_fraction"] < 1  # the runs really evicted
    assert len(doc["checks"]["triton_vs_torch_fastgen"]["head_policy_counts"]) >= 1
    assert doc["checks"]["pool_audit"]["runs"] == 7
    for name, run in doc["runs"].items():
        assert run["steps"] > 0 and run["mixed_steps"] >= 1, (name, run)  # chunked prefill beside decodes
    timing = doc["timing"]
    assert timing["failures"] == [] and not timing["timings_meaningful"]
    variants = {(r["family"], r["variant"]) for r in timing["rows"]}
    for expected in [("decode", "paged"), ("decode", "paged+score"), ("decode", "dense-sdpa"), ("prefill", "paged"),
                     ("compact", "triton"), ("compact", "torch-gather-scatter"), ("write", "triton"),
                     ("write", "torch-index-put")]:
        assert expected in variants, expected
    assert any(v.startswith("dense-sdpa") for f, v in variants if f == "prefill")
    for r in timing["rows"]:
        assert r["ms"] is not None and r["ms"] > 0 and "gb_per_s" in r, r
    assert "stats" in timing["not_timed"]
    assert "result: PASS" in proc.stdout
