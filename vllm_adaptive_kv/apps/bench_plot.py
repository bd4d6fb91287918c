"""The bench's picture: running requests, waiting requests and KV usage over time, one line per configuration.

``vllm-adaptive-kv bench --out run.json`` writes ``run.png`` beside the JSON. The
numbers are the ``/metrics`` samples the bench polls while its client has requests
in flight (``configs[i]["samples"]``: ``t`` seconds since the first request,
``running``, ``waiting``, ``kv_usage`` as a fraction). Three panels share the time
axis; vanilla is drawn black and dashed so each policy reads against it.

    python -m vllm_adaptive_kv.apps.bench_plot run.json [--out run.png]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

PANELS = (("running", "running requests", 1.0), ("waiting", "waiting requests", 1.0),
          ("kv_usage", "KV cache usage (%)", 100.0))
VANILLA = "vanilla"


def series(samples: list[dict], key: str, scale: float = 1.0) -> tuple[list[float], list[float]]:
    """(times, values) of one gauge; samples where the poll missed it are skipped."""
    points = [(s["t"], s[key] * scale) for s in samples if s.get(key) is not None and s.get("t") is not None]
    return [t for t, _ in points], [v for _, v in points]


def subtitle(doc: dict) -> str:
    """One line naming the workload and the KV budget, from the bench's own JSON."""
    args, w = doc.get("args", {}), doc.get("workload", {})
    parts = []
    if w.get("requests"):
        prompt = w.get("prompt_tokens", {})
        parts.append(f"{w['requests']} requests, prompts {prompt.get('min', '?')}-{prompt.get('max', '?')} tokens")
    if args.get("rate"):
        parts.append(f"Poisson {args['rate']}/s")
    elif w:
        parts.append("all at once")
    if args.get("kv_cache_memory_bytes"):
        parts.append(f"KV budget {args['kv_cache_memory_bytes'] / 2**20:g} MiB")
    if args.get("dtype"):
        parts.append(str(args["dtype"]))
    return ", ".join(parts)


def plot_bench(doc: dict, out: str | Path) -> Path:
    """Draw every configuration of a bench JSON document into ``out`` (PNG); returns the path."""
    import matplotlib

    matplotlib.use("Agg")  # no display: CI and servers
    import matplotlib.pyplot as plt

    configs = [c for c in doc.get("configs", []) if c.get("samples")]
    if not configs:
        raise ValueError("no configuration in the bench JSON has /metrics samples to plot")
    fig, axes = plt.subplots(len(PANELS), 1, figsize=(9, 8), sharex=True)
    for ax, (key, label, scale) in zip(axes, PANELS):
        for cfg in configs:
            name = cfg.get("config", "?")
            style = dict(color="black", linestyle="--", linewidth=1.6) if name == VANILLA else dict(linewidth=1.6)
            t, v = series(cfg["samples"], key, scale)
            ax.step(t, v, where="post", label=name, **style)
        ax.set_ylabel(label)
        ax.grid(True, alpha=0.3)
    axes[-1].set_xlabel("seconds since the first request")
    axes[0].legend(loc="upper right")
    fig.suptitle("vllm-adaptive-kv bench: vanilla vs each policy\n" + subtitle(doc), fontsize=10)
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def png_beside(json_path: str | Path) -> Path:
    return Path(json_path).with_suffix(".png")


def plot_json(json_path: str | Path, out: str | Path | None = None) -> Path:
    doc = json.loads(Path(json_path).read_text())
    return plot_bench(doc, out or png_beside(json_path))


def plot_beside(json_path: str | Path) -> str:
    """The bench's hook: draw ``json_path``'s PNG beside it; one line saying where, or why not.

    A picture that cannot be drawn (matplotlib missing, no samples) never fails the bench run.
    """
    try:
        return f"picture in {plot_json(json_path)}"
    except Exception as e:  # noqa: BLE001 - the numbers are in the JSON already
        return f"no picture ({type(e).__name__}: {e})"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m vllm_adaptive_kv.apps.bench_plot", description=__doc__.splitlines()[0])
    p.add_argument("json", help="a bench JSON (vllm-adaptive-kv bench --out)")
    p.add_argument("--out", default=None, help="PNG path (default: the JSON's path with .png)")
    args = p.parse_args(argv)
    print(plot_json(args.json, args.out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
