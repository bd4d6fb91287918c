"""`vllm-adaptive-kv bench --suite`: the pure parts (budgets, ideal concurrency, the curve,
ratios and targets, kernel records). Its real run is tests/test_bench.py's tiny run."""

from __future__ import annotations

import sys

import pytest

from vllm_adaptive_kv.apps import bench, bench_suite
from vllm_adaptive_kv.apps.common import cpu_info

SMOLLM2 = {"num_attention_heads": 9, "num_hidden_layers": 30, "num_key_value_heads": 3, "head_dim": 64,
           "hidden_size": 576}


def test_plugin_block_size_matches_the_plugin():
    from vllm_adaptive_kv.plugin.engine_args import DEFAULT_BLOCK_SIZE

    assert bench_suite.PLUGIN_BLOCK == DEFAULT_BLOCK_SIZE
    assert bench_suite.CONFIGS[bench_suite.SAME_BLOCK_VANILLA].block_size == DEFAULT_BLOCK_SIZE


def test_parse_budget_and_lists():
    assert bench_suite.parse_budget("ample") == ("ample", None)
    assert bench_suite.parse_budget("bound-8") == ("bound-8", 8)
    for bad in ("bound-0", "bound-x", "tight", "bound2"):
        with pytest.raises(ValueError, match="allowed 'ample' or 'bound-K'"):
            bench_suite.parse_budget(bad)
    assert bench_suite._points("16,1,4") == [1, 4, 16] and bench_suite._points("none") == []
    with pytest.raises(ValueError, match="allowed integers >= 1"):
        bench_suite._points("1,0")
    with pytest.raises(ValueError, match="unknown 'nope'"):
        bench_suite.parse_list("--configs", "full,nope", str, tuple(bench_suite.CONFIGS))
    with pytest.raises(ValueError, match="repeated"):
        bench_suite.parse_list("--outputs", "short,short", str, ("short", "long"))


def test_bad_suite_options_are_usage_errors(capsys):
    cases = (["--budgets", "tight"], ["--configs", "vanilla,nope"], ["--arrivals", "poisson"],
             ["--curve-points", "0"], ["--prompt-tokens", "1900:2000", "--long-output", "256"])
    for argv in cases:
        with pytest.raises(SystemExit) as exc:
            bench.main(["--suite", "--vllm", sys.executable, *argv])
        assert exc.value.code == 2
        assert argv[1] in capsys.readouterr().err


def test_quick_shrinks_defaults_but_explicit_options_win():
    args = bench_suite.parse_args(["--quick", "--vllm", sys.executable])
    assert args.num_requests == 4 and args.budgets == ["bound-2"] and args.curve_points == [1, 2]
    assert args.configs == list(bench_suite.DEFAULT_CONFIGS)
    args = bench_suite.parse_args(["--quick", "-n", "6", "--configs", "vanilla,fastgen", "--vllm", sys.executable])
    assert args.num_requests == 6 and args.configs == ["vanilla", "fastgen"] and args.short_output == 4
    full = bench_suite.parse_args(["--vllm", sys.executable])
    assert full.budgets == ["ample", "bound-2", "bound-8"] and full.curve_points == [1, 2, 4, 8, 16]
    assert (full.short_output, full.long_output, full.arrivals) == (16, 256, ["burst", "poisson"])


def test_budgets_hold_whole_requests_in_128_token_blocks():
    per_token = bench_suite.kv_bytes_per_token(SMOLLM2, "bfloat16")
    assert per_token == 2 * 30 * 3 * 64 * 2
    assert bench_suite.kv_bytes_per_token(SMOLLM2, "float32") == 2 * per_token
    # 1,352-token prompt + 256 out = 1,608 -> 13 blocks of 128 = 1,664 tokens a request
    assert bench_suite.budget_bytes("bound-2", 1608, 16, per_token) == 2 * 1664 * per_token
    assert bench_suite.budget_bytes("ample", 1608, 16, per_token) == 16 * 1664 * per_token


def test_ideal_running_under_the_rule_and_by_chunk():
    # 3,328 tokens of capacity, 1,300-token prompts, 16 out, kept 0.55, pages of 32:
    # compressed = 0.55 * 1316 + 16 = 739.8; rule: 1 + (3328 - 1312) // 739.8 = 3;
    # by chunk: 3328 // 739.8 = 4; uncompressed: 3328 // 1344 = 2.
    ideal = bench_suite.ideal_running(3328, 32, 1300, 16, 0.55, 16)
    assert (ideal["by_rule"], ideal["by_chunk"], ideal["full"]) == (3, 4, 2)
    assert ideal["compressed_tokens"] == pytest.approx(739.8)
    assert ideal["memory_binds"] is True  # 3 of 16: the budget sets the count
    assert bench_suite.ideal_running(3328, 32, 1300, 16, 0.55, 3)["memory_binds"] is False  # all 3 fit
    assert bench_suite.ideal_running(3328, 32, 1300, 16, 0.55, 4)["memory_binds"] is True
    assert bench_suite.ideal_running(3328, 32, 1300, 16, 0.55, 2)["by_chunk"] == 2  # capped by the requests
    assert bench_suite.ideal_running(3328, 32, 1300, 16, 0.55, 16, max_num_seqs=1)["by_rule"] == 1
    assert bench_suite.ideal_running(1000, 32, 1300, 16, 0.55, 16)["by_rule"] == 0  # a prompt never fits
    # kept 1.0 under the rule is never more than the uncompressed count plus the rounding
    same = bench_suite.ideal_running(13312, 128, 1300, 16, 1.0, 16)
    assert same["by_rule"] <= same["full"] + 1


def test_burst_mean_counts_the_short_last_wave():
    assert bench_suite.burst_mean(16, 3) == pytest.approx(16 / 6)
    assert bench_suite.burst_mean(16, 4) == 4 and bench_suite.burst_mean(16, 16) == 16
    assert bench_suite.burst_mean(16, 0) is None


def test_curve_prediction_interpolates_and_clamps():
    points = [{"in_flight": 1, "output_tokens_per_s": 10.0}, {"in_flight": 2, "output_tokens_per_s": 18.0},
              {"in_flight": 4, "output_tokens_per_s": 30.0}]
    assert bench_suite.curve_predict(points, 1.5) == pytest.approx(14.0)
    assert bench_suite.curve_predict(points, 3.0) == pytest.approx(24.0)
    assert bench_suite.curve_predict(points, 0.5) == 10.0 and bench_suite.curve_predict(points, 9) == 30.0
    assert bench_suite.curve_predict([], 2) is None and bench_suite.curve_predict(points, None) is None


def _row(tps, acc=1.0, kept=None, mean=None, peak=None, preempt=0):
    return {"output_tokens_per_s": tps, "accuracy": acc, "kept_fraction": kept, "mean_running": mean,
            "peak_running": peak, "preemptions": preempt}


def test_cell_ratios_concurrency_and_targets():
    runs = {"vanilla": _row(10.0, mean=2.0, peak=2), "vanilla-bs32": _row(8.0, mean=2.0, peak=2),
            "full": _row(7.9, mean=2.0, peak=2), "fastgen": _row(12.0, 0.9375, kept=0.55, mean=2.0, peak=3)}
    ratios = bench_suite.cell_ratios(runs)
    assert ratios["full_vs_vanilla_same_block"] == pytest.approx(0.9875)
    assert ratios["fastgen_vs_full"] == pytest.approx(12 / 7.9)
    assert ratios["vanilla_same_block_vs_vanilla"] == pytest.approx(0.8)
    assert ratios["passkey_points_fastgen_vs_full"] == pytest.approx(-6.25)
    assert bench_suite.cell_ratios({"fastgen": _row(1.0)})["fastgen_vs_full"] is None

    workload = {"requests": 16, "prompt_tokens": {"mean": 1300}, "output_tokens": {"max": 16}}
    cell = {"name": "bound-2/short/burst", "budget_k": 2, "arrivals": "burst", "output": "short",
            "workload": workload, "runs": runs, "ratios": ratios}
    capacity = {"vanilla": 2816, "vanilla-bs32": 3328, "full": 3328, "fastgen": 3328}
    blocks = {"vanilla": 128, "vanilla-bs32": 32, "full": 32, "fastgen": 32}
    conc = bench_suite.cell_concurrency(cell, capacity, blocks, None)
    assert conc["fastgen"]["ideal"]["by_rule"] == 3 and conc["fastgen"]["ideal_mean"] == pytest.approx(16 / 6)
    assert conc["fastgen"]["mean_vs_ideal"] == pytest.approx(2.0 / (16 / 6))  # 0.75: missed
    assert conc["vanilla"]["ideal"] == {"full": 2} and conc["vanilla"]["preemptions"] == 0
    assert bench_suite.cell_concurrency({**cell, "budget_k": None}, capacity, blocks, None) is None

    cell["concurrency"] = conc
    ample = {**cell, "name": "ample/long/burst", "budget_k": None, "concurrency": None, "output": "long"}
    checks = bench_suite.target_checks([ample, cell])
    met = {c["target"]: c["met"] for c in checks if c["cell"] == "ample/long/burst"}
    assert met["ample: full >= 0.97x vanilla at the same block size"] is True
    assert met["ample: fastgen >= 0.97x full"] is True
    assert met["passkey: fastgen within 5 points of full"] is False  # -6.25 points
    bound = [c for c in checks if c["cell"] == "bound-2/short/burst"]
    assert any(c["target"].startswith("memory-bound: fastgen mean running") and c["met"] is False for c in bound)
    assert any(c["target"].startswith("memory-bound: fastgen >= full") and c["met"] for c in bound)
    poisson = bench_suite.target_checks([{**cell, "name": "bound-2/short/poisson", "arrivals": "poisson"}])
    assert not any(c["target"].startswith("memory-bound: fastgen mean running") for c in poisson)
    # beside the rule's ideal, the same workload's mean running with ample memory (prefill pacing)
    assert not any(c["target"].startswith("(reading)") for c in bound)  # no ample cell of this workload
    ample_short = {**ample, "name": "ample/short/burst", "output": "short",
                   "runs": {**runs, "fastgen": {**runs["fastgen"], "mean_running": 2.1}}}
    reading = [c for c in bench_suite.target_checks([ample_short, cell])
               if c["cell"] == "bound-2/short/burst" and c["target"].startswith("(reading)")]
    assert len(reading) == 1 and reading[0]["value"] == pytest.approx(2.0 / 2.1) and reading[0]["met"] is True
    assert "2.10" in reading[0]["note"]
    slow_ample = {**ample_short, "runs": {**runs, "fastgen": {**runs["fastgen"], "mean_running": 9.0}}}
    capped = [c for c in bench_suite.target_checks([slow_ample, cell]) if c["target"].startswith("(reading)")]
    assert capped[0]["value"] == pytest.approx(2.0 / (16 / 6)) and capped[0]["met"] is False  # capped by the rule
    text = bench_suite.format_targets(checks)
    assert "MISSED" in text and "met" in text
    assert "memory does not bind" not in next(c for c in bound if "mean running" in c["target"])["note"]
    # three requests all fit compressed: the verdict stands, with a note that memory does not bind
    few = {**cell, "workload": {**workload, "requests": 3,
                                "prompt_tokens": {"mean": 1300, "min": 1250, "max": 1350}}}
    few["concurrency"] = bench_suite.cell_concurrency(few, capacity, blocks, None)
    assert few["concurrency"]["fastgen"]["ideal"]["memory_binds"] is False
    note = next(c for c in bench_suite.target_checks([few]) if "mean running" in c["target"])["note"]
    assert "memory does not bind: all 3 requests fit compressed" in note
    assert "memory does not bind: all 3 requests" in bench_suite.format_cell(
        {**few, "budget_bytes": 1 << 26, "runs": {}})


def test_chunk_compress_is_held_to_the_by_chunk_ideal():
    assert "--no-scheduler-reserve-full-isl" in bench_suite.CONFIGS["fastgen-chunk-compress"].serve_args
    assert "compress_by_chunk" in " ".join(bench_suite.CONFIGS["fastgen-chunk-compress"].serve_args)
    runs = {label: _row(10.0, kept=0.55, mean=3.0, peak=4) for label in ("fastgen", "fastgen-chunk-compress")}
    cell = {"name": "bound-2/short/burst", "budget_k": 2, "arrivals": "burst", "output": "short", "runs": runs,
            "workload": {"requests": 16, "prompt_tokens": {"mean": 1300}, "output_tokens": {"max": 16}}}
    capacity, blocks = {k: 3328 for k in runs}, {k: 32 for k in runs}
    conc = bench_suite.cell_concurrency(cell, capacity, blocks, None)
    rule, chunked = conc["fastgen"], conc["fastgen-chunk-compress"]
    assert rule["ideal"]["by_rule"] == 3 and rule["ideal"]["by_chunk"] == 4
    assert rule["ideal_mean"] == pytest.approx(16 / 6) and chunked["ideal_mean"] == pytest.approx(4.0)
    assert chunked["mean_vs_ideal"] == pytest.approx(0.75)


def test_markdown_report_of_a_run():
    row = {"output_tokens_per_s": 10.0, "peak_running": 2, "mean_running": 1.9, "preemptions": 0,
           "kept_fraction": 0.55, "ttft_s": {"p50": 1.0, "p99": 2.0}, "tpot_s": {"p50": 0.02, "p99": 0.05},
           "accuracy": 0.75, "completed": 4, "failed": 0, "loadavg_after": [1.5, 1.0, 1.0]}
    doc = {"budgets": [{"name": "bound-2", "bytes": 64 << 20, "servers": {"fastgen": {
               "block_size": 32, "capacity_tokens": 3328, "kernel": {"path": "vllm-cpu-kernel", "isa": "vec"},
               "start_s": 30.0}}}],
           "cells": [{"name": "bound-2/long/burst", "rate": None, "output": "long", "runs": {"fastgen": row},
                      "budget_k": 2, "arrivals": "burst",
                      "ratios": bench_suite.cell_ratios({"fastgen": row}),
                      "concurrency": {"fastgen": {"ideal": {"by_rule": 3, "by_chunk": 4, "full": 2},
                                                  "peak_running": 3, "mean_running": 2.5, "ideal_mean": 2.67,
                                                  "mean_vs_ideal": 0.94, "preemptions": 0}},
                      "curve_prediction": {"vanilla": 12.0}}],
           "curve": {"vanilla": {"budget": "ample", "output_tokens": 256, "points": [
               {"in_flight": 1, "output_tokens_per_s": 5.0, "mean_running": 1.0, "tpot_s": {"p50": 0.02},
                "wall_s": 50.0}]}},
           "targets": []}
    text = bench_suite.markdown_report(doc)
    assert "| bound-2 (64.0 MiB) | fastgen | 32 | 3,328 | vec (vllm-cpu-kernel) | 30 s |" in text
    assert "| bound-2/long/burst | fastgen | 10.00 | 2 | 1.90 | 0 | 0.550 |" in text and "3/4" in text
    assert "| 3 / 4 | 3 / 2.50 |" in text and "vanilla 12.00" in text and "**missed**" in text
    unbound = doc["cells"][0]["concurrency"]["fastgen"]["ideal"]
    unbound["memory_binds"] = False
    assert "| 3 / 4; memory does not bind: all 3 requests fit compressed (raise --num-requests) |" \
        in bench_suite.markdown_report(doc)


def test_admission_headroom_needs_a_withheld_request_and_a_faster_ample_cell():
    def cell(name, budget_k, tps, ttft, by_rule=3, by_chunk=4, arrivals="burst"):
        ideal = {"by_rule": by_rule, "by_chunk": by_chunk, "full": 2}
        return {"name": name, "budget_k": budget_k, "output": "short", "arrivals": arrivals,
                "runs": {"fastgen": {"output_tokens_per_s": tps, "ttft_s": {"p50": ttft}}},
                "concurrency": None if budget_k is None else {"fastgen": {
                    "ideal": ideal, "peak_running": 3, "mean_running": 2.5, "ideal_mean": 2.67,
                    "mean_vs_ideal": 0.94, "preemptions": 0}}}

    bound = cell("bound-2/short/burst", 2, 10.0, 6.0)
    assert bench_suite.admission_headroom([bound]) == [
        {"cell": "bound-2/short/burst", "by_rule": 3, "by_chunk": 4, "withheld": 1, "ample_gain": None,
         "ttft_ratio": None, "limits": None}]  # no ample cell: unknown
    (row,) = bench_suite.admission_headroom([cell("ample/short/burst", None, 12.0, 4.0), bound])
    assert row["ample_gain"] == pytest.approx(1.2) and row["ttft_ratio"] == pytest.approx(1.5)
    assert row["limits"] is True
    # ample memory no faster than the server-instance spread: nothing for admission to win
    (row,) = bench_suite.admission_headroom([cell("ample/short/burst", None, 10.5, 6.0), bound])
    assert row["limits"] is False
    # ample memory much faster, but the rule withholds nothing: the budget, not the rule
    tight = cell("bound-2/short/burst", 2, 10.0, 6.0, by_chunk=3)
    (row,) = bench_suite.admission_headroom([cell("ample/short/burst", None, 20.0, 4.0), tight])
    assert row["withheld"] == 0 and row["limits"] is False
    # Poisson cells and ample cells have no row; the ample cell of another output does not count
    poisson = cell("bound-2/short/poisson", 2, 10.0, 6.0, arrivals="poisson")
    ample_long = {**cell("ample/long/burst", None, 50.0, 4.0), "output": "long"}
    assert [r["ample_gain"] for r in bench_suite.admission_headroom([ample_long, poisson, bound])] == [None]
    text = bench_suite.format_headroom(bench_suite.admission_headroom([cell("ample/short/burst", None, 12.0, 4.0),
                                                                       bound]))
    assert "rule 3 -> by chunk 4 (+1)" in text and "1.20x" in text and "the rule limits" in text
    assert bench_suite.format_headroom([]) == ""
    doc = {"budgets": [], "cells": [cell("ample/short/burst", None, 12.0, 4.0), bound], "curve": {}}
    for c in doc["cells"]:
        c["runs"]["fastgen"].update({"peak_running": 3, "mean_running": 2.5, "preemptions": 0, "kept_fraction": 0.5,
                                     "tpot_s": {"p50": 0.1, "p99": 0.2}, "accuracy": 1.0, "completed": 4,
                                     "failed": 0})
        c["runs"]["fastgen"]["ttft_s"]["p99"] = 9.0
        c["ratios"] = bench_suite.cell_ratios(c["runs"])
    assert "| bound-2/short/burst | 3 -> 4 (+1) | 1.20x | 1.50 | **limits** |" in bench_suite.markdown_report(doc)


def test_cache_info_from_metrics_labels():
    text = ('# HELP vllm:cache_config_info x\nvllm:cache_config_info{block_size="128",cache_dtype="auto",'
            'num_gpu_blocks="22",engine="0"} 1.0\n')
    assert bench_suite.cache_info(text) == {"block_size": 128, "num_gpu_blocks": 22, "capacity_tokens": 2816}
    assert bench_suite.cache_info("nothing here") == {}


def test_attention_kernel_records():
    plugin_log = ("INFO [runner.py:84] vllm-adaptive-kv: 1200 head pages of 32 tokens (30 layers x 3 KV heads), "
                  "policy fastgen, attention path vllm-cpu-kernel\n")
    fastgen = bench_suite.CONFIGS["fastgen"]
    assert bench_suite.attention_kernel(fastgen, plugin_log, "bfloat16", 32, 64) == {
        "path": "vllm-cpu-kernel", "isa": "vec"}
    torch_log = plugin_log.replace("vllm-cpu-kernel", "torch")
    assert bench_suite.attention_kernel(fastgen, torch_log, "bfloat16", 32, 64) == {"path": "torch", "isa": None}
    vanilla = bench_suite.attention_kernel(bench_suite.CONFIGS["vanilla"], "", "bfloat16", 128, 64)
    # vLLM's own rule on this CPU: AMX for bf16 at a multiple of 32 when the CPU has it, else vec
    expected = "amx" if "amx_bf16" in cpu_info()["key_flags"] else "vec"
    assert vanilla == {"path": "vllm-cpu-attn", "isa": expected}
    assert bench_suite.attention_kernel(bench_suite.CONFIGS["vanilla"], "", "float32", 32, 64)["isa"] == "vec"


def test_cpu_info_reads_lscpu_text():
    info = cpu_info("Model name:   Some CPU\nFlags:    fpu avx2 avx512f amx_bf16\n")
    assert info["model"] == "Some CPU" and info["key_flags"] == ["avx2", "avx512f", "amx_bf16"]
    assert "fpu" in info["flags"]


def test_poisson_cells_keep_the_prompts():
    render, count = (lambda m: f"<u>{m}</u>", lambda t: len(t) // 4)
    burst = bench.build_workload(6, (200, 300), (4, 4), 1, None, render, count)
    poisson = bench_suite.with_arrivals(burst, 2.0, 1)
    assert [r.text for r in poisson] == [r.text for r in burst]
    assert [r.arrival_s for r in poisson] == bench.arrival_times(6, 2.0, 1)


def test_format_cell_prints_ratios_and_concurrency():
    row = {"output_tokens_per_s": 10.0, "peak_running": 2, "mean_running": 1.9, "preemptions": 0,
           "kept_fraction": None, "ttft_s": {"p50": 1.0, "p99": 2.0}, "tpot_s": {"p50": 0.02, "p99": 0.05},
           "accuracy": 1.0, "kernel": {"path": "vllm-cpu-attn", "isa": "amx"}}
    cell = {"name": "bound-2/short/burst", "rate": None, "budget_bytes": 64 << 20,
            "workload": {"requests": 16, "prompt_tokens": {"min": 1250, "max": 1350}, "output_tokens": {"max": 16}},
            "runs": {"vanilla": row}, "ratios": {"full_vs_vanilla": None},
            "concurrency": {"vanilla": {"ideal": {"full": 2}, "peak_running": 2, "mean_running": 1.9,
                                        "preemptions": 0}}, "curve_prediction": {"vanilla": 12.5}}
    text = bench_suite.format_cell(cell)
    assert "amx" in text and "2 whole requests fit" in text and "12.50 output tok/s" in text


class FakeServer:
    def __init__(self, name, alive_after_cells):
        self.name, self.cells_left, self.stopped, self.log_path = name, alive_after_cells, False, f"/tmp/{name}.log"

    def alive(self):
        return self.cells_left > 0

    def __exit__(self, *exc):
        self.stopped = True


def test_a_cell_runs_once_more_on_a_fresh_server_when_the_first_died():
    suite = bench_suite.Suite.__new__(bench_suite.Suite)  # no model folder needed for this part
    ran, started = [], []

    def run_cell(server, budget, label, out, arrivals, workload, retry=False, round_index=0):
        ran.append((server.name, retry))
        server.cells_left -= 1

    def start_server(budget, label):
        started.append(label)
        return FakeServer("second", 5)

    suite.run_cell, suite.start_server = run_cell, start_server
    first = FakeServer("first", 2)
    assert suite.run_cell_once_more_if_died(first, {"name": "bound-2"}, "full", "short", "burst", []) is first
    assert ran == [("first", False)] and not started
    live = suite.run_cell_once_more_if_died(first, {"name": "bound-2"}, "full", "long", "burst", [])  # first dies in this cell
    assert live.name == "second" and first.stopped and started == ["full"]
    assert ran[1:] == [("first", False), ("second", True)]


def test_interleaved_rounds_alternate_turns_and_ratios_are_per_round_medians(monkeypatch):
    """Cells run every configuration back to back, reversing the turn each time; the
    Poisson rate is the first configuration's even when it ran last; the tables show the
    median row and the median of the per-round ratios."""
    suite = bench_suite.Suite.__new__(bench_suite.Suite)
    suite.args = bench_suite.parse_args(["--vllm", sys.executable, "--configs", "vanilla-bs32,full,fastgen",
                                         "--rounds", "3", "--budgets", "ample", "--outputs", "short,long"])
    assert suite.args.order == "interleaved"
    suite.rates, suite.doc, suite.save = {}, {"cells": [], "curve": {}, "budgets": [
        {"name": "ample", "servers": {}}]}, lambda: None
    speeds = {"vanilla-bs32": [10.0, 11.0, 9.0], "full": [10.0, 12.0, 10.0], "fastgen": [9.0, 13.0, 11.0]}
    calls = []

    def fake_measure(server, label, workload, sargs):
        calls.append(label)
        round_index = sum(1 for c in calls[:-1] if c == label) % 3
        tps = speeds[label][round_index]
        return {"output_tokens_per_s": tps, "requests_per_s": tps / 10, "failed": 0, "samples": [],
                "accuracy": 1.0, "kept_fraction": None, "mean_running": 1.0, "peak_running": 1, "preemptions": 0,
                "ttft_s": {"p50": 1.0, "p99": 1.0}, "tpot_s": {"p50": 0.1, "p99": 0.1}, "completed": 1}

    class Up:
        sargs = None

        def alive(self):
            return True

    budget = {"name": "ample", "k": None, "bytes": 1 << 30,
              "servers": {label: {"kernel": {"path": "x"}} for label in suite.args.configs}}
    workload = [bench.BenchRequest(index=0, text="t", passkey="1", depth=0.5, prompt_tokens=1300, output_tokens=16,
                                   arrival_s=0.0)]
    monkeypatch.setattr(bench, "measure", fake_measure)
    suite.run_cells({label: Up() for label in suite.args.configs}, budget, {"short": workload, "long": workload})
    forward, backward = ["vanilla-bs32", "full", "fastgen"], ["fastgen", "full", "vanilla-bs32"]
    # burst short r1..r3, burst long r1..r3, then the same for Poisson: turns alternate throughout
    assert calls[:9] == forward + backward + forward and calls[9:12] == backward
    assert len(calls) == 2 * 2 * 3 * 3
    assert suite.rates[("ample", "long")] == pytest.approx(0.9 * 1.0)  # vanilla-bs32's round 1, though it ran last
    burst_short = suite.doc["cells"][0]
    assert burst_short["name"] == "ample/short/burst" and len(burst_short["rounds"]) == 3
    assert list(burst_short["runs"]) == forward  # the configured order, whatever order they ran in
    assert burst_short["runs"]["fastgen"]["output_tokens_per_s"] == 11.0  # the median row
    # fastgen / full per round: 0.9, 13/12, 1.1 -> median 13/12 (not 11/10 of the median rows)
    assert [r["fastgen_vs_full"] for r in burst_short["round_ratios"]] == pytest.approx([0.9, 13 / 12, 1.1])
    assert burst_short["ratios"]["fastgen_vs_full"] == pytest.approx(13 / 12)
    assert "fastgen_vs_full by round: 0.90 / 1.08 / 1.10" in bench_suite.format_cell(
        {**burst_short, "budget_bytes": 1 << 30, "rate": None,
         "runs": {k: {**v, "kernel": {"path": "x"}} for k, v in burst_short["runs"].items()}})
    doc = {"budgets": [], "cells": [burst_short], "curve": {}, "args": {"rounds": 3}}
    text = bench_suite.markdown_report(doc)
    assert "1.08x (0.90 / 1.08 / 1.10)" in text and "fastgen (round 3)" in text and "median of 3 rounds" in text
    assert "Servers:" in text
    fresh_text = bench_suite.markdown_report({**doc, "args": {"rounds": 3, "fresh_servers": True}})
    assert "Servers (started anew for each of the 3 rounds, `--fresh-servers`" in fresh_text
    by_config = bench_suite.parse_args(["--vllm", sys.executable, "--order", "by-config"])
    assert by_config.order == "by-config" and by_config.rounds == 1


@pytest.mark.parametrize("fresh", [False, True])
def test_fresh_servers_start_anew_each_round_and_keep_the_turns(fresh):
    """--fresh-servers: each round on its own servers (all stopped), every (cell, round) in
    the same turn order as on shared servers, and the curve once, on the last round's."""
    suite = bench_suite.Suite.__new__(bench_suite.Suite)
    argv = ["--vllm", sys.executable, "--configs", "full,fastgen", "--rounds", "3", "--budgets", "ample",
            "--outputs", "short", "--arrivals", "burst,poisson"] + (["--fresh-servers"] if fresh else [])
    suite.args = bench_suite.parse_args(argv)
    started, ran, curves = [], [], []

    def start_server(budget, label):
        started.append(FakeServer(f"{label}-{len(started)}", 99))
        return started[-1]

    def run_cell(server, budget, label, out, arrivals, workload, retry=False, round_index=0):
        ran.append((arrivals, round_index, label, server.name))

    suite.start_server, suite.run_cell = start_server, run_cell
    suite.run_curve = lambda server, label, budget_name: curves.append(server.name)
    suite.run_budget({"name": "ample"}, {"short": []}, curve_here=True)
    assert len(started) == (6 if fresh else 2) and all(server.stopped for server in started)
    turns = {}
    for arrivals, round_index, label, _ in ran:
        turns.setdefault((arrivals, round_index), []).append(label)
    forward, backward = ["full", "fastgen"], ["fastgen", "full"]
    assert turns == {("burst", 0): forward, ("burst", 1): backward, ("burst", 2): forward,
                     ("poisson", 0): backward, ("poisson", 1): forward, ("poisson", 2): backward}
    assert {name for *_, name in ran} == {server.name for server in started}
    assert curves == [started[-2].name]  # the curve's configurations (default vanilla,full): the last full
    if fresh:  # round r ran only on the r-th pair of servers
        assert all(name in (started[2 * r].name, started[2 * r + 1].name) for _, r, _, name in ran)
