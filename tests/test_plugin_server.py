"""A real ``vllm serve MODEL --kv-policy fastgen`` process driven by the openai client."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from vllm_adaptive_kv.apps.common import free_port, parse_metrics
from vllm_adaptive_kv.apps.common import http_get as get

# Timeout: the server starts in ~30-40 s here, each test then takes seconds; sized for a
# machine ~10x slower.
pytestmark = [pytest.mark.engine, pytest.mark.timeout(1200)]

VLLM = str(Path(sys.executable).parent / "vllm")
START_S = 900  # ~30-40 s here
METRICS = ("vllm_adaptive_kv:kept_fraction", "vllm_adaptive_kv:evicted_tokens_total",
           "vllm_adaptive_kv:head_policy_total", "vllm_adaptive_kv:pages_free")


@pytest.fixture(scope="module")
def server(smollm2_dir, tmp_path_factory):
    port = free_port()
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    cmd = [VLLM, "serve", str(smollm2_dir), "--kv-policy", "fastgen", "--host", "127.0.0.1",
           "--port", str(port), "--dtype", "float32", "--max-model-len", "2048",
           "--kv-cache-memory-bytes", str(128 << 20), "--enforce-eager", "--served-model-name", "smollm2"]
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + START_S
        while time.time() < deadline:
            if proc.poll() is not None:
                pytest.fail(f"vllm serve exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
            try:
                get(base + "/health")
                break
            except OSError:
                time.sleep(1)
        else:
            pytest.fail(f"vllm serve did not come up in {START_S} s:\n{log.read_text()[-3000:]}")
        yield base, proc, log
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)


@pytest.fixture(scope="module")
def client(server):
    import openai

    return openai.OpenAI(base_url=server[0] + "/v1", api_key="unused")


def passkey_message():
    from vllm_adaptive_kv.apps.prompts import passkey_prompt

    return passkey_prompt(40, depth=0.5, seed=11)


def test_completions_plain_and_streaming(client):
    plain = client.completions.create(model="smollm2", prompt="The capital of France is", max_tokens=8,
                                      temperature=0)
    assert "Paris" in plain.choices[0].text
    pieces = [c.choices[0].text for c in client.completions.create(
        model="smollm2", prompt="The capital of France is", max_tokens=8, temperature=0, stream=True)]
    assert len(pieces) > 1 and "".join(pieces) == plain.choices[0].text


def test_chat_plain_and_streaming_on_a_long_prompt(client):
    p = passkey_message()
    messages = [{"role": "user", "content": p.text}]
    plain = client.chat.completions.create(model="smollm2", messages=messages, max_tokens=16, temperature=0)
    assert p.passkey in plain.choices[0].message.content
    assert plain.usage.prompt_tokens > 1000
    stream = client.chat.completions.create(model="smollm2", messages=messages, max_tokens=16,
                                            temperature=0, stream=True)
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert text == plain.choices[0].message.content


def test_per_request_policy_through_extra_body(client):
    p = passkey_message()
    reply = client.chat.completions.create(
        model="smollm2", messages=[{"role": "user", "content": p.text}], max_tokens=16, temperature=0,
        extra_body={"vllm_xargs": {"kv_policy": "full"}})
    assert p.passkey in reply.choices[0].message.content


def test_bad_per_request_value_is_a_400_and_the_server_survives(client):
    import openai

    with pytest.raises(openai.BadRequestError, match="recovery_ratio"):
        client.completions.create(model="smollm2", prompt="Hello", max_tokens=4,
                                  extra_body={"vllm_xargs": {"recovery_ratio": 7}})
    with pytest.raises(openai.BadRequestError, match="kv_policy"):
        client.completions.create(model="smollm2", prompt="Hello", max_tokens=4,
                                  extra_body={"vllm_xargs": {"kv_policy": "nope"}})
    ok = client.completions.create(model="smollm2", prompt="The capital of France is", max_tokens=4,
                                   temperature=0)
    assert ok.choices[0].text


def metric_value(text: str, name: str) -> float:
    values = parse_metrics(text)
    assert name in values, f"{name} is not on /metrics"
    return values[name]


def test_metrics_are_exposed_and_pages_come_back(server, client):
    client.chat.completions.create(model="smollm2", messages=[{"role": "user", "content": passkey_message().text}],
                                   max_tokens=4, temperature=0)
    deadline = time.time() + 30
    while True:
        text = get(server[0] + "/metrics")
        idle = metric_value(text, "vllm:num_requests_running") == 0
        if idle and metric_value(text, "vllm:kv_cache_usage_perc") == 0 or time.time() > deadline:
            break
        time.sleep(0.5)
    for name in METRICS:
        assert name in text, f"{name} missing from /metrics"
    assert metric_value(text, "vllm_adaptive_kv:kept_fraction_count") >= 5
    kept = metric_value(text, "vllm_adaptive_kv:kept_fraction_sum") / metric_value(
        text, "vllm_adaptive_kv:kept_fraction_count")
    assert 0 < kept < 1
    assert metric_value(text, "vllm_adaptive_kv:evicted_tokens_total") > 0
    assert metric_value(text, "vllm_adaptive_kv:pages_free") > 0
    assert metric_value(text, "vllm:kv_cache_usage_perc") == 0  # every block back in the pool
    assert server[1].poll() is None
