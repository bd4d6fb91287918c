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


def load_script():
    import importlib.util

    spec = importlib.util.spec_from_file_location("gpu_check_script", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def one_list_snapshot(positions, scores):
    import torch

    kept = torch.tensor([[positions]], dtype=torch.long)
    score = torch.tensor([[scores]], dtype=torch.float32)
    return {"choice": torch.zeros(1, 1, dtype=torch.long), "lens": torch.tensor([[len(positions)]]),
            "kept": kept, "score": score}


@pytest.mark.parametrize("gap, tolerated", [(1e-5, True), (0.2, False)])
def test_a_boundary_swap_is_tolerated_only_when_the_scores_nearly_tie(gap, tolerated):
    gpu_check = load_script()
    triton = one_list_snapshot([0, 1, 5], [1.0, 0.5, 0.3])
    torch_run = one_list_snapshot([0, 1, 6], [1.0, 0.5, 0.3 + gap])
    same = one_list_snapshot([0, 1, 5], [1.0, 0.5, 0.3])
    out = gpu_check.snap_compare({"r0": {"prompt_end": same, "final": triton}},
                                 {"r0": {"prompt_end": same, "final": torch_run}}, swap_tol=1e-2)
    assert out["lists"] == 2
    assert out["boundary_swaps"] == int(tolerated)
    assert out["kept_mismatches"] == int(not tolerated)
    assert out["swapped_requests"] == (["r0"] if tolerated else [])
    assert out["examples"][0]["positions_differing"] == 2


def test_more_than_two_swapped_slots_is_a_mismatch_however_close():
    gpu_check = load_script()
    triton = one_list_snapshot([0, 1, 2, 3], [0.4, 0.4, 0.4, 0.4])
    torch_run = one_list_snapshot([0, 5, 6, 7], [0.4, 0.4, 0.4, 0.4])
    out = gpu_check.snap_compare({"r0": {"prompt_end": triton, "final": triton}},
                                 {"r0": {"prompt_end": triton, "final": torch_run}})
    assert out["kept_mismatches"] == 1 and out["boundary_swaps"] == 0
