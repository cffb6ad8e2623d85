"""Static PNG plots of the memory figures, for readers without DVC's HTML plots (whose page
loads vega from a CDN): the pipeline's peak memory per step, memory within one step, peak
memory against step time, and the bench's peak memory against step time per configuration.

matplotlib's object API renders through Agg here, so no display and no global backend."""

from __future__ import annotations

import csv
import math
from pathlib import Path

from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from .files import atomic_path

COLORS = {"baseline": "tab:red", "checkpointed": "tab:blue"}


def read_trace(path: str | Path) -> dict[str, list]:
    """A TSV of train.py's (--memory_trace_file or --memory_timeline_file) as columns; a column
    of numbers as floats."""
    with open(path, newline="") as f:
        reader = csv.DictReader(f, delimiter="\t")
        rows = list(reader)
        names = reader.fieldnames or []
    return {k: _floats([r[k] for r in rows]) for k in names}


def _floats(values: list[str]) -> list:
    try:
        return [float(v) for v in values]
    except ValueError:
        return values


def save_figure(fig: Figure, path: str | Path) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100, metadata={"Software": None})  # no version stamp: same data, same bytes


def _grid(n: int, title: str) -> tuple[Figure, list]:
    cols = min(n, 3)
    rows = math.ceil(n / cols)
    fig = Figure(figsize=(4.5 * cols, 3.5 * rows), layout="constrained")
    fig.suptitle(title)
    return fig, [fig.add_subplot(rows, cols, i + 1) for i in range(n)]


def plot_memory_per_step(traces: dict[str, dict[str, dict]], path: str | Path,
                         held: str = "reserved") -> None:
    """traces[size][run] = read_trace(...): one panel per size; per run, the step's peak
    (solid) and the peak of what the process held (dashed; `held` names it: the allocator's
    reservation on CUDA, which holds CUDA graphs' memory when the allocator no longer sees
    their tensors, the resident set on the CPU)."""
    fig, axes = _grid(len(traces), f"Memory per training step (after warm-up)\n"
                                   f"peak allocated (solid), {held} (dashed)")
    for ax, (size, runs) in zip(axes, traces.items(), strict=True):
        for run, trace in runs.items():
            ax.plot(trace["step"], trace["peak_memory_gb"], marker="o", ms=5,
                    label=f"{run}: allocated", color=COLORS.get(run))
            ax.plot(trace["step"], trace["peak_reserved_gb"], marker="s", ms=4, ls="--",
                    label=f"{run}: {held}", color=COLORS.get(run), alpha=0.7)
        ax.set(title=size, xlabel="step", ylabel="peak memory (GiB)")
        measured = [(s, p) for trace in runs.values()  # the warm-up step has no peak (nan)
                    for col in ("peak_memory_gb", "peak_reserved_gb")
                    for s, p in zip(trace["step"], trace[col], strict=True) if p == p]
        steps = sorted({s for s, _ in measured})
        if measured:  # from zero, so a small difference looks small; room for the legend below
            ax.set_ylim(0, 1.45 * max(p for _, p in measured))
            # half a step either side: a single measured step is a point, not a stretched axis
            ax.set_xlim(steps[0] - 0.5, steps[-1] + 0.5)
        if len(steps) <= 10:
            ax.set_xticks(steps)
        else:
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.legend(loc="upper center", ncols=2, fontsize=7)
    save_figure(fig, path)


def plot_step_timeline(timelines: dict[str, dict[str, dict]], path: str | Path) -> None:
    """timelines[size][run] = read_trace(timeline TSV): memory allocated since the
    step began against time, through forward, backward and the optimizer step; one panel
    per size, a line per run, a dotted line where its backward begins."""
    fig, axes = _grid(max(len(timelines), 1),
                      "Memory within one training step (allocated; under CUDA graphs, "
                      "the step that captures them)")
    if not timelines:
        axes[0].text(0.5, 0.5, "no size has both runs recorded", ha="center")
    for ax, (size, runs) in zip(axes, timelines.items(), strict=True):
        for run, tl in runs.items():
            ax.plot(tl["time_ms"], tl["allocated_gb"], label=run, color=COLORS.get(run), lw=1.2)
            backward = next((t for t, p in zip(tl["time_ms"], tl["phase"], strict=True)
                             if p == "backward"), None)
            if backward is not None:
                ax.axvline(backward, color=COLORS.get(run), ls=":", lw=1)
        ax.set(title=size, xlabel="time in the step (ms)", ylabel="allocated (GiB)")
        ax.xaxis.set_major_locator(MaxNLocator(5))
        ax.legend(title="dotted: backward begins", fontsize=8, title_fontsize=8, loc="upper right")
    save_figure(fig, path)


def plot_memory_vs_step_time(points: list[dict], path: str | Path) -> None:
    """points: {size, run, policy, step_time_ms, peak_memory_gb}; one panel per size."""
    sizes = list(dict.fromkeys(p["size"] for p in points))
    fig, axes = _grid(len(sizes), "Peak memory against step time")
    for ax, size in zip(axes, sizes, strict=True):
        mine = [p for p in points if p["size"] == size]
        for p in mine:
            ax.scatter(p["step_time_ms"], p["peak_memory_gb"], color=COLORS.get(p["run"]),
                       label=f"{p['run']} ({p['policy']})", s=40)
        # from zero with headroom: points off the edges, the legend in the empty lower left
        ax.set_xlim(0, 1.2 * max(p["step_time_ms"] for p in mine))
        ax.set_ylim(0, 1.2 * max(p["peak_memory_gb"] for p in mine))
        ax.set(title=size, xlabel="median step time (ms)", ylabel="peak memory (GiB)")
        ax.xaxis.set_major_locator(MaxNLocator(4))  # long step times: few labels, not run together
        ax.legend(loc="lower left")
    save_figure(fig, path)


def pareto(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The points no other point beats in both step time and memory, by step time."""
    front, best = [], float("inf")
    for t, m in sorted(points):
        if m < best:
            front.append((t, m))
            best = m
    return front


def plot_bench(rows: list[dict], path: str | Path) -> None:
    """The bench's rows: peak memory against step time per preset, with the Pareto front."""
    presets = list(dict.fromkeys(r["preset"] for r in rows))
    fig = Figure(figsize=(6 * len(presets), 4.5), layout="constrained")
    for ax, preset in zip(fig.subplots(1, len(presets), squeeze=False)[0], presets, strict=True):
        ok = [r for r in rows if r["preset"] == preset and "step_ms" in r]
        for impl, marker, name in (("ours", "o", "NeuroManifold"), ("whole", "^", "whole-model compile"),
                                   ("hf", "s", "HuggingFace")):
            sel = [r for r in ok if r["impl"] == impl]
            ax.scatter([r["step_ms"] for r in sel], [r["peak_allocated_gb"] for r in sel],
                       marker=marker, label=name)
        front = pareto([(r["step_ms"], r["peak_allocated_gb"]) for r in ok])
        ax.plot([t for t, _ in front], [m for _, m in front], "k--", lw=1, label="Pareto front")
        for r in ok:
            if (r["step_ms"], r["peak_allocated_gb"]) in front:
                ax.annotate(r["label"], (r["step_ms"], r["peak_allocated_gb"]), fontsize=6)
        ax.set(title=preset, xlabel="step time (ms)", ylabel="peak allocated (GiB)")
        ax.legend(fontsize=7)
    save_figure(fig, path)
