"""Peak memory and speed of every recompute policy and memory lever, eager and compiled,
against a whole-model torch.compile of the same model and HuggingFace GPT-2 of the same
shape, all in the same process.

    python3 -m benchmarks.bench            # CUDA: gpt2, gpt2-medium (12 x 1024), shakespeare_char (64 x 256)
    python3 -m benchmarks.bench --presets gpt2 --repeat 3 --only "reference,compiled none,compiled block"
    python3 -m benchmarks.bench --snapshot "compiled block +lean"   # and dump that row's CUDA memory history
    python3 -m benchmarks.bench --quick    # CPU smoke run: tiny shapes, eager, a few seconds
    python3 -m benchmarks.bench --report a/bench.json,b/bench.json  # the table and plot again, merged

Each row is a TrainConfig trained by the library's `train` (benchmarks/rows.py). --repeat N runs
every row N times, interleaved (row 1, row 2, ..., row 1, row 2, ...), and reports the median
of the N step times and their spread (min-max). Compiled graphs stay in inductor's on-disk
caches, so a repeat rebuilds a row in seconds.

The baseline is our fastest configuration without recompute or offload. HF runs
GPT2LMHeadModel eager, as its users do, with and without gradient_checkpointing_enable(). A
lean-loss row's variants, each a config field: (cce) or (liger) run the fused linear
cross-entropy of cut-cross-entropy or of Liger in place of our lean loss (--loss_kernel),
(cce filtered) the former with its default gradient filter, (whole model) compiles the whole
model instead of block by block (--compile_unit model); (no cuda graphs), for none +lean,
block +lean and the plain and block plans, launches the compiled kernels one by one instead of
replaying them as CUDA graphs (--cuda_graphs false); (N tokens a chunk), with --loss_chunks N,
runs our lean loss (and predicts it) at N tokens a chunk (--loss_chunk_tokens N).
Writes OUT_DIR/bench.json (every figure), bench.md (the table) and bench.png (peak memory
vs step time per preset, with the Pareto front).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

from neuromanifold_gpt.device import device_name
from neuromanifold_gpt.errors import BadInput, entry_point
from neuromanifold_gpt.files import write_json
from neuromanifold_gpt.planner import use_expandable_segments
from neuromanifold_gpt.provenance import run_provenance

from .reports import merge_repeats, read_reports, report
from .rows import (
    CHUNK_VARIANT,
    bench_jobs,
    machine,
    parse_chunks,
    run_row,
    transformers_version,
    write_bench_data,
)


class SnapshotCallback:
    """Records the CUDA allocator's history over the first timed step and dumps it
    (open the file at https://pytorch.org/memory_viz)."""

    def __init__(self, path: Path):
        self.path, self.done = path, False

    def on_warmup_end(self) -> None:
        torch.cuda.memory._record_memory_history(max_entries=100_000, stacks="python")

    def on_step_end(self, iter_num: int) -> None:
        if not self.done:
            torch.cuda.memory._dump_snapshot(str(self.path))
            torch.cuda.memory._record_memory_history(enabled=None)
            self.done = True


def select(args, presets, have_hf: bool) -> dict[str, list[tuple]]:
    """Each preset's rows, as --only, --exact and --loss_chunks select them; refuses a
    selection of nothing and a --snapshot of no selected row."""
    jobs = {preset: bench_jobs(preset, args.quick, have_hf, args.only, args.exact, args.loss_chunks)
            for preset in presets}
    if not any(jobs.values()):
        raise BadInput(f"--only {args.only!r} selects no row; name rows as bench.md labels them, "
                       f"e.g. {'eager none' if args.quick else 'compiled block +lean'!r}")
    if args.loss_chunks and not any(job[3] and job[3].endswith(CHUNK_VARIANT)
                                    for js in jobs.values() for job in js):
        raise BadInput("--loss_chunks adds rows of the lean plans, and --only selects none; "
                       "select one, e.g. --only " + ("'eager none +lean'" if args.quick
                                                     else "'compiled block +lean'"))
    if args.snapshot and all(args.snapshot not in (job[1] for job in js) for js in jobs.values()):
        raise BadInput(f"--snapshot {args.snapshot!r} is not a row of this run; name a row that "
                       f"--only selects, e.g. {next(iter(jobs.values()))[0][1]!r}")
    return jobs


@entry_point
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--presets", default="gpt2,gpt2-medium,shakespeare_char")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per row")
    parser.add_argument("--repeat", type=int, default=1,
                        help="run every row this many times, interleaved; report median and spread")
    parser.add_argument("--out_dir", default="out/bench")
    parser.add_argument("--quick", action="store_true", help="CPU, tiny shapes, eager rows only")
    parser.add_argument("--only", default="",
                        help="run only rows whose label contains one of these (comma-separated)")
    parser.add_argument("--exact", action="store_true", help="--only names whole labels")
    parser.add_argument("--snapshot", default="", help="dump this row's CUDA memory history")
    parser.add_argument("--report", default="", metavar="JSON[,JSON...]",
                        help="only redo the table and the plot from earlier bench.json files "
                             "(a row several hold: the median step time over all their runs, its spread, the "
                             "largest peaks)")
    parser.add_argument("--loss_chunks", default="", metavar="N[,N...]",
                        help="also our lean loss with N tokens a chunk, for every lean row --only selects")
    args = parser.parse_args(argv)
    args.loss_chunks = parse_chunks(args.loss_chunks)
    if args.loss_chunks and args.report:
        raise BadInput("--loss_chunks adds rows of the lean plans; it does not go with --report")
    if args.steps < 1 or args.repeat < 1:
        raise BadInput("--steps and --repeat must be at least 1")
    if args.exact and not args.only:
        raise BadInput("--exact matches whole labels given by --only; name the rows with --only")
    out = Path(args.out_dir)
    if args.report:
        meta, rows = read_reports(args.report)
        out.mkdir(parents=True, exist_ok=True)
        report(out, meta, rows)
        return 0
    device, shapes = machine(args.quick, args.presets)
    hf_version = transformers_version()
    have_hf = hf_version is not None
    jobs = select(args, shapes, have_hf)
    if args.snapshot and device.type != "cuda":
        raise BadInput("--snapshot records the CUDA allocator's history; run it on a GPU")
    use_expandable_segments()  # as every training run does
    # a repeat of a row, and the next row with the same blocks, load compiled code from disk
    torch._inductor.config.fx_graph_cache = True
    torch._functorch.config.enable_autograd_cache = True
    out.mkdir(parents=True, exist_ok=True)
    # the code measured, as every training run records it: commit and the package's code hash
    meta = dict(device=device_name(device), **run_provenance(device), steps=args.steps,
                repeat=args.repeat, transformers_version=hf_version)
    runs: dict[tuple[str, str], list[dict]] = {}
    with tempfile.TemporaryDirectory() as data_dir:
        for preset, shape in shapes.items():
            write_bench_data(data_dir, preset, shape)
            for rep in range(args.repeat):
                for impl, label, kw, variant in jobs[preset]:
                    snapshot = ([SnapshotCallback(out / f"snapshot_{preset}.pickle")]
                                if args.snapshot == label else [])
                    r = run_row(preset, impl, label, kw, variant, data_dir, shape, device,
                                args.steps, snapshot)
                    runs.setdefault((preset, label), []).append(r)
                    print(f"{preset:16s} {label:42s} " + (
                        "OOM" if r["oom"] else r["failed"] if "failed" in r else
                        f"peak {r['peak_allocated_gb']:7.3f} GiB, reserved "
                        f"{r['peak_reserved_gb']:7.3f}, step {r['step_ms']:8.1f} ms, predicted "
                        f"{r['predicted_gb'] or float('nan'):.3f}") +
                        f"  ({r['wall_s']:.0f} s, run {rep + 1}/{args.repeat})", flush=True)
                    # a cut-short run keeps what it measured
                    write_json(out / "bench.json", dict(meta, rows=[merge_repeats(v) for v in runs.values()]))
    report(out, meta, [merge_repeats(v) for v in runs.values()])
    return 0


if __name__ == "__main__":
    sys.exit(main())
