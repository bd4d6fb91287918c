"""`make demo` (apps/batch_demo.py): the pure parts. The demo itself starts two engines
and is not part of the test suite."""

from __future__ import annotations

import pytest

from vllm_adaptive_kv.apps import batch_demo


def test_budget_holds_whole_requests_in_128_token_blocks():
    per_token = 2 * 30 * 3 * 64 * 4  # SmolLM2, float32
    # 609-token prompt + 16 out = 625 -> 5 blocks; 2.5 requests -> 12.5 -> 13 blocks of 128
    assert batch_demo.budget_bytes(625, 2.5, per_token) == 13 * 128 * per_token
    assert batch_demo.budget_bytes(625, 2.0, per_token) == 10 * 128 * per_token
    assert batch_demo.budget_bytes(640, 1.0, per_token) == 5 * 128 * per_token


def test_parse_configs():
    assert batch_demo.parse_configs("vanilla, fastgen") == ["vanilla", "fastgen"]
    for bad in ("vanilla,nope", "", "full,full"):
        with pytest.raises(ValueError, match="allowed distinct names from vanilla, full, fastgen"):
            batch_demo.parse_configs(bad)


def test_report_prints_both_sides_and_the_ratios():
    vanilla = {"peak_running": 2, "mean_running": 1.8, "output_tokens_per_s": 2.0, "wall_s": 60.0, "accuracy": 1.0,
               "kept_fraction": None, "pages_freed": None, "pool_empty": None}
    fastgen = {"peak_running": 3, "mean_running": 2.7, "output_tokens_per_s": 3.0, "wall_s": 40.0,
               "accuracy": 0.875, "kept_fraction": 0.612, "pages_freed": 3963, "pool_empty": True}
    text = batch_demo.report({"vanilla": vanilla, "fastgen": fastgen})
    lines = text.splitlines()
    assert lines[1].split()[:3] == ["vanilla", "2", "1.80"] and lines[1].split()[-3:] == ["-", "-", "-"]
    assert "61.2%" in lines[2] and "3,963" in lines[2] and lines[2].endswith("yes")
    assert "1.50x peak running" in text and "1.50x output tokens/s" in text and "-12.5 points" in text
