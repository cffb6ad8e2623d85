"""bench.json and the pages made from it: a row's repeats merged, the ratios to the baseline,
the reference and HuggingFace, the table (bench.md) and the plot (bench.png)."""

from __future__ import annotations

import statistics
from pathlib import Path

from neuromanifold_gpt.errors import BadInput
from neuromanifold_gpt.files import atomic_path, read_json, write_json
from neuromanifold_gpt.plots import plot_bench

from .rows import REFERENCE

TIE = 0.03  # step times this close count as equally fast when choosing the baseline


def failed(r: dict) -> bool:
    """Whether a row measured nothing (out of memory, or an error)."""
    return r["oom"] or "failed" in r


def merge_repeats(runs: list[dict]) -> dict:
    """One row from its repeats: the median step time and its spread, the largest peak. An
    out-of-memory run is the row (running out is a finding); an error yields to the runs that
    measured, and is the row only when none did."""
    oom = [r for r in runs if r["oom"]]
    measured = [r for r in runs if not failed(r)]
    if oom or not measured:
        return (oom or runs)[0]
    row = dict(measured[0])
    steps = [r["step_ms"] for r in measured]
    row.update(step_ms=statistics.median(steps), step_ms_min=min(steps), step_ms_max=max(steps),
               step_ms_runs=steps, tokens_per_s=statistics.median(r["tokens_per_s"] for r in measured),
               peak_allocated_gb=max(r["peak_allocated_gb"] for r in measured),
               peak_reserved_gb=max(r["peak_reserved_gb"] for r in measured),
               wall_s=[r["wall_s"] for r in measured])
    return row


def runs_of(row: dict) -> list[dict]:
    """A merged row's runs again, one per step time it kept (each with the row's peaks, the
    largest of its runs'); a failed row is its one run."""
    if failed(row):
        return [row]
    steps = row.get("step_ms_runs", [row["step_ms"]])
    walls = row["wall_s"] if isinstance(row["wall_s"], list) else [row["wall_s"]]
    tokens_ms = row["tokens_per_s"] * row["step_ms"]  # a step's tokens, per millisecond
    return [dict(row, step_ms=ms, tokens_per_s=tokens_ms / ms, wall_s=wall)
            for ms, wall in zip(steps, walls, strict=True)]


def ours_as_run(rows: list[dict], preset: str) -> list[dict]:
    """The preset's rows of our Trainer run as train.py runs them (no variant) that measured."""
    return [r for r in rows if r["preset"] == preset and r["impl"] == "ours" and not r.get("variant")
            and not failed(r)]


def add_ratios(rows: list[dict]) -> None:
    """Ratios to our baseline and to HF. The baseline is our best configuration without
    recompute or offload: the lowest peak among those within TIE of the fastest one's step
    (closer than that is timing noise, not a speed difference)."""
    for preset in dict.fromkeys(r["preset"] for r in rows):
        ok = [r for r in rows if r["preset"] == preset and not failed(r)]
        plain = [r for r in ours_as_run(rows, preset) if r["recompute"] == "none"]
        fastest = min((r["step_ms"] for r in plain), default=None)
        ties = [r for r in plain if r["step_ms"] <= (1 + TIE) * fastest] if plain else []
        base = min(ties, key=lambda r: r["peak_allocated_gb"]) if ties else None
        hf = {r["label"]: r for r in ok if r["impl"] == "hf"}
        hf_eager, hf_gc = hf.get("HF eager"), hf.get("HF eager +gradient checkpointing")
        ref = next((r for r in ok if r["label"] == REFERENCE), None)
        for r in ok:
            r["time_vs_reference"] = r["step_ms"] / ref["step_ms"] if ref else None
            r["baseline"] = base["label"] if base else None
            r["mem_vs_baseline"] = r["peak_allocated_gb"] / base["peak_allocated_gb"] if base else None
            r["time_vs_baseline"] = r["step_ms"] / base["step_ms"] if base else None
            r["mem_vs_hf_gc"] = r["peak_allocated_gb"] / hf_gc["peak_allocated_gb"] if hf_gc else None
            r["tokens_vs_hf"] = r["tokens_per_s"] / hf_eager["tokens_per_s"] if hf_eager else None
            # the predictor models allocator memory; a CPU row measures the whole process
            allocator = r["memory_source"].startswith("torch.cuda")
            r["predictor_error"] = (r["predicted_gb"] / r["peak_allocated_gb"] - 1
                                    if r["predicted_gb"] is not None and allocator else None)


def fmt(v, spec: str) -> str:
    return "" if v is None else format(v, spec)


def table(rows: list[dict]) -> str:
    from tabulate import tabulate

    body = []
    for r in rows:
        if failed(r):
            body.append([r["preset"], r["label"], "OOM" if r["oom"] else "failed"] + [""] * 11)
            continue
        spread = (f"{r['step_ms_min']:.1f}-{r['step_ms_max']:.1f}" if "step_ms_min" in r else "")
        body.append([r["preset"], r["label"], fmt(r["peak_allocated_gb"], ".2f"),
                     fmt(r["peak_reserved_gb"], ".2f"), fmt(r["step_ms"], ".1f"), spread,
                     fmt(r["tokens_per_s"], ",.0f"), fmt(r.get("time_vs_reference"), ".2f"),
                     fmt(r.get("mem_vs_baseline"), ".2f"),
                     fmt(r.get("time_vs_baseline"), ".2f"), fmt(r.get("mem_vs_hf_gc"), ".2f"),
                     fmt(r.get("tokens_vs_hf"), ".2f"), fmt(r["predicted_gb"], ".2f"),
                     fmt(r.get("predictor_error") and 100 * r["predictor_error"], "+.1f")])
    headers = ["preset", "configuration", "peak alloc GiB", "reserved GiB", "step ms",
               "spread ms", "tokens/s", "time / ref", "mem / base", "time / base", "mem / HF gc",
               "tok/s / HF", "predicted GiB", "pred. err %"]
    return tabulate(body, headers=headers, tablefmt="github", disable_numparse=True)


def report(out: Path, meta: dict, rows: list[dict]) -> None:
    """Ratios, then bench.json, bench.md and bench.png."""
    add_ratios(rows)
    write_json(out / "bench.json", dict(meta, rows=rows))
    text = table(rows)
    with atomic_path(out / "bench.md") as tmp:
        tmp.write_text(f"{meta['device']}, torch {meta['torch_version']}\n\n{text}\n")
    plot_bench(rows, out / "bench.png")
    print(text)
    print(f"wrote {out / 'bench.json'}, {out / 'bench.md'}, {out / 'bench.png'}")


def read_reports(paths: str) -> tuple[dict, list[dict]]:
    """The rows of comma-separated bench.json files, a row that several hold merged over all
    their runs as merge_repeats merges one run's repeats, and the last file's meta, with every
    source named."""
    merged, meta = {}, {}
    for path in paths.split(","):
        data = read_json(path, required=("rows",), what="bench report",
                         writer="python3 -m benchmarks.bench, which writes it as OUT_DIR/bench.json "
                                "(--out_dir, out/bench by default)")
        differ = [k for k in ("device", "torch_version", "code_hash", "steps", "repeat")
                  if meta and data.get(k) != meta.get(k)]
        if differ:
            raise BadInput(f"{path}: its {differ[0]} ({data.get(differ[0])!r}) is not that of the "
                           f"reports before it ({meta.get(differ[0])!r}); merge reports of one "
                           "machine, torch, code and --steps/--repeat")
        for r in data.pop("rows"):
            r.setdefault("variant", r.pop("kernel", None))  # its name in older files
            merged.setdefault((r["preset"], r["label"]), []).append(r)
        meta = dict(data, sources=meta.get("sources", []) + data.get("sources", [path]))
    return meta, [rows[0] if len(rows) == 1 else merge_repeats([run for r in rows for run in runs_of(r)])
                  for rows in merged.values()]
