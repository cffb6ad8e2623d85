"""Where a bench row's step time goes: the row trained again, one warm-up step, then
--profile_steps steps under torch.profiler, summed by kind of kernel.

    python3 -m benchmarks.profile --presets gpt2 --profile "compiled block +lean"
    python3 -m benchmarks.profile --quick --profile "eager block" --profile_steps 3

Writes OUT_DIR/profile_PRESET_LABEL.md for each row named (labels as bench.md gives them;
--loss_chunks N makes the lean rows' "(N tokens a chunk)" rows nameable too).
"""

from __future__ import annotations

import argparse
import re
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity

from neuromanifold_gpt.errors import BadInput, entry_point
from neuromanifold_gpt.files import atomic_path
from neuromanifold_gpt.planner import use_expandable_segments

from .rows import bench_jobs, machine, parse_chunks, run_row, transformers_version, write_bench_data

# Where a CUDA kernel's time goes, by its name (first match wins)
KERNEL_KINDS = [
    ("cut-cross-entropy", re.compile(r"(^|_)cce_")),
    ("compiled (inductor's Triton)", re.compile(r"^triton_")),
    ("matmul (cuBLAS / CUTLASS)", re.compile(r"gemm|xmma|cutlass|nvjet|cublas", re.I)),
    ("attention (flash / SDPA)", re.compile(r"flash|fmha|attention", re.I)),
    ("optimizer (fused AdamW)", re.compile(r"adam|multi_tensor", re.I)),
    ("copies and fills", re.compile(r"memcpy|memset|copy|fill", re.I)),
    ("other eager kernels", re.compile("")),
]
# CPU-side regions: the compiled graphs' forward and backward
COMPILED_REGIONS = [("compiled forward", "Torch-Compiled Region"),
                    ("compiled backward", "CompiledFunctionBackward")]


def profile_summary(events, steps: int, wall_s: float, top: int = 15) -> str:
    """torch.profiler's key_averages over `steps` steps as text: the step, the device time by
    kind of kernel, the CPU time inside compiled regions and the top kernels (per step)."""
    per_step = lambda us: us / 1000 / steps  # noqa: E731
    # device work only: a user annotation (record_function, Optimizer.step) spans its kernels
    kernels = [e for e in events if e.device_type != DeviceType.CPU and e.self_device_time_total > 0
               and not e.is_user_annotation]
    step_ms = 1000 * wall_s / steps
    lines = [f"step: {step_ms:.2f} ms wall over {steps} profiled steps (the profiler's own "
             "overhead included)"]
    if kernels:
        busy = sum(e.self_device_time_total for e in kernels)
        lines.append(f"device busy: {per_step(busy):.2f} ms a step "
                     f"({100 * per_step(busy) / step_ms:.0f}% of the step)")
        kinds: dict[str, float] = {}
        for e in kernels:
            kind = next(k for k, pattern in KERNEL_KINDS if pattern.search(e.key))
            kinds[kind] = kinds.get(kind, 0.0) + e.self_device_time_total
        lines += ["", "| kernels | ms a step | share of device time |", "|---|---|---|"]
        lines += [f"| {k} | {per_step(t):.2f} | {100 * t / busy:.1f}% |"
                  for k, t in sorted(kinds.items(), key=lambda kv: -kv[1])]
    regions = [(name, sum(e.cpu_time_total for e in events if e.key.startswith(prefix)))
               for name, prefix in COMPILED_REGIONS]
    lines += ["", "| CPU-side region | ms a step |", "|---|---|"]
    lines += [f"| {name} | {per_step(t):.2f} |" for name, t in regions]
    timed = kernels or [e for e in events if e.self_cpu_time_total > 0]
    key = (lambda e: e.self_device_time_total) if kernels else (lambda e: e.self_cpu_time_total)
    lines += ["", f"| top {'kernels' if kernels else 'CPU ops'} | calls a step | ms a step |",
              "|---|---|---|"]
    lines += [f"| {e.key[:90].replace('|', '/')} | {e.count / steps:g} | {per_step(key(e)):.3f} |"
              for e in sorted(timed, key=key, reverse=True)[:top]]
    return "\n".join(lines) + "\n"


class ProfileCallback:
    """torch.profiler over the first `steps` steps after warm-up; writes profile_summary."""

    def __init__(self, path: Path, steps: int):
        self.path, self.steps, self.prof = path, steps, None

    def on_warmup_end(self) -> None:
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
        self.prof = torch.profiler.profile(activities=activities)
        self.prof.__enter__()
        self.done, self.t0 = 0, time.perf_counter()

    def on_step_end(self, iter_num: int) -> None:
        if self.prof is None:
            return
        self.done += 1
        if self.done == self.steps:
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            wall = time.perf_counter() - self.t0
            self.prof.__exit__(None, None, None)
            with atomic_path(self.path) as tmp:
                tmp.write_text(profile_summary(self.prof.key_averages(), self.steps, wall))
            self.prof = None


@entry_point
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--presets", default="gpt2")
    parser.add_argument("--profile", default="", metavar="LABEL[,LABEL...]",
                        help="the bench rows to profile, as bench.md labels them")
    parser.add_argument("--profile_steps", type=int, default=5)
    parser.add_argument("--out_dir", default="out/bench")
    parser.add_argument("--quick", action="store_true", help="CPU, tiny shapes, eager rows only")
    parser.add_argument("--loss_chunks", default="", metavar="N[,N...]",
                        help="the lean rows at N tokens a chunk may be named too")
    args = parser.parse_args(argv)
    labels = list(dict.fromkeys(filter(None, args.profile.split(","))))
    if not labels:
        raise BadInput("--profile names the rows to profile, as bench.md labels them, e.g. "
                       "--profile 'compiled block +lean'")
    if args.profile_steps < 1:
        raise BadInput("--profile_steps must be at least 1")
    chunks = parse_chunks(args.loss_chunks)
    device, shapes = machine(args.quick, args.presets)
    have_hf = transformers_version() is not None
    jobs = {preset: [job for job in bench_jobs(preset, args.quick, have_hf, ",".join(labels), True,
                                               chunks) if job[1] in labels]
            for preset in shapes}
    named = {job[1] for js in jobs.values() for job in js}
    unknown = [label for label in labels if label not in named]
    if unknown:
        example = bench_jobs(next(iter(shapes)), args.quick, have_hf)[0][1]
        raise BadInput(f"--profile {unknown[0]!r} is not a row of the bench; name one as bench.md "
                       f"labels it, e.g. {example!r}")
    use_expandable_segments()  # as every training run does
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as data_dir:
        for preset, shape in shapes.items():
            write_bench_data(data_dir, preset, shape)
            for impl, label, kw, variant in jobs[preset]:
                path = out / f"profile_{preset}_{re.sub(r'[^A-Za-z0-9]+', '_', label).strip('_')}.md"
                path.unlink(missing_ok=True)  # an earlier run's profile is not this one's
                r = run_row(preset, impl, label, kw, variant, data_dir, shape, device,
                            args.profile_steps, [ProfileCallback(path, args.profile_steps)])
                print(f"{preset} {label} under torch.profiler: " + (
                    "OOM" if r["oom"] else r.get("failed") or f"{path}\n{path.read_text()}"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
