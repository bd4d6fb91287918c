"""The bench's PNG (apps/bench_plot.py) from a small synthetic bench JSON: no server, no engine."""

from __future__ import annotations

import json
import struct

import pytest

from vllm_adaptive_kv.apps import bench_plot

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _samples(running, waiting, usage):
    return [{"t": 0.5 * i, "inflight": 4, "running": r, "waiting": w, "kv_usage": u}
            for i, (r, w, u) in enumerate(zip(running, waiting, usage))]


def _doc():
    return {"args": {"kv_cache_memory_bytes": 64 << 20, "dtype": "float32", "rate": None},
            "workload": {"requests": 4, "prompt_tokens": {"min": 100, "max": 120}},
            "configs": [
                {"config": "vanilla", "samples": _samples([1, 1, 1, 0], [3, 2, 1, 0], [0.9, 0.9, 0.5, 0.0])},
                {"config": "fastgen", "samples": _samples([2, 2, 0, 0], [2, 0, 0, 0], [0.6, 0.7, 0.0, 0.0])},
                {"config": "failed-before-samples", "samples": []},
            ]}


def _png_size(path):
    head = path.read_bytes()[:24]
    assert head[:8] == PNG_SIGNATURE
    return struct.unpack(">II", head[16:24])  # IHDR width, height


def test_png_beside_the_json(tmp_path):
    path = tmp_path / "run.json"
    path.write_text(json.dumps(_doc()))
    assert bench_plot.plot_beside(path) == f"picture in {tmp_path / 'run.png'}"
    width, height = _png_size(tmp_path / "run.png")
    assert (width, height) == (990, 880)  # 9 x 8 inches at 110 dpi
    assert (tmp_path / "run.png").stat().st_size > 10_000  # three panels drawn, not an empty canvas


def test_series_skips_missed_polls():
    samples = _samples([1, None, 3], [0, 0, 0], [0.5, None, 0.25])
    assert bench_plot.series(samples, "running") == ([0.0, 1.0], [1, 3])
    assert bench_plot.series(samples, "kv_usage", 100.0) == ([0.0, 1.0], [50.0, 25.0])


def test_subtitle_names_workload_and_budget():
    assert bench_plot.subtitle(_doc()) == "4 requests, prompts 100-120 tokens, all at once, KV budget 64 MiB, float32"


def test_no_samples_is_no_picture_not_a_failure(tmp_path):
    path = tmp_path / "empty.json"
    path.write_text(json.dumps({"configs": [{"config": "vanilla", "samples": []}]}))
    assert bench_plot.plot_beside(path).startswith("no picture (ValueError")
    assert not (tmp_path / "empty.png").exists()
    with pytest.raises(ValueError):
        bench_plot.plot_json(path)
