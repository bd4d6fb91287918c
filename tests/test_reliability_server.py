"""Reliability of a real ``vllm serve --kv-policy fastgen`` (issue 13, points 4-7).

Two servers, to keep CI short (a start costs ~30 s here, minutes on a slow CPU):

- the soak server, shared by the tests in file order: a short soak (point 4), the
  pool when idle (point 5), per-request keys over HTTP (point 6), and last SIGTERM
  under streaming load (point 7), which ends it;
- the fault server, started with ``VLLM_ADAPTIVE_KV_TEST_FAULT`` so that a magic
  per-request setting raises inside the worker, as a bug would (point 7).

Sizes: the embedded SmolLM2-135M in float32 (AVX2 machines emulate bf16 ~10x
slower), ``max_model_len`` 1024 and a 48 MiB KV budget (33 blocks of 32 tokens):
four clients with long outputs preempt. Timeouts are ~10x the times measured here
(see docs/reliability.md).
"""

from __future__ import annotations

import subprocess
import threading
import time

import httpx
import pytest

from vllm_adaptive_kv.apps.common import free_port
from vllm_adaptive_kv.apps.soak import MODEL_NAME, ServerSettings, SoakConfig, VllmServer, run_soak, server_state
from vllm_adaptive_kv.plugin.runner import TEST_FAULT_ENV

pytestmark = [pytest.mark.engine]

START_S = 900  # ~30 s here on a quiet machine
SOAK = SoakConfig(clients=4, requests=36, seed=1, max_output_tokens=96, idle_timeout_s=300)
SHUTDOWN_TIMEOUT_S = 5  # vLLM's grace period (--shutdown-timeout) on the soak server
EXIT_BOUND_S = SHUTDOWN_TIMEOUT_S + 90  # exit after SIGTERM: ~6-11 s here
# After a worker fault vLLM's worker outlives the API server until it notices its parent
# is gone: ~55 s here under load ~20 (docs/reliability.md).
ORPHAN_GRACE_S = 300
FAULT_SETTING = ("observation_window", 4242)


def start_server(smollm2_dir, tmp_path_factory, name: str, env: dict | None = None) -> VllmServer:
    settings = ServerSettings(str(smollm2_dir), free_port(), shutdown_timeout=SHUTDOWN_TIMEOUT_S, env=env or {})
    server = VllmServer(settings, tmp_path_factory.mktemp(name) / "serve.log")
    try:
        server.start(START_S)
    except RuntimeError as err:
        pytest.fail(str(err))
    return server


@pytest.fixture(scope="module")
def soak_server(smollm2_dir, tmp_path_factory):
    server = start_server(smollm2_dir, tmp_path_factory, "soak")
    yield server
    server.kill()


@pytest.fixture(scope="module")
def fault_server(smollm2_dir, tmp_path_factory):
    env = {TEST_FAULT_ENV: f"{FAULT_SETTING[0]}={FAULT_SETTING[1]}"}
    server = start_server(smollm2_dir, tmp_path_factory, "fault", env)
    yield server
    server.kill()


def completion(server: VllmServer, timeout: float = 600, **body) -> httpx.Response:
    return httpx.post(server.base + "/v1/completions", json={"model": MODEL_NAME, **body}, timeout=timeout)


def wait_for_idle_audit(server: VllmServer, audits_before: float, timeout_s: float = 300) -> dict:
    """The /metrics state once the server is idle and has reported an audit newer than ``audits_before``."""
    deadline = time.time() + timeout_s
    while True:
        state = server_state(server.base)
        if state["running"] == 0 and state["waiting"] == 0 and (state["pool_audits"] or 0) > audits_before:
            return state
        assert time.time() < deadline, f"server not idle with a new pool audit after {timeout_s} s: {state}"
        time.sleep(0.5)


# --- point 4: the soak ------------------------------------------------------------------


@pytest.mark.timeout(3000)  # ~150 s here
def test_short_soak_leaves_the_server_idle_with_every_page_free(soak_server):
    report = run_soak(soak_server.base, SOAK, soak_server.pool_pages())
    print(report.summary())
    assert report.passed, "\n".join(report.failures[:20]) + "\n" + soak_server.log_tail(2000)
    assert report.cancellations > 0 and report.invalid_rejected > 0
    assert report.preemptions > 0, "the KV budget did not force a preemption: the soak is not tight enough"
    assert report.pages_free_end == report.pool_pages


# --- point 5: true when idle --------------------------------------------------------------


@pytest.mark.timeout(1200)  # seconds here
def test_idle_server_reports_every_page_free_after_finished_and_cancelled_requests(soak_server):
    pool = soak_server.pool_pages()
    before = server_state(soak_server.base)
    assert completion(soak_server, prompt="Once upon a time " * 40, max_tokens=8).status_code == 200
    with httpx.stream("POST", soak_server.base + "/v1/completions", timeout=600,
                      json={"model": MODEL_NAME, "prompt": "Tell me a long story. " * 30, "max_tokens": 200,
                            "ignore_eos": True, "stream": True}) as stream:
        for i, _ in enumerate(stream.iter_lines()):
            if i >= 4:
                break  # closing the stream drops the connection: vLLM aborts the request
    state = wait_for_idle_audit(soak_server, before["pool_audits"] or 0)
    # No other request arrives: the idle engine's own last step reported the pool.
    deadline = time.time() + 30
    while state["pages_free"] != pool and time.time() < deadline:
        time.sleep(0.5)
        state = server_state(soak_server.base)
    assert state["pages_free"] == pool, f"idle server shows {state['pages_free']} of {pool} head pages free"
    assert state["pool_audit_failures"] == 0
    assert state["kv_usage"] == 0


# --- point 6: per-request settings over HTTP -----------------------------------------------


@pytest.mark.timeout(1200)
def test_misspelled_key_next_to_a_policy_is_a_400_naming_it_and_the_allowed_keys(soak_server):
    reply = completion(soak_server, prompt="Hello", max_tokens=2,
                       vllm_xargs={"kv_policy": "fastgen", "recovery_ration": 0.9})
    assert reply.status_code == 400
    message = reply.json()["error"]["message"]
    assert "unknown key 'recovery_ration' (did you mean 'recovery_ratio'?)" in message
    assert "allowed keys for kv_policy='fastgen' are kv_policy, recovery_ratio" in message


@pytest.mark.timeout(1200)
def test_keys_of_other_extensions_pass_through(soak_server):
    for xargs in ({"kv_policy": "fastgen", "recovery_ratio": 0.9, "other_extension_knob": 3},
                  {"other_extension_knob": "on"}):
        reply = completion(soak_server, prompt="The capital of France is", max_tokens=4, temperature=0,
                           vllm_xargs=xargs)
        assert reply.status_code == 200, reply.text


# --- point 7: SIGTERM under load (ends the soak server) -------------------------------------


def stream_in_background(server: VllmServer, index: int, ended: dict) -> threading.Thread:
    """A long streaming completion; ``ended[index]`` says how it ended (the server must end it)."""

    def run() -> None:
        try:
            with httpx.stream("POST", server.base + "/v1/completions", timeout=EXIT_BOUND_S * 2,
                              json={"model": MODEL_NAME, "prompt": f"Story {index}: once upon a time",
                                    "max_tokens": 400, "ignore_eos": True, "stream": True}) as stream:
                for _ in stream.iter_lines():
                    pass
            ended[index] = f"closed by the server ({stream.status_code})"
        except httpx.TimeoutException:
            ended[index] = "hung: no end from the server"
        except httpx.HTTPError as err:
            ended[index] = f"closed by the server ({type(err).__name__})"

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def wait_streaming(server: VllmServer, count: int, timeout_s: float = 600) -> None:
    deadline = time.time() + timeout_s
    while (server_state(server.base)["running"] or 0) < count:
        assert time.time() < deadline, f"{count} streams did not start in {timeout_s} s"
        time.sleep(0.5)


def assert_no_orphans(server: VllmServer, grace_s: float = ORPHAN_GRACE_S) -> None:
    """Every process of the server's group ends within ``grace_s`` (none is left for good)."""
    start = time.time()
    while server.group_members() and time.time() < start + grace_s:
        time.sleep(0.5)
    assert not server.group_members(), f"processes left behind {grace_s} s after exit: {server.group_members()}"
    print(f"every process of the server gone {time.time() - start:.1f} s after it exited")


@pytest.mark.timeout(1200)  # ~15 s here
def test_sigterm_under_streaming_load_exits_cleanly_within_the_grace_period(soak_server):
    ended: dict[int, str] = {}
    threads = [stream_in_background(soak_server, i, ended) for i in range(3)]
    wait_streaming(soak_server, 3)
    start = time.time()
    code = soak_server.terminate(timeout_s=EXIT_BOUND_S)
    took = time.time() - start
    assert code is not None, f"vllm serve still running {EXIT_BOUND_S} s after SIGTERM:\n{soak_server.log_tail()}"
    assert code == 0, f"vllm serve exited with {code} after SIGTERM:\n{soak_server.log_tail()}"
    print(f"exit {code} {took:.1f} s after SIGTERM")
    for thread in threads:
        thread.join(EXIT_BOUND_S)
    assert all(ended.get(i, "").startswith("closed") for i in range(3)), ended
    assert_no_orphans(soak_server)


# --- point 7: a policy failure inside the worker ---------------------------------------------


@pytest.mark.timeout(1200)  # ~20 s here
def test_a_policy_failure_in_the_worker_fails_the_engine_with_a_clear_message(fault_server):
    ended: dict[int, str] = {}
    threads = [stream_in_background(fault_server, i, ended) for i in range(2)]
    wait_streaming(fault_server, 2)
    start = time.time()
    reply = completion(fault_server, timeout=EXIT_BOUND_S, prompt="Hello", max_tokens=4,
                       vllm_xargs={FAULT_SETTING[0]: FAULT_SETTING[1]})
    assert reply.status_code >= 500, reply.text  # the frontend accepted it: a worker bug
    try:  # vLLM's API server shuts itself down once its engine is dead
        code = fault_server.proc.wait(EXIT_BOUND_S)
    except subprocess.TimeoutExpired:
        pytest.fail(f"the server still runs {EXIT_BOUND_S} s after its worker failed:\n{fault_server.log_tail()}")
    print(f"faulty request answered {reply.status_code}; server exited with {code} "
          f"{time.time() - start:.1f} s after it was sent")
    log = fault_server.log_path.read_text(errors="replace")
    assert "RequestPolicyError: vllm-adaptive-kv: the kv policy settings of request" in log
    assert f"injected test fault ({TEST_FAULT_ENV}={FAULT_SETTING[0]}={FAULT_SETTING[1]})" in log
    for thread in threads:
        thread.join(EXIT_BOUND_S)
    assert all(ended.get(i, "").startswith("closed") for i in range(2)), ended
    assert_no_orphans(fault_server)
