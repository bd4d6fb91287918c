"""`vllm-adaptive-kv overhead`: argument checks, the step summaries, and one tiny real run."""

from __future__ import annotations

import argparse
import json

import pytest

from vllm_adaptive_kv.apps import overhead


def test_parse_counts():
    assert overhead.parse_counts("16,64,256") == [16, 64, 256]
    assert overhead.parse_counts(" 8 ") == [8]
    for bad in ("", "0", "a,b", "16,-1", ","):
        with pytest.raises(argparse.ArgumentTypeError, match="allowed a comma-separated list"):
            overhead.parse_counts(bad)


def test_bad_policy_is_refused_with_the_allowed_names(capsys):
    assert overhead.main(["--policies", "fastgen,nope"]) == 2
    err = capsys.readouterr().err
    assert "'fastgen,nope'" in err and "streamingllm" in err


def test_summaries_split_steady_state_from_the_rest():
    t = {"steps": 1, "sched_s": 0.001, "step_s": 0.1, "plan_s": 0.002, "evict_s": 0.004, "worker_step_s": 0.1}
    steps = [(2, 2, 0.1, dict(t)), (4, 0, 0.2, dict(t)), (4, 0, 0.2, {**t, "evict_s": 0.0}), (4, 0, 0.2, {}),
             (3, 0, 0.2, dict(t))]
    s = overhead.summarize(steps, running=4)
    assert s["steady"]["steps"] == 2 and s["other"]["steps"] == 2 and s["all"]["steps"] == 4
    assert s["steady"]["evict_ms"] == pytest.approx(2.0) and s["steady"]["evict_pct"] == pytest.approx(2.0)
    assert s["other"]["evict_ms"] == pytest.approx(4.0)
    assert overhead.summarize([], running=4)["steady"] == {}


@pytest.mark.engine
@pytest.mark.timeout(900)
def test_overhead_tiny_run_reports_every_part(smollm2_dir, tmp_path, capsys):
    out = tmp_path / "overhead.json"
    rc = overhead.main(["--running", "2", "--output-tokens", "40", "--model", str(smollm2_dir),
                        "--out", str(out), "--dtype", "float32"])  # AVX2-only CPUs emulate bf16
    assert rc == 0
    doc = json.loads(out.read_text())
    (row,) = doc["rows"]
    assert row["policy"] == "fastgen" and row["running"] == 2 and row["peak_running"] == 2
    steady = row["steady"]
    assert steady["steps"] >= 30  # 40 tokens each, both decoding together
    for part in ("sched_ms", "plan_ms", "evict_ms", "worker_step_ms", "step_ms"):
        assert steady[part] > 0, part
    assert steady["evict_ms"] < steady["worker_step_ms"] and steady["sched_ms"] < steady["step_ms"]
    assert 0 < steady["total_pct"] < 100
    assert "| fastgen | 2 |" in capsys.readouterr().out
