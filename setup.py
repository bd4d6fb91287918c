"""Build hook: the optional C++ CPU kernels (``vllm_adaptive_kv._C``, from ``csrc/``).

The project's metadata is in pyproject.toml. This file only adds the extension,
built against the torch already installed, so it needs ``pip install
--no-build-isolation`` (``scripts/setup.sh`` passes it). Without torch at build
time (an isolated build, e.g. the GPU Docker image) or without a C++ compiler, the
package installs without the extension and the CPU path falls back to torch
(``vllm_adaptive_kv/cpu_kernels/``); ``scripts/setup.sh`` checks that it built.
"""

import os
import platform
import sys

from setuptools import setup

# GCC's generic tuning keeps AVX-512 code to 256-bit vectors; the kernels' AVX-512 build
# wants the full width (the flag changes nothing on other targets).
VECTOR_WIDTH = ["-mprefer-vector-width=512"] if platform.machine() in ("x86_64", "AMD64") else []
SOURCES = ["csrc/cpu/module.cpp", "csrc/cpu/scored_decode_attention.cpp", "csrc/cpu/list_kernels_avx512.cpp",
           "csrc/cpu/list_kernels_avx2.cpp", "csrc/cpu/list_kernels_generic.cpp", "csrc/cpu/write_kv.cpp",
           "csrc/cpu/compact_slots.cpp"]
HEADERS = ["csrc/cpu/list_kernels.h", "csrc/cpu/list_kernels_body.h"]  # rebuilt on change; in the sdist


def extensions():
    if os.environ.get("VLLM_ADAPTIVE_KV_NO_EXT"):
        return {}
    try:
        from torch.utils.cpp_extension import BuildExtension, CppExtension
    except ImportError:
        print("vllm-adaptive-kv: torch is not importable at build time: building without the C++ CPU "
              "kernels (pip install --no-build-isolation builds them)", file=sys.stderr)
        return {}
    # -O3; no -march: the same build must run on AVX2-only machines (the list kernels are built once
    # per ISA, csrc/cpu/list_kernels.h). -fopenmp: at::parallel_for is a header template that runs
    # its range on the calling thread alone unless the extension itself is compiled with OpenMP (it
    # was, before: one core of two for every kernel here). Its libgomp.so.1 is the one torch has
    # already loaded (same soname), so torch.set_num_threads governs these kernels too. Ninja,
    # when installed, compiles the files in parallel.
    ext = CppExtension("vllm_adaptive_kv._C", SOURCES,
                       extra_compile_args=["-O3", "-fopenmp", "-Wno-psabi", *VECTOR_WIDTH],
                       extra_link_args=["-fopenmp"], depends=HEADERS, optional=True)
    return {"ext_modules": [ext], "cmdclass": {"build_ext": BuildExtension}}


setup(**extensions())
