"""scripts/bench_cpu_attention.py: both kernels attend the same lists, and the script says so."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from vllm_adaptive_kv import cpu_kernels

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "bench_cpu_attention.py"

pytestmark = pytest.mark.skipif(not cpu_kernels.HAS_CPU_KERNELS, reason="vllm_adaptive_kv._C is not built")


def load_script():
    spec = importlib.util.spec_from_file_location("bench_cpu_attention", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("dtype,tolerance", [("float32", 1e-5), ("bfloat16", 2e-2)])
def test_both_kernels_attend_the_same_ragged_lists(tmp_path, dtype, tolerance):
    pytest.importorskip("vllm._custom_ops")
    script = load_script()
    out = tmp_path / "bench.json"
    assert script.main(["--lists", "6", "--len", "90", "--ragged", "--repeats", "2", "--dtype", dtype,
                        "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["rel_err"] < tolerance  # vLLM's output and ours, same slots
    assert 6 * 45 <= result["kv_tokens"] <= 6 * 135  # ragged: each list within [len / 2, 3 len / 2]
    assert set(result["median_ms"]) == {"vllm", "scored"} and result["scored_over_vllm"] > 0


def test_score_rows_mode_scores_every_list(tmp_path):
    script = load_script()
    args = script.argparse.Namespace(lists=6, heads=3, group=3, head_dim=64, block_size=32, len=70, ragged=False,
                                     dtype="float32", seed=0, scale=0.125, score_rows=8)
    lists = script.build_lists(args)
    before = lists["slot_score"].clone()
    script.score_rows_runner(lists, args)()
    added = lists["slot_score"] - before
    # every row's softmax sums to 1 over its list, times its 3 query heads: 2 requests x 3 lists x 8 rows x 3
    assert added.sum().item() == pytest.approx(2 * 3 * 8 * 3, rel=1e-4)
    assert script.main(["--lists", "6", "--len", "70", "--score-rows", "8", "--repeats", "1", "--out",
                        str(tmp_path / "rows.json")]) == 0
    assert json.loads((tmp_path / "rows.json").read_text())["score_rows_median_ms"] > 0
