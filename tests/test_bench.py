"""`vllm-adaptive-kv bench`: the pure parts (no vLLM), and one tiny real run of `bench --suite --quick`."""

from __future__ import annotations

import json
import math
import random
import statistics
import sys

import pytest

from vllm_adaptive_kv.apps import bench


# --------------------------------------------------------------------------- CLI parsing


def test_parse_size_units():
    assert bench.parse_size("67108864") == 64 << 20
    assert bench.parse_size("64MiB") == 64 << 20
    assert bench.parse_size("64 mib") == 64 << 20
    assert bench.parse_size("1.5GiB") == 3 << 29
    assert bench.parse_size("2M") == 2_000_000
    for bad in ("", "abc", "64XB", "-1", "0", "1e6"):
        with pytest.raises(ValueError, match="allowed"):
            bench.parse_size(bad)


def test_parse_range():
    assert bench.parse_range("--x", "16") == (16, 16)
    assert bench.parse_range("--x", "1200:1400") == (1200, 1400)
    for bad in ("0", "5:3", "a", "1:2:3", "", "3:"):
        with pytest.raises(ValueError, match=r"--x=.*allowed"):
            bench.parse_range("--x", bad)
    with pytest.raises(ValueError, match=">= 64"):
        bench.parse_range("--x", "10", minimum=64)


def test_parse_configs():
    assert bench.parse_configs("vanilla,full,fastgen") == ["vanilla", "full", "fastgen"]
    assert bench.parse_configs(" fastgen , h2o ") == ["fastgen", "h2o"]
    with pytest.raises(ValueError, match=r"unknown 'nope'.*vanilla, full, fastgen"):
        bench.parse_configs("vanilla,nope")
    with pytest.raises(ValueError, match="repeated"):
        bench.parse_configs("full,full")
    with pytest.raises(ValueError, match="empty"):
        bench.parse_configs(",")


def test_parse_policy_arg():
    assert bench.parse_policy_arg("recovery_ratio=0.9") == ("recovery_ratio", "0.9")
    for bad in ("recovery_ratio", "=1", "a b=1", "x="):
        with pytest.raises(ValueError, match="KEY=VALUE"):
            bench.parse_policy_arg(bad)


def test_bad_cli_values_name_the_value(capsys):
    cases = (["--configs", "vanilla,bogus"], ["--kv-cache-memory-bytes", "lots"], ["--rate", "-2"],
             ["--prompt-tokens", "9:3"], ["--output-tokens", "0"], ["--policy-arg", "oops"],
             ["--prompt-tokens", "2000", "--output-tokens", "100"], ["--vllm", "/no/such/vllm"])
    for argv in cases:
        with pytest.raises(SystemExit) as exc:
            bench.main(argv)
        assert exc.value.code == 2
        err = capsys.readouterr().err
        assert "allowed" in err and (argv[1] in err or argv[-1] in err), err


def test_server_command_per_config(tmp_path):
    args = bench.build_parser().parse_args(
        ["--max-num-seqs", "8", "--policy-arg", "recovery_ratio=0.9", "--serve-args", "--swap-space 0",
         "--vllm", sys.executable])
    vanilla = bench.server_command("vanilla", args, "/m", 1234)
    assert "--kv-policy" not in vanilla and not any(a.startswith("--additional-config") for a in vanilla)
    assert vanilla[:3] == [sys.executable, "serve", "/m"]
    assert vanilla[vanilla.index("--kv-cache-memory-bytes") + 1] == str(64 << 20)
    assert "--enforce-eager" in vanilla and vanilla[-2:] == ["--swap-space", "0"]
    assert "--no-enable-prefix-caching" in vanilla  # like the plugin, which turns it off
    cached = bench.build_parser().parse_args(["--vanilla-prefix-caching"])
    assert "--no-enable-prefix-caching" not in bench.server_command("vanilla", cached, "/m", 1)
    fastgen = bench.server_command("fastgen", args, "/m", 1234)
    assert fastgen[fastgen.index("--kv-policy") + 1] == "fastgen"
    assert fastgen[fastgen.index("--additional-config.recovery_ratio") + 1] == "0.9"
    no_eager = bench.build_parser().parse_args(["--no-enforce-eager"])
    assert "--enforce-eager" not in bench.server_command("vanilla", no_eager, "/m", 1)


# --------------------------------------------------------------------------- workload


def fake_tokenizer():
    """(render, count): a chat wrapper and ~4 characters per token."""
    return (lambda m: f"<user>{m}</user><assistant>", lambda text: len(text) // 4)


def test_workload_is_deterministic_and_in_range():
    render, count = fake_tokenizer()
    a = bench.build_workload(12, (300, 600), (4, 9), seed=3, rate=None, render=render, count=count)
    b = bench.build_workload(12, (300, 600), (4, 9), seed=3, rate=None, render=render, count=count)
    c = bench.build_workload(12, (300, 600), (4, 9), seed=4, rate=None, render=render, count=count)
    assert a == b and a != c
    assert [r.index for r in a] == list(range(12))
    assert all(4 <= r.output_tokens <= 9 for r in a)
    assert all(r.arrival_s == 0.0 for r in a)
    # The filler count is the nearest to the target: lengths land within one filler
    # sentence (~22 tokens; ~25 with this fake tokenizer) of the range.
    assert all(300 - 30 <= r.prompt_tokens <= 600 + 30 for r in a)
    assert all(r.prompt_tokens == count(r.text) and r.passkey in r.text for r in a)
    assert all(r.text.startswith("<user>") for r in a)
    assert len({r.passkey for r in a}) > 1 and len({r.depth for r in a}) > 1


def test_workload_prompts_do_not_depend_on_rate():
    render, count = fake_tokenizer()
    burst = bench.build_workload(8, (200, 400), (4, 4), seed=1, rate=None, render=render, count=count)
    poisson = bench.build_workload(8, (200, 400), (4, 4), seed=1, rate=2.0, render=render, count=count)
    assert [r.text for r in burst] == [r.text for r in poisson]
    assert [r.arrival_s for r in poisson] == bench.arrival_times(8, 2.0, 1)


def test_filler_for_tokens_hits_the_nearest_count():
    def count(n):  # affine with a little noise, like a real tokenizer
        return 90 + 22 * n + (n % 3)

    for target in (50, 113, 500, 1300, 2900):
        n = bench.filler_for_tokens(target, count)
        best = min(range(1, 200), key=lambda m: abs(count(m) - target))
        assert abs(count(n) - target) == abs(count(best) - target)


def test_poisson_arrivals():
    assert bench.arrival_times(5, None, 0) == [0.0] * 5
    times = bench.arrival_times(4000, 5.0, seed=7)
    assert times == bench.arrival_times(4000, 5.0, seed=7) and times != bench.arrival_times(4000, 5.0, seed=8)
    assert times[0] == 0.0 and all(b >= a for a, b in zip(times, times[1:]))
    gaps = [b - a for a, b in zip(times, times[1:])]
    mean = statistics.fmean(gaps)
    assert abs(mean - 0.2) < 0.02  # 1 / rate; sd of the mean is 0.2 / sqrt(4000) = 0.003
    assert abs(statistics.pstdev(gaps) / mean - 1) < 0.1  # exponential: sd == mean
    # Counts per unit interval are Poisson(5): variance ~ mean.
    counts = [0] * int(times[-1])
    for t in times:
        if int(t) < len(counts):
            counts[int(t)] += 1
    assert abs(statistics.fmean(counts) - 5) < 0.4 and abs(statistics.pvariance(counts) / 5 - 1) < 0.3


# --------------------------------------------------------------------------- statistics


def test_percentile_matches_numpy_linear():
    np = pytest.importorskip("numpy")
    rng = random.Random(0)
    for n in (1, 2, 3, 10, 101):
        values = [rng.random() for _ in range(n)]
        for q in (0, 1, 50, 90, 99, 100):
            assert math.isclose(bench.percentile(values, q), float(np.percentile(values, q)), rel_tol=1e-12)
    assert bench.percentile([], 50) is None
    assert bench.percentile([3.0, 1.0, 2.0], 50) == 2.0
    with pytest.raises(ValueError, match="q=101"):
        bench.percentile([1.0], 101)


def test_latency_stats_skip_missing():
    stats = bench.latency_stats([1.0, None, 3.0])
    assert stats == {"p50": 2.0, "p99": pytest.approx(2.98), "mean": 2.0}
    assert bench.latency_stats([]) == {"p50": None, "p99": None, "mean": None}


def row(config, tps, peak, acc, ttft=(1.0, 2.0)):
    return {"config": config, "output_tokens_per_s": tps, "requests_per_s": tps / 16, "peak_running": peak,
            "mean_kv_usage": 0.5, "mean_kv_usage_running": 0.6, "ttft_s": {"p50": ttft[0], "p99": ttft[1]},
            "tpot_s": {"p50": 0.1, "p99": None}, "accuracy": acc, "failed": 0}


def test_ratios_against_vanilla():
    rows = [row("vanilla", 10.0, 2, 1.0), row("full", 8.0, 2, 1.0), row("fastgen", 20.0, 5, 0.9375, (0.5, 4.0))]
    bench.add_ratios(rows)
    fastgen = rows[2]["vs_vanilla"]
    assert fastgen["output_tokens_per_s"] == 2.0 and fastgen["requests_per_s"] == 2.0
    assert fastgen["peak_running"] == 2.5 and fastgen["mean_kv_usage"] == 1.0
    assert fastgen["ttft_s_p50"] == 0.5 and fastgen["ttft_s_p99"] == 2.0
    assert fastgen["tpot_s_p99"] is None  # missing on both sides
    assert fastgen["accuracy_points"] == pytest.approx(-6.25)
    assert rows[0]["vs_vanilla"]["output_tokens_per_s"] == 1.0
    assert rows[1]["vs_vanilla"]["output_tokens_per_s"] == 0.8
    no_base = [row("full", 8.0, 2, 1.0)]
    bench.add_ratios(no_base)
    assert no_base[0]["vs_vanilla"] is None
    assert bench.ratio(1.0, 0) is None and bench.ratio(None, 2.0) is None
    text = bench.format_table(rows)
    assert "fastgen" in text and "2.50x" in text and "-6.2pt" in text


METRICS_TEXT = """\
# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="bench"} 3.0
vllm:num_requests_waiting{engine="0",model_name="bench"} 13.0
vllm:kv_cache_usage_perc{engine="0",model_name="bench"} 0.8125
vllm:num_preemptions_total{engine="0",model_name="bench"} 2.0
vllm_adaptive_kv:head_policy_total{policy="full"} 10
vllm_adaptive_kv:head_policy_total{policy="special_punct_frequent"} 80
vllm_adaptive_kv:kept_fraction_sum 9.5
vllm_adaptive_kv:kept_fraction_count 16
vllm:time_to_first_token_seconds_bucket{engine="0",le="+Inf",model_name="bench"} 16.0
process_start_time_seconds 1.7e+09
weird_value NaN
"""


def test_parse_metrics():
    values = bench.parse_metrics(METRICS_TEXT)
    assert values["vllm:num_requests_running"] == 3.0
    assert values["vllm:num_requests_waiting"] == 13.0
    assert values["vllm:kv_cache_usage_perc"] == 0.8125
    assert values["vllm_adaptive_kv:head_policy_total"] == 90  # summed over label sets
    assert values["vllm_adaptive_kv:kept_fraction_count"] == 16
    assert values["process_start_time_seconds"] == 1.7e9
    assert math.isnan(values["weird_value"])
    assert not any(k.startswith("#") or k in ("HELP", "TYPE") for k in values)
    assert bench.metric_delta({"a": 5.0}, {"a": 2.0}, "a") == 3.0
    assert bench.metric_delta({"a": 5.0}, {}, "a") == 5.0 and bench.metric_delta({}, {}, "a") is None


def test_summaries_from_samples_and_results():
    samples = [{"t": 0.0, "inflight": 0, "running": 0.0, "waiting": 0.0, "kv_usage": 0.0},
               {"t": 0.2, "inflight": 4, "running": 2.0, "waiting": 2.0, "kv_usage": 0.5},
               {"t": 0.4, "inflight": 2, "running": 2.0, "waiting": 0.0, "kv_usage": 1.0},
               {"t": 0.5, "inflight": 1, "running": 0.0, "waiting": 1.0, "kv_usage": 0.0},  # stale gauge
               {"t": 0.6, "inflight": 0, "running": 0.0, "waiting": 0.0, "kv_usage": 0.0}]
    s = bench.summarize_samples(samples)
    assert s == {"peak_running": 2.0, "peak_waiting": 2.0, "mean_kv_usage": 0.5, "mean_kv_usage_running": 0.75,
                 "max_kv_usage": 1.0, "num_samples": 5}
    render, count = fake_tokenizer()
    workload = bench.build_workload(2, (200, 200), (4, 4), 0, None, render, count)
    results = [bench._result(workload[0], 0.0, [0.5, 0.6, 0.7, 0.8], f"key {workload[0].passkey}", 4, None),
               bench._result(workload[1], 0.0, [], "", None, "HTTP 500: boom")]
    assert results[0]["ttft_s"] == 0.5 and results[0]["tpot_s"] == pytest.approx(0.1)
    assert results[0]["correct"] and not results[1]["correct"]
    run = bench.summarize_run("vanilla", results, samples, 2.0, workload)
    assert run["completed"] == 1 and run["failed"] == 1 and run["output_tokens"] == 4
    assert run["output_tokens_per_s"] == 2.0 and run["requests_per_s"] == 0.5
    assert run["accuracy"] == 0.5 and run["short_outputs"] == 0 and run["peak_running"] == 2.0


# --------------------------------------------------------------------------- a tiny real run


@pytest.mark.engine
@pytest.mark.timeout(1200)  # two servers, as the single-run test it replaced; sized for a machine ~10x slower
def test_bench_suite_quick_run(smollm2_dir, tmp_path):
    """`bench --suite --quick` on vanilla and fastgen (two servers): the pipeline and the JSON.

    One memory-bound budget; short outputs, all at once then Poisson at vanilla's rate;
    the batching curve at 1 request. Checks the structure, never the speed.
    """
    from vllm_adaptive_kv.apps import bench_suite

    out = tmp_path / "suite.json"
    rc = bench.main(["--suite", "--quick", "-n", "3", "--outputs", "short", "--curve-points", "1",
                     "--configs", "vanilla,fastgen", "--model", str(smollm2_dir), "--out", str(out), "--dtype", "float32",
                     "--log-dir", str(tmp_path / "logs"), "--start-timeout", "900"])
    assert rc == 0
    doc = json.loads(out.read_text())
    assert doc["schema"] == bench_suite.SCHEMA and doc["finished"]
    assert isinstance(doc["machine"]["cpu"]["flags"], list) and doc["uptime_after"]["loadavg"]
    assert [b["name"] for b in doc["budgets"]] == ["bound-2"]
    servers = doc["budgets"][0]["servers"]
    assert servers["vanilla"]["kernel"]["path"] == "vllm-cpu-attn" and servers["vanilla"]["kernel"]["isa"]
    assert servers["fastgen"]["kernel"] == {"path": "vllm-cpu-kernel", "isa": "vec"}
    assert servers["fastgen"]["block_size"] == bench_suite.PLUGIN_BLOCK
    assert all(s["capacity_tokens"] > 0 for s in servers.values())
    assert [c["name"] for c in doc["cells"]] == ["bound-2/short/burst", "bound-2/short/poisson"]
    burst, poisson = doc["cells"]
    assert burst["rate"] is None and poisson["rate"] == pytest.approx(0.9 * burst["runs"]["vanilla"]["requests_per_s"])
    for cell in doc["cells"]:
        assert list(cell["runs"]) == ["vanilla", "fastgen"]
        for c in cell["runs"].values():
            assert c["completed"] == 3 and c["failed"] == 0 and c["server_alive_after"]
            assert c["output_tokens"] == 12 and c["short_outputs"] == 0
            assert c["output_tokens_per_s"] > 0 and c["requests_per_s"] > 0
            assert c["peak_running"] >= 1 and 0 < c["mean_running"] <= 3 and c["preemptions"] >= 0
            assert 0 <= c["accuracy"] <= 1 and 0 < c["ttft_s"]["p50"] <= c["ttft_s"]["p99"]
            assert c["tpot_s"]["p50"] > 0 and len(c["requests"]) == 3
            assert all(r["error"] is None for r in c["requests"])
        vanilla, fastgen = cell["runs"]["vanilla"], cell["runs"]["fastgen"]
        assert "--kv-policy" not in vanilla["server_cmd"] and "--kv-policy" in fastgen["server_cmd"]
        assert vanilla["kept_fraction"] is None and 0 < fastgen["kept_fraction"] <= 1
        assert cell["ratios"]["fastgen_vs_vanilla"] > 0 and cell["ratios"]["fastgen_vs_full"] is None
        conc = cell["concurrency"]["fastgen"]
        assert conc["ideal"]["by_chunk"] >= conc["ideal"]["by_rule"] >= 1 and conc["mean_vs_ideal"] > 0
        assert cell["concurrency"]["vanilla"]["ideal"]["full"] >= 1
    (point,) = doc["curve"]["vanilla"]["points"]
    assert point["in_flight"] == 1 and point["output_tokens_per_s"] > 0 and point["failed"] == 0
    assert burst["curve_prediction"]["vanilla"] == point["output_tokens_per_s"]
    targets = {t["target"] for t in doc["targets"]}
    assert any(t.startswith("memory-bound: fastgen mean running") for t in targets)
