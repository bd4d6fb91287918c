"""CI smoke test: `vllm-adaptive-kv eval --quick` through real vLLM and the plugin.

It checks that the pipeline runs end to end and that results.json holds its schema
(keys, types, ranges) and its invariants (full keeps everything and agrees with
itself, teacher-forcing the full cache's own continuation gives KL ~0 and its own
NLL, baselines run at FastGen's measured fraction, every KV head gets a FastGen
decision, a RULER task is scored), not the quality numbers. One engine; about
2-3 minutes on 2 CPU cores. kvpress is not installed here: its driver's results are
parsed in test_eval_scoring.py.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from vllm_adaptive_kv.apps.eval import (MATCH_TOLERANCE, QUICK_TASKS, SCHEMA_VERSION, corrected_budget,
                                        matched_budget)
from vllm_adaptive_kv.core.policies import FASTGEN_LADDER

# Timeout: the quick run takes 1-2.7 min here; sized for a machine ~10x slower.
pytestmark = [pytest.mark.engine, pytest.mark.timeout(2400)]

CLI = str(Path(sys.executable).parent / "vllm-adaptive-kv")
LAYERS, KV_HEADS = 30, 3  # the embedded SmolLM2-135M
SETTINGS = ["full", "fastgen T=0.90", "h2o @ fastgen T=0.90"]


@pytest.fixture(scope="module")
def quick_run(smollm2_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("eval")
    proc = subprocess.run([CLI, "eval", "--quick", "--out-dir", str(out)], capture_output=True, text=True,
                          timeout=2100)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, json.loads((out / "results.json").read_text()), proc.stdout


def test_writes_json_table_and_plots(quick_run):
    out, results, stdout = quick_run
    for name in ["results.md", "policy_map.png"] + [f"quality_{t}.png" for t in QUICK_TASKS]:
        assert (out / name).exists(), name
        assert str(out / name) in stdout
        if name.endswith(".png"):
            assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = (out / "results.md").read_text()
    for label in SETTINGS:
        assert f"| {label} |" in table


def test_top_level_schema(quick_run):
    _, r, _ = quick_run
    assert r["schema_version"] == SCHEMA_VERSION and r["quick"] is True
    assert isinstance(r["model"], str) and r["command"].startswith("vllm-adaptive-kv eval --quick")
    # the default model, recorded by name and layout
    assert r["model"] == "SmolLM2-135M-Instruct" and r["model_name"] == "smollm2" and r["prompts_per_task"] == 2
    assert (r["model_info"]["layers"], r["model_info"]["kv_heads"]) == (LAYERS, KV_HEADS)
    assert r["max_model_len"] == 2048
    assert isinstance(r["machine"]["cpu_count"], int) and isinstance(r["machine"]["python"], str)
    assert len(r["haystack_sha256"]) == 64
    assert r["seconds"] > 0
    assert list(r["tasks"]) == list(QUICK_TASKS) and r["variants"] == ["default"] and r["fidelity"] is True
    for task in r["tasks"].values():
        assert task["prompts"] == 2 and isinstance(task["metric"], str) and task["max_tokens"] > 0
        assert all(isinstance(n, int) and 0 < n < 2048 for n in task["prompt_tokens"])
    assert [s["label"] for s in r["settings"]] == SETTINGS
    assert [c["tasks"] for c in r["choices"]] == [list(QUICK_TASKS), [t for t in QUICK_TASKS if t != "chat"]]
    for choice in r["choices"]:
        assert set(choice) == {"tasks", "rule", "chosen", "recovery_ratio", "mean_kept_fraction", "mean_loss"}


def test_every_setting_and_task_has_ranged_numbers(quick_run):
    _, r, _ = quick_run
    for setting in r["settings"]:
        assert set(setting["tasks"]) == set(QUICK_TASKS)
        assert 0 <= setting["mean_quality"] <= 100 and 0 < setting["mean_kept_fraction"] <= 1 + 1e-6
        for name, task in setting["tasks"].items():
            assert 0 <= task["quality"] <= 100, (setting["label"], name)
            assert 0 < task["kept_fraction"] <= 1 + 1e-6, (setting["label"], name)
            assert task["requests"] == len(task["prompts"]) == r["tasks"][name]["prompts"]
            assert task["seconds"] > 0
        for p in setting["tasks"]["chat"]["prompts"]:
            assert 0 <= p["agreement"] <= 1
            assert p["first_divergence"] is None or 0 <= p["first_divergence"] <= p["reference_tokens"]
        for p in setting["tasks"]["passkey"]["prompts"] + setting["tasks"]["needle"]["prompts"]:
            assert isinstance(p["correct"], bool) and isinstance(p["output"], str)
        for task in ("niah_multikey",):  # RULER: partial credit, references recorded
            for p in setting["tasks"][task]["prompts"]:
                assert 0 <= p["score"] <= 1 and p["answers"] and p["metric"] == "all"
        chat = setting["tasks"]["chat"]  # teacher-forced fidelity
        assert chat["forced_tokens"] == sum(p["reference_tokens"] for p in chat["prompts"])
        assert chat["nll"] >= 0 and chat["kl"] >= -1e-3 and 0 <= chat["forced_agreement"] <= 100
        assert all(p["nll"] >= 0 for p in chat["prompts"])


def test_full_keeps_everything_and_is_its_own_reference(quick_run):
    _, r, _ = quick_run
    full = r["settings"][0]
    for task in full["tasks"].values():
        assert task["kept_fraction"] == pytest.approx(1.0)
    assert full["tasks"]["chat"]["quality"] == 100.0
    assert all(p["first_divergence"] is None for p in full["tasks"]["chat"]["prompts"])
    # forcing its own greedy continuation: the same distributions (float16 storage aside)
    assert full["tasks"]["chat"]["kl"] < 1e-2 and full["tasks"]["chat"]["forced_agreement"] == 100.0


def test_fastgen_decides_every_head_and_baseline_matches_its_memory(quick_run):
    _, r, _ = quick_run
    fastgen, h2o = r["settings"][1], r["settings"][2]
    for name, task in fastgen["tasks"].items():
        assert set(task["head_policies"]) <= set(FASTGEN_LADDER)
        assert sum(task["head_policies"].values()) == task["requests"] * LAYERS * KV_HEADS, name
        assert task["kept_fraction"] < 1.0, name  # FastGen evicted something
    assert h2o["matched_to"] == fastgen["label"]
    for name in QUICK_TASKS:
        target = fastgen["tasks"][name]["kept_fraction"]
        first = h2o["tasks"][name].get("first_try")
        if first is None:  # the first run landed within the tolerance
            assert h2o["params"][name]["budget_ratio"] == matched_budget(target)
            assert abs(h2o["tasks"][name]["kept_fraction"] - target) <= MATCH_TOLERANCE
        else:  # one corrected run, from the first run's miss
            assert first["budget_ratio"] == matched_budget(target)
            assert abs(first["kept_fraction"] - target) > MATCH_TOLERANCE
            assert h2o["params"][name]["budget_ratio"] == corrected_budget(first["budget_ratio"], target,
                                                                          first["kept_fraction"])


def test_policy_maps_cover_every_layer_and_kv_head(quick_run):
    _, r, _ = quick_run
    assert [m["prompt_type"] for m in r["policy_maps"]] == ["passkey", "natural text", "chat", "code"]
    for m in r["policy_maps"]:
        assert m["recovery_ratio"] == 0.9 and m["prompt_tokens"] > 100
        assert len(m["heads"]) == LAYERS and all(len(layer) == KV_HEADS for layer in m["heads"])
        assert {name for layer in m["heads"] for name in layer} <= set(FASTGEN_LADDER)
