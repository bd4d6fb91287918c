"""GuideLLM against our servers (apps/guidellm_bench.py): the command and the report parsing.

No GuideLLM here: it lives in its own virtualenv (scripts/guidellm_setup.sh). The report
below keeps, from a real GuideLLM 0.8.1 JSON (vanilla, throughput@16, 2026-11-30), the
fields parse_report reads, with their real values.
"""

from __future__ import annotations

import pathlib

import pytest

from vllm_adaptive_kv.apps import guidellm_bench as G


def _dist(median, mean, p99):
    return {"successful": {"mean": mean, "median": median, "percentiles": {"p50": median, "p99": p99}},
            "errored": {"mean": 0.0, "median": 0.0}}


REPORT = {"metadata": {}, "config": {}, "conclusions": {}, "benchmarks": [{
    "type_": "generative_benchmark",
    "config": {"strategy": {"type_": "throughput", "worker_count": 10, "max_concurrency": 16,
                            "rampup_duration": 0.0}},
    "metrics": {
        "request_totals": {"successful": 16, "errored": 0, "incomplete": 0, "total": 16},
        "output_tokens_per_second": _dist(0.9, 1.0129329031550867, 2.0),
        "requests_per_second": _dist(0.06, 0.06330830644719293, 0.1),
        "time_to_first_token_ms": _dist(136673.86770248413, 138618.83328855038, 249437.27016448975),
        "inter_token_latency_ms": _dist(476.0493755340576, 480.0, 900.0),
        "request_latency": _dist(143.49771213531494, 140.0, 250.0),
        "request_concurrency": _dist(9.0, 9.239074442325178, 16.0),
        "output_token_count": _dist(16.0, 16.0, 16.0),
        "prompt_token_count": _dist(1330.0, 1330.0, 1330.0),
    }}]}


def test_parse_report_reads_guidellm_json():
    (row,) = G.parse_report(REPORT)
    assert row["strategy"] == "throughput" and (row["completed"], row["errored"]) == (16, 0)
    assert row["output_tokens_per_s"] == pytest.approx(1.0129, abs=1e-4)
    assert row["ttft_ms_p50"] == pytest.approx(136673.87, abs=0.01)
    assert row["ttft_ms_p99"] == pytest.approx(249437.27, abs=0.01)
    assert row["itl_ms_p50"] == pytest.approx(476.05, abs=0.01)
    assert row["concurrency_mean"] == pytest.approx(9.239, abs=1e-3)
    assert (row["output_tokens_mean"], row["prompt_tokens_mean"]) == (16.0, 1330.0)


def test_parse_report_tolerates_missing_metrics():
    (row,) = G.parse_report({"benchmarks": [{"config": {"strategy": {"type_": "constant", "rate": 0.2}},
                                             "metrics": {}}]})
    assert (row["strategy"], row["rate"], row["output_tokens_per_s"], row["ttft_ms_p99"]) == ("constant", 0.2,
                                                                                             None, None)
    assert G.parse_report({}) == []


@pytest.mark.parametrize("text, parsed", [
    ("throughput", ("throughput", {})), ("throughput:4", ("throughput", {"max_concurrency": 4})),
    ("constant:0.25", ("constant", {"rate": 0.25})), ("poisson:1", ("poisson", {"rate": 1.0})),
    ("concurrent:2", ("concurrent", {"streams": 2})), ("sweep", ("sweep", {}))])
def test_parse_profile(text, parsed):
    assert G.parse_profile(text) == parsed


@pytest.mark.parametrize("text", ["constant", "burst:2", "concurrent"])
def test_parse_profile_rejects(text):
    with pytest.raises(ValueError, match="profile"):
        G.parse_profile(text)


def test_command_sends_everything_at_once_by_default(tmp_path):
    cmd = G.guidellm_command("guidellm", "http://127.0.0.1:19040", "/m", "throughput", {}, 1300, 16, 16,
                             tmp_path / "r.json")
    assert cmd[:2] == ["guidellm", "run"]
    args = dict(zip(cmd[2::2], cmd[3::2]))
    assert args["--profile"] == "kind=throughput,max_concurrency=16"
    assert args["--backend"] == "kind=openai_http,target=http://127.0.0.1:19040,model=bench"
    assert args["--data"] == "kind=synthetic_text,prompt_tokens=1300,output_tokens=16"
    assert args["--constraint"] == "kind=max_requests,count=16"
    assert args["--output"] == f"kind=json,path={tmp_path / 'r.json'}"
    assert G.profile_label("constant", {"rate": 0.25}) == "constant-0.25"


def test_setup_script_help():
    import subprocess

    script = pathlib.Path(__file__).resolve().parents[1] / "scripts" / "guidellm_setup.sh"
    out = subprocess.run(["bash", str(script), "--help"], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0 and "GuideLLM" in out.stdout
