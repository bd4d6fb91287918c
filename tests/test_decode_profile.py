"""scripts/decode_profile.py: the step split and the steady-decode reading (no engine)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "decode_profile.py"


def load_script():
    spec = importlib.util.spec_from_file_location("decode_profile", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_attention_split_counts_only_the_attention_ops():
    script = load_script()
    self_ms = {"_C::cpu_attention_with_kv_cache": 300.0, "adaptive_kv::scored_decode_attention": 100.0,
               "_C::onednn_mm": 250.0, "aten::add": 10.0}
    split = script.attention_split(self_ms, [0.2, 0.2, 0.2, 0.2])
    assert split["step_ms"] == pytest.approx(200.0)
    assert split["attention_ms"] == pytest.approx(100.0)  # 400 ms over 4 steps; the GEMMs are not attention
    assert split["attention_share"] == pytest.approx(0.5)


@pytest.mark.parametrize("share", [0.6, 0.95])
def test_the_bar_is_met_by_scaled_attention_only_above_the_share_it_needs(share):
    script = load_script()
    kept, base_step = 0.5, 100.0
    base = {"attention_ms": share * base_step, "attention_share": share, "step_ms": base_step}
    scaled = {"attention_ms": kept * share * base_step}
    step = (1 - share) * base_step + kept * share * base_step  # attention shrank with the KV, nothing else did
    reading = script.steady_decode_reading(kept, base_step, step, base, scaled)
    assert reading["attention_ratio"] == pytest.approx(kept)
    assert reading["step_if_attention_scaled"] * base_step == pytest.approx(step)
    assert (reading["over_bar"] <= 1) == (share >= reading["share_needed"])
    assert 0.6 < reading["share_needed"] < 0.95


def test_the_reading_refuses_a_kept_fraction_outside_zero_one():
    script = load_script()
    split = {"attention_ms": 1.0, "attention_share": 0.5}
    with pytest.raises(ValueError, match="kept=1.2"):
        script.steady_decode_reading(1.2, 100.0, 90.0, split, split)
