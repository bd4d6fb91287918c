"""`vllm-adaptive-kv selfcheck`, run as a user runs it: the console command, a real vLLM.

On this CPU machine it must pass (vanilla = full token for token, fastgen evicts and
frees every page), name the device, vLLM's version and the attention path, and end
with the verdict line; a bad ``--model`` must fail with the reason on the last line.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

CLI = Path(sys.executable).with_name("vllm-adaptive-kv")


def selfcheck(*args, timeout):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run([str(CLI), "selfcheck", *args], capture_output=True, text=True, timeout=timeout, env=env)
    lines = [line for line in proc.stdout.splitlines() if line.strip()]
    return proc.returncode, lines, proc.stderr


@pytest.mark.engine
@pytest.mark.timeout(2400)
def test_selfcheck_passes_on_this_machine(smollm2_dir):
    code, lines, stderr = selfcheck("--model", str(smollm2_dir), timeout=2300)
    print("\n".join(lines))
    assert code == 0, f"exit {code}; last lines: {lines[-3:]}; stderr tail: {stderr[-2000:]}"
    assert lines[-1] == "selfcheck: passed"
    assert lines[0].startswith("device: cpu: ")
    assert any(line.startswith("vLLM: 0.32") for line in lines)
    assert "attention path: vllm-cpu-kernel" in lines
    # On CPU both engines run vLLM's own CPU kernel: equal everywhere, no near-tie excuse.
    assert f"full = vanilla, token for token, on 6 of 6 prompts" in lines
    kept = [line for line in lines if line.startswith("fastgen: kept fraction")]
    assert kept and float(kept[0].split()[3]) < 1.0


@pytest.mark.timeout(300)
def test_selfcheck_names_a_bad_model_on_its_last_line(tmp_path):
    code, lines, _ = selfcheck("--model", str(tmp_path / "no-such-folder"), timeout=280)
    assert code == 1
    assert lines[-1].startswith("selfcheck: FAILED: --model ") and "no-such-folder" in lines[-1]
    assert "known model" in lines[-1]


def test_full_vs_vanilla_allows_only_near_ties():
    """Kernels round differently: a divergence right after a near-tie of vanilla's two
    best tokens is named and tolerated; any other divergence fails the check."""
    from vllm_adaptive_kv.apps.selfcheck import CheckFailed, check_equal

    vanilla = {"tokens": [[1, 2, 3], [4, 5, 6]], "gaps": [[2.0, 2.0, 2.0], [2.0, 1e-5, 2.0]]}
    assert check_equal(vanilla, {"tokens": [[1, 2, 3], [4, 5, 6]]}).endswith("on 2 of 2 prompts")
    tied = check_equal(vanilla, {"tokens": [[1, 2, 3], [4, 7, 8]]})
    assert "on 1 of 2 prompts" in tied and "1 prompt(s) diverge only after a near-tie" in tied
    with pytest.raises(CheckFailed, match=r"differs from vanilla vLLM on prompts \[0\] \(at tokens \[1\]"):
        check_equal(vanilla, {"tokens": [[1, 9, 3], [4, 5, 6]]})
    with pytest.raises(CheckFailed, match="prompts \\[1\\]"):
        check_equal(vanilla, {"tokens": [[1, 2, 3], [4, 5]]})  # a shorter answer is a divergence too
