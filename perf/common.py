"""Benchmark helpers shared by every script under perf/: timing, roofline probes, result files.

Run benchmarks from the repository root as modules (``python -m perf.bench_reference``). Results go
to ``perf/results/<name>.{json,md,png}`` through :func:`write_results`, which also keeps the index in
``perf/results/README.md`` (one line per result: ``- [<name>](<name>.md): <title> (<card>, <date>)``).
"""

from __future__ import annotations

import datetime
import importlib.metadata
import json
import os
import statistics
import subprocess
from pathlib import Path
from typing import Callable

import torch

ROOT = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).resolve().parent / "results"
INDEX = RESULTS / "README.md"


def bench_ms(fn: Callable[[], object], *, warmup: int = 10, rep: int = 50, graph: bool = False,
             calls_per_graph: int = 20) -> float:
    """Median milliseconds per call of ``fn`` on the current CUDA stream, timed with CUDA events.

    ``graph=True`` captures ``calls_per_graph`` back-to-back calls of ``fn`` in one CUDA graph (after
    the warm-up), times its replays and divides by ``calls_per_graph``: this removes the host launch
    overhead and amortizes the graph launch itself (timing one short replay per event pair floors at
    about 14 us on an H200).
    """
    for _ in range(warmup):
        fn()
    calls = 1
    if graph:
        calls = calls_per_graph
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            for _ in range(calls):
                fn()
        fn = g.replay
        fn()
    torch.cuda.synchronize()
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(rep)]
    for start, end in events:
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize()
    return statistics.median(start.elapsed_time(end) for start, end in events) / calls


def interleaved_ms(fns: dict, rounds: int = 3, **bench_kw) -> dict:
    """Median of :func:`bench_ms` (``bench_kw``) for each of ``fns`` (name -> callable), timed in turn
    for ``rounds`` rounds: clock and thermal drift over a long run (on H200 the same kernel's time
    moved by up to 10%) falls on every compared callable alike, not on whichever ran later."""
    times = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            times[name].append(bench_ms(fn, **bench_kw))
    return {name: statistics.median(ts) for name, ts in times.items()}


def expert_weights(shape, dtype: torch.dtype = torch.bfloat16) -> tuple[torch.Tensor, torch.Tensor]:
    """Random expert weights of a MoEShape on the GPU: w1 [E, 2I, H], w2 [E, H, I], std 1/sqrt(fan_in)."""
    e, h, i = shape.num_experts, shape.hidden, shape.intermediate
    w1 = torch.randn(e, 2 * i, h, device="cuda", dtype=dtype) * h**-0.5
    w2 = torch.randn(e, h, i, device="cuda", dtype=dtype) * i**-0.5
    return w1, w2


def quantize_experts(w1: torch.Tensor, w2: torch.Tensor, mode: str, chunk: int = 16):
    """``cute_moe.quant.quantize_weights`` over chunks of ``chunk`` experts (bounds the float32
    temporaries: all of DeepSeek-V3's w1 at once would need tens of GB)."""
    from cute_moe import quant

    parts = [quant.quantize_weights(w1[j:j + chunk], w2[j:j + chunk], mode) for j in range(0, w1.shape[0], chunk)]
    return quant.QuantizedWeights(*(torch.cat([getattr(p, name) for p in parts])
                                    for name in ("w1_q", "w1_scale", "w2_q", "w2_scale")), mode)


def copy_bandwidth_gbs(nbytes: int = 2 << 30) -> float:
    """Device-to-device copy bandwidth in GB/s (1e9 bytes/s), counting bytes read plus written."""
    src = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms = bench_ms(lambda: dst.copy_(src), warmup=3, rep=20)
    return 2 * nbytes / (ms * 1e-3) / 1e9


def dense_mm_tflops(n: int = 8192, dtype: torch.dtype = torch.bfloat16) -> float:
    """Dense n x n x n matmul throughput in TFLOP/s on random data (the card's practical peak)."""
    a = torch.randn(n, n, device="cuda").to(dtype)
    b = torch.randn(n, n, device="cuda").to(dtype)
    c = torch.empty(n, n, device="cuda", dtype=dtype)
    ms = bench_ms(lambda: torch.mm(a, b, out=c), warmup=5, rep=20)
    return 2 * n ** 3 / (ms * 1e-3) / 1e12


def _git(*args: str) -> str | None:
    try:
        done = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def device_stamp() -> dict:
    """Where and when a result was measured: card, versions, UTC date, git commit and dirty flag.

    The commit is env CUTE_MOE_COMMIT when set (copies of the tree sent to a GPU machine, whose .git,
    if any, is not the tree's), else ``git rev-parse``; ``dirty`` is None when unknown.
    """
    commit = os.environ.get("CUTE_MOE_COMMIT") or _git("rev-parse", "--short", "HEAD")
    status = None if os.environ.get("CUTE_MOE_COMMIT") else _git("status", "--porcelain", "--untracked-files=no")
    cuda = torch.cuda.is_available()
    return {
        "card": torch.cuda.get_device_name() if cuda else "cpu",
        "capability": "sm_%d%d" % torch.cuda.get_device_capability() if cuda else None,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cutlass_dsl": _version("nvidia-cutlass-dsl"),
        "cupy": _version("cupy-cuda13x"),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "commit": commit or "unknown",
        "dirty": None if status is None else bool(status),
    }


def _cell(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "" if value is None else str(value)


def _markdown(name: str, rows: list[dict], meta: dict, stamp: dict, columns: list[str]) -> str:
    commit = stamp["commit"] + ("-dirty" if stamp["dirty"] else "")
    lines = [f"# {meta.get('title', name)}", "",
             f"{stamp['card']} · {stamp['date']} · commit {commit} · torch {stamp['torch']}", "",
             "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_cell(row.get(c)) for c in columns) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def _update_index(name: str, meta: dict, stamp: dict) -> None:
    """Insert or replace this result's line in perf/results/README.md."""
    prefix = f"- [{name}]({name}.md)"
    line = f"{prefix}: {meta.get('title', name)} ({stamp['card']}, {stamp['date'][:10]})"
    lines = INDEX.read_text().splitlines() if INDEX.exists() else ["# Benchmark results", ""]
    kept = [ln for ln in lines if not ln.startswith(prefix + ":")]
    INDEX.write_text("\n".join(kept + [line]) + "\n")


def write_results(name: str, rows: list[dict], meta: dict, *, md_columns: list[str],
                  plot: Callable | None = None) -> list[Path]:
    """Write perf/results/<name>.json (meta, stamp, rows) and <name>.md (a table of ``md_columns``
    under a line naming card, date and commit), plus <name>.png when ``plot`` is given and
    matplotlib is importable: ``plot(ax, rows)`` draws on a fresh axes. ``meta['title']`` names the
    result in the index. Returns the paths written."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    stamp = device_stamp()
    paths = [RESULTS / f"{name}.json", RESULTS / f"{name}.md"]
    paths[0].write_text(json.dumps({"meta": meta, "stamp": stamp, "rows": rows}, indent=2, default=str) + "\n")
    paths[1].write_text(_markdown(name, rows, meta, stamp, md_columns))
    if plot is not None and (png := _plot(name, rows, plot)):
        paths.append(png)
    _update_index(name, meta, stamp)
    return paths


def _plot(name: str, rows: list[dict], plot: Callable) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(7, 4.5))
    plot(ax, rows)
    fig.tight_layout()
    path = RESULTS / f"{name}.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def select_shapes(prefixes: str):
    """The reference shapes whose names start with one of the comma-separated ``prefixes``, in the order
    given (a shape named twice runs twice: e.g. to see whether a row depends on its place in the run);
    all of them if empty."""
    from cute_moe.shapes import REFERENCE_SHAPES

    wanted = [p for p in prefixes.split(",") if p]
    if not wanted:
        return list(REFERENCE_SHAPES)
    return [s for p in wanted for s in REFERENCE_SHAPES if s.name.startswith(p)]


def speedup_plot(ylabel: str, title: str, color: str = "tab:green", key: str = "speedup_vs_torch") -> Callable:
    """A ``write_results`` plot: one bar of row[key] per (shape, T) row, 1.0 marked."""

    def plot(ax, rows):
        labels = [f"{r['shape'].split('-')[0]}\nT={r['T']}" for r in rows]
        ax.bar(range(len(rows)), [r[key] for r in rows], color=color)
        ax.axhline(1.0, color="k", lw=0.8)
        ax.set_xticks(range(len(rows)), labels, fontsize=6, rotation=90)
        ax.set_ylabel(ylabel)
        ax.set_title(title)

    return plot
