"""The core must work without vLLM: no module outside the plugin glue imports it."""

from __future__ import annotations

import ast
import pathlib
import subprocess
import sys

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "vllm_adaptive_kv"
GLUE = PACKAGE / "plugin"
# Entry points that drive vLLM end to end; everything else is the core.
APPS = {"cli.py", "demo.py", "batch_demo.py", "eval.py", "bench.py", "overhead.py"}


def core_files():
    return [
        p for p in PACKAGE.rglob("*.py")
        if GLUE not in p.parents and not (p.parent == PACKAGE and p.name in APPS)
    ]


def imported_roots(path: pathlib.Path) -> set[str]:
    roots = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            roots.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            roots.add(node.module.split(".")[0])
    return roots


def test_no_core_file_imports_vllm():
    offenders = [str(p.relative_to(PACKAGE)) for p in core_files() if "vllm" in imported_roots(p)]
    assert core_files(), "no core files found"
    assert not offenders, f"core modules import vllm: {offenders}"


def test_core_imports_with_vllm_blocked():
    """Import every core module in a fresh interpreter where `import vllm` fails."""
    modules = sorted(
        "vllm_adaptive_kv." + ".".join(p.relative_to(PACKAGE).with_suffix("").parts)
        for p in core_files()
        if p.name != "__init__.py"
    )
    code = (
        "import sys, importlib\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'vllm' or name.startswith('vllm.'):\n"
        "            raise ImportError('vllm is blocked in this test')\n"
        "sys.meta_path.insert(0, Block())\n"
        f"for m in {modules!r}:\n"
        "    importlib.import_module(m)\n"
        "print('ok', len(sys.modules))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.startswith("ok")
