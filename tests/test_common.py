"""The apps' shared helpers: one rule for reading Prometheus samples, from text or in process."""

from __future__ import annotations

import math

import pytest

from vllm_adaptive_kv.apps import common

TEXT = """\
# HELP vllm_adaptive_kv:head_policy_total heads per policy
# TYPE vllm_adaptive_kv:head_policy_total counter
vllm_adaptive_kv:head_policy_total{engine="0",policy="full"} 10
vllm_adaptive_kv:head_policy_total{engine="1",policy="full"} 5
vllm_adaptive_kv:head_policy_total{engine="0",policy="special_punct"} 80
vllm_adaptive_kv:head_policy_created{engine="0",policy="full"} 1.7e+09
vllm_adaptive_kv:kept_fraction_bucket{le="0.5",policy="x"} 3
vllm_adaptive_kv:kept_fraction_bucket{le="+Inf",policy="x"} 4
vllm:num_requests_running{model_name="a}b \\"q\\"",engine="0"} 2.0
vllm:cache_config_info{block_size="32"} 1.0 1700000000000
not a sample line
weird_value NaN
bad_value abc
"""


def test_text_sums_over_label_sets_and_skips_created():
    values = common.parse_metrics(TEXT)
    assert values["vllm_adaptive_kv:head_policy_total"] == 95
    assert values["vllm_adaptive_kv:kept_fraction_bucket"] == 7
    assert values["vllm:num_requests_running"] == 2.0  # a '}' and escaped quotes inside a label value
    assert values["vllm:cache_config_info"] == 1.0  # a timestamp after the value is ignored
    assert math.isnan(values["weird_value"])
    assert not any(k.endswith("_created") for k in values)
    assert "bad_value" not in values and "not" not in values


def test_text_keeps_the_labels_asked_for_in_label_name_order():
    values = common.parse_metrics(TEXT, prefix=common.ADAPTIVE_PREFIX, by_labels=("policy", "le"))
    assert values == {
        "vllm_adaptive_kv:head_policy_total[full]": 15,
        "vllm_adaptive_kv:head_policy_total[special_punct]": 80,
        "vllm_adaptive_kv:kept_fraction_bucket[0.5][x]": 3,
        "vllm_adaptive_kv:kept_fraction_bucket[+Inf][x]": 4,
    }
    assert common.parse_metrics(TEXT, by_labels=("model_name",))["vllm:num_requests_running[a}b \"q\"]"] == 2.0


def test_registry_and_text_readers_agree():
    prometheus_client = pytest.importorskip("prometheus_client")
    registry = prometheus_client.CollectorRegistry()
    counter = prometheus_client.Counter("vllm_adaptive_kv:head_policy", "heads", ["engine", "policy"],
                                        registry=registry)
    hist = prometheus_client.Histogram("vllm_adaptive_kv:kept_fraction", "kept", ["engine"],
                                       buckets=[0.5, 1.0], registry=registry)
    other = prometheus_client.Gauge("vllm:num_requests_running", "running", registry=registry)
    counter.labels("0", "full").inc(3)
    counter.labels("1", "full").inc(2)
    counter.labels("0", "local").inc(1)
    for engine, value in (("0", 0.25), ("1", 0.75), ("1", 0.9)):
        hist.labels(engine).observe(value)
    other.set(4)

    text = prometheus_client.generate_latest(registry).decode()
    for by_labels in ((), ("policy",), ("le", "policy")):
        in_process = common.registry_metrics(by_labels=by_labels, registry=registry)
        assert in_process == common.parse_metrics(text, prefix=common.ADAPTIVE_PREFIX, by_labels=by_labels)
    plain = common.registry_metrics(registry=registry)
    assert plain["vllm_adaptive_kv:head_policy_total"] == 6
    assert plain["vllm_adaptive_kv:kept_fraction_count"] == 3
    assert plain["vllm_adaptive_kv:kept_fraction_sum"] == pytest.approx(1.9)
    assert "vllm:num_requests_running" not in plain  # only ours by default
    assert common.registry_metrics(prefix=None, registry=registry)["vllm:num_requests_running"] == 4
    by_policy = common.registry_metrics(by_labels=("policy",), registry=registry)
    assert by_policy["vllm_adaptive_kv:head_policy_total[full]"] == 5
    assert by_policy["vllm_adaptive_kv:head_policy_total[local]"] == 1


def test_metrics_delta_counts_new_keys_from_zero():
    assert common.metrics_delta({"a": 2.0, "gone": 1.0}, {"a": 5.0, "b": 1.0}) == {"a": 3.0, "b": 1.0}


def test_token_counter_adds_no_special_tokens():
    class Tok:
        def __call__(self, text, add_special_tokens=True):
            assert add_special_tokens is False

            class Out:
                input_ids = text.split()

            return Out()

    assert common.token_counter(Tok())("a b c") == 3
