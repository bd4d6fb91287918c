"""The core must work without vLLM: nothing under core/, triton_kernels/ or cpu_kernels/ imports it.

The rule is by folder: a new module under those folders is checked without being
listed anywhere; apps and the vLLM glue live in their own folders.
"""

from __future__ import annotations

import ast
import pathlib
import subprocess
import sys

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "vllm_adaptive_kv"
PURE_FOLDERS = ("core", "triton_kernels", "cpu_kernels")


def core_files():
    return sorted(p for folder in PURE_FOLDERS for p in (PACKAGE / folder).rglob("*.py"))


def test_the_tree_shows_the_architecture():
    """core / kernels (Triton, C++ CPU) / plugin (device-neutral + cpu) / apps, each a package."""
    for folder in ("core", "triton_kernels", "cpu_kernels", "plugin", "plugin/cpu", "apps"):
        assert (PACKAGE / folder / "__init__.py").is_file(), f"{folder}/ is not a package"
    loose = sorted(p.name for p in PACKAGE.glob("*.py") if p.name not in ("__init__.py", "model.py"))
    assert not loose, f"modules outside the architecture folders: {loose}"


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
    assert any(m.endswith("core.runtime") for m in modules)
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
