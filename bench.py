"""Peak memory and speed of every recompute policy and memory lever, eager and compiled,
against a whole-model torch.compile of the same model and HuggingFace GPT-2 of the same
shape, all in the same process.

    python3 bench.py                      # CUDA: gpt2, gpt2-medium (12 x 1024), shakespeare_char (64 x 256)
    python3 bench.py --presets gpt2 --repeat 3 --only "reference,compiled none,compiled block +lean"
    python3 bench.py --snapshot "compiled block +lean"   # also dump that row's CUDA memory history
    python3 bench.py --presets gpt2 --only "compiled block +lean" --profile "compiled block +lean"
    python3 bench.py --quick              # CPU smoke run: tiny shapes, eager, a few seconds
    python3 bench.py --plans batch,budget --against out/bench/bench.json --out_dir out/plans
    python3 bench.py --loss_kernels --repeat 3  # the lean loss against fused kernels, alone

Each row trains on random tokens (memory and speed do not depend on the data) through the
same Trainer as train.py: one warm-up step (compile, optimizer state), then --steps timed
steps; peak memory is the allocator's peak over the timed steps, step time their median.
--repeat N runs every row N times, interleaved (row 1, row 2, ..., row 1, row 2, ...), and
reports the median of the N step times and their spread (min-max). Compiled graphs stay in
inductor's on-disk caches, so a repeat rebuilds a row in seconds.

The reference is a whole-model torch.compile of our model with the plain F.cross_entropy and
no checkpointing, trained by a plain loop; the baseline is our fastest configuration without
recompute or offload. HF runs GPT2LMHeadModel eager, as its users do, with and without
gradient_checkpointing_enable(). A lean-loss row's variants: (cce) or (liger) run the fused
linear cross-entropy of cut-cross-entropy or of Liger in place of our lean loss, (cce filtered)
the former with its default gradient filter, (whole model) compiles the whole model instead of
block by block (replayed as CUDA graphs on either side of the eager loss); (no cuda graphs), for
none +lean, block +lean and the plain and block plans, launches the compiled kernels one by one
instead of replaying them as CUDA graphs; (N tokens a chunk), with --loss_chunks N, runs our lean
loss (and predicts it) at N tokens a chunk.
--profile LABEL runs that row again after the bench, under torch.profiler for --profile_steps
steps, and writes where its step's time goes by kind of kernel (OUT_DIR/profile_PRESET_LABEL.md).
Writes OUT_DIR/bench.json (every figure), bench.md (the table) and bench.png (peak memory
vs step time per preset, with the Pareto front).

--plans checks the planner's promises instead, each run a fresh train.py process on random
tokens: `batch` trains each of --batch_presets a few steps at --batch_size auto under each of
--batch_plans (by default none, block and block +lean: did it run, how far is the measured peak
from the predicted one?); `budget`
trains each of --budget_presets with --memory_budget_gb for each of --budgets (is the measured
peak within the budget, and how does the step compare with the fastest row of the bench.json
given by --against that fits?). Writes OUT_DIR/plans.json and plans.md.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import gc
import json
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from unittest import mock

import numpy as np
import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity

from neuromanifold_gpt import build_model, distributed, predictor
from neuromanifold_gpt import loss as lean_loss
from neuromanifold_gpt.config.base import PRESETS, TrainConfig
from neuromanifold_gpt.data import write_dataset
from neuromanifold_gpt.device import device_name
from neuromanifold_gpt.errors import BadInput, TrainingOOM, entry_point
from neuromanifold_gpt.files import atomic_path, read_json, write_json
from neuromanifold_gpt.loss import (
    IGNORE_INDEX,
    LinearCrossEntropyLoss,
    compute_dtype,
    linear_cross_entropy,
)
from neuromanifold_gpt.memory import MemoryMonitorCallback, measure
from neuromanifold_gpt.optim import make_optimizer
from neuromanifold_gpt.params import _arg
from neuromanifold_gpt.planner import COSTS_FILE, PLANS, use_expandable_segments
from neuromanifold_gpt.plots import plot_bench
from neuromanifold_gpt.trainer import Trainer, train

VOCAB = {"shakespeare_char": 65, "gpt2": 50257, "gpt2-medium": 50257}
TIE = 0.03  # step times this close count as equally fast when choosing the baseline
REFERENCE = "reference"  # whole-model compile, plain loss, no checkpointing


@functools.cache  # a row's loss calls it every step: import and look up once
def _library(module: str, package: str):
    try:
        return __import__(module, fromlist=["_"])
    except ImportError:
        raise BadInput(f"this row needs {package}: pip install -e '.[compare]' (Linux with "
                         "a CUDA torch)") from None


def _cce(filter_eps):
    """cut-cross-entropy's fused kernel; filter_eps None computes every block of the gradient,
    "high" is its default: it skips the blocks whose |softmax - one-hot| all lie below 2.4e-4."""
    def fn(x, weight, targets):
        cce = _library("cut_cross_entropy", "cut-cross-entropy")
        dtype = compute_dtype(x)
        return cce.linear_cross_entropy(x.reshape(-1, x.size(-1)).to(dtype), weight.to(dtype),
                                        targets.reshape(-1), ignore_index=IGNORE_INDEX,
                                        impl="cce", filter_eps=filter_eps)
    return fn


def _liger(x, weight, targets):
    liger = _library("liger_kernel.transformers", "liger-kernel")
    return liger.LigerFusedLinearCrossEntropyLoss()(weight, x.reshape(-1, x.size(-1)),
                                                    targets.reshape(-1))


# Fused linear cross-entropy kernels of maintained libraries, measured against our lean loss
LOSS_KERNELS = {"cce": _cce(None), "cce filtered": _cce("high"), "liger": _liger}


def _loss_kernel(name: str):
    return mock.patch.object(LinearCrossEntropyLoss, "forward", torch.compiler.disable(
        lambda self, x, weight, targets: LOSS_KERNELS[name](x, weight, targets)))


# A row's variant: what runs differently from the default while the row trains. The loss
# kernels are not what the predictor models; the compile units keep its prediction.
VARIANTS = {
    **{name: functools.partial(_loss_kernel, name) for name in LOSS_KERNELS},
    # a lean plan's whole model compiled, not block by block (distributed.compiles_per_block),
    # replayed as CUDA graphs on either side of the eager loss where the blocks would be
    "whole model": lambda: mock.patch.object(distributed, "compiles_per_block", lambda config: False),
    # the compiled code's kernels launched one by one instead of replayed as CUDA graphs
    "no cuda graphs": lambda: mock.patch.object(distributed, "cuda_graphs", lambda *args: False),
}


CHUNK_VARIANT = " tokens a chunk"  # "512 tokens a chunk": the lean loss at that chunk size


@contextlib.contextmanager
def _chunk_tokens(tokens: int):
    """Our lean loss, and its prediction, at `tokens` a chunk instead of CHUNK_BYTES's."""
    fixed = lambda n_tokens, vocab_size, chunk_bytes=None: min(tokens, n_tokens)  # noqa: E731
    with mock.patch.object(lean_loss, "chunk_tokens", fixed), \
            mock.patch.object(predictor, "chunk_tokens", fixed):
        yield


def variant_context(variant: str | None):
    if variant is None:
        return contextlib.nullcontext()
    if variant.endswith(CHUNK_VARIANT):
        return _chunk_tokens(int(variant.removesuffix(CHUNK_VARIANT)))
    return VARIANTS[variant]()


def row_settings(fields: dict, compile: bool) -> dict:
    # optimizer_in_backward steps before a global norm exists: such rows train unclipped
    clip = dict(grad_clip=0.0) if fields.get("optimizer_in_backward") else {}
    return dict(fields, compile=compile, **clip)


def our_rows(quick: bool) -> list[tuple[str, dict, str | None]]:
    """(label, TrainConfig overrides, variant): every plan the planner weighs, eager and
    compiled; the lean plans, which compile block by block, also with the whole model compiled
    (but for the plans that offload or step in backward; none +lean and block +lean under every
    variant), and the plain and block plans without CUDA graphs."""
    eager = [(f"eager {label}", row_settings(kw, False), None) for label, kw in PLANS
             if "activation_memory_budget" not in kw]
    if quick:
        return eager
    compiled = []
    for label, kw in PLANS:
        compiled.append((f"compiled {label}", row_settings(kw, True), None))
        if label in ("none +lean", "block +lean"):
            variants = [*LOSS_KERNELS, "whole model", "no cuda graphs"]
        elif kw["lean_loss"] and not ({"offload_activations", "optimizer_in_backward"} & set(kw)):
            variants = ["whole model"]
        elif label in ("none", "block"):  # the whole model, compiled to CUDA graphs or not
            variants = ["no cuda graphs"]
        else:
            variants = []
        compiled += [(f"compiled {label} ({variant})", row_settings(kw, True), variant)
                     for variant in variants]
    return eager + compiled


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


def release() -> None:
    """Free everything the previous row left, so rows do not see each other's memory."""
    gc.collect()
    torch._dynamo.reset()  # compiled graphs hold their constants and workspaces
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


def bench_config(preset: str, data_dir: str, steps: int, shape, overrides: dict) -> TrainConfig:
    B, T = shape
    model_kw = dict(n_layer=2, n_head=2, n_embd=64) if preset == "tiny" else {}
    return TrainConfig.from_flags(preset="shakespeare_char" if preset == "tiny" else preset,
                                  dataset=f"bench_{preset}", data_dir=data_dir, batch_size=B,
                                  block_size=T, max_iters=steps + 1, eval_interval=10**6,
                                  eval_iters=1, log_interval=10**6, warmup_iters=0, decay_lr=False,
                                  **model_kw, **overrides)


def run_ours(preset: str, overrides: dict, variant: str | None, data_dir: str, steps: int, shape,
             callbacks: list) -> dict:
    cfg = bench_config(preset, data_dir, steps, shape, overrides)
    # no evaluation at the end: it measures nothing here, and compiling the model's inference
    # graph would cost a whole-model compile per row (0.0 passes the trainer's finiteness check;
    # no row reports a loss)
    no_eval = mock.patch.object(Trainer, "estimate_loss", lambda self: dict(train=0.0, val=0.0))
    try:
        with variant_context(variant), no_eval:
            m = train(cfg, callbacks=callbacks, quiet=True)
    except TrainingOOM as e:
        return dict(oom=True, error=str(e))
    return dict(oom=False, peak_allocated_gb=m["peak_memory_gb"],
                peak_reserved_gb=m["peak_reserved_gb"], step_ms=m["step_time_ms"],
                tokens_per_s=m["tokens_per_sec"],
                predicted_gb=None if variant in LOSS_KERNELS else m["predicted_peak_gb"],
                memory_source=m["peak_memory_source"], compile=m["compile"])


def timed_steps(step, steps: int, tokens: int, device: torch.device, callbacks: list) -> dict:
    """One warm-up step, then `steps` timed ones: median step time and the peaks over them.
    The callbacks are called as the Trainer calls them."""
    monitor = MemoryMonitorCallback(device)  # the Trainer's peak over the steps after warm-up
    times = []
    try:
        for i in range(steps + 1):
            t0 = time.perf_counter()
            step()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            if i:  # the first step is warm-up, as in the Trainer
                times.append(time.perf_counter() - t0)
            for cb in [monitor, *callbacks]:
                (cb.on_step_end(i) if i else cb.on_warmup_end())
    except torch.cuda.OutOfMemoryError as e:
        return dict(oom=True, error=str(e).splitlines()[0])
    median = statistics.median(times)
    return dict(oom=False, peak_allocated_gb=monitor.peak_gb, peak_reserved_gb=monitor.peak_reserved_gb,
                step_ms=median * 1000, tokens_per_s=tokens / median, predicted_gb=None,
                memory_source=monitor.source)


def plain_step(loss_of, model, optimizer, vocab: int, shape, device: torch.device, clip: float):
    """One step of a plain loop on random tokens: bf16 autocast on CUDA, clipping, AdamW."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32

    def step():
        x = torch.randint(0, vocab, shape, device=device)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            loss = loss_of(x)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def run_whole(preset: str, overrides: dict, data_dir: str, steps: int, shape,
              device: torch.device, callbacks: list) -> dict:
    """Our model under one torch.compile of the whole model, trained by a plain loop: bf16
    autocast, fused AdamW, clipping, as the Trainer does."""
    cfg = bench_config(preset, data_dir, steps, shape, dict(overrides, compile=True))
    B, T = shape
    vocab = VOCAB.get(preset, 65)
    model = build_model(cfg.model_config(vocab, T)).to(device)
    model.compile()
    optimizer = make_optimizer(model, cfg, device)
    step = plain_step(lambda x: model(x, x)[1], model, optimizer, vocab, shape, device, cfg.grad_clip)
    return dict(timed_steps(step, steps, B * T, device, callbacks), compile=True)


def run_hf(preset: str, checkpointing: bool, steps: int, shape, device: torch.device,
           callbacks: list) -> dict:
    """HuggingFace GPT2LMHeadModel of the preset's shape, trained as its users do: eager,
    bf16 autocast, fused AdamW, loss from labels=input_ids."""
    from transformers import GPT2Config, GPT2LMHeadModel

    B, T = shape
    p = PRESETS[preset]
    config = GPT2Config(vocab_size=VOCAB[preset], n_positions=T, n_embd=p["n_embd"],
                        n_layer=p["n_layer"], n_head=p["n_head"], resid_pdrop=p["dropout"],
                        embd_pdrop=p["dropout"], attn_pdrop=p["dropout"])
    model = GPT2LMHeadModel(config).to(device)
    if checkpointing:
        model.gradient_checkpointing_enable()
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1,
                                  fused=device.type == "cuda")
    step = plain_step(lambda x: model(input_ids=x, labels=x).loss, model, optimizer, VOCAB[preset],
                      shape, device, 1.0)
    return dict(timed_steps(step, steps, B * T, device, callbacks), compile=False)


def merge_repeats(runs: list[dict]) -> dict:
    """One row from its repeats: the median step time and its spread, the largest peak."""
    ok = [r for r in runs if not r["oom"] and "failed" not in r]
    if len(ok) < len(runs):
        return next(r for r in runs if r["oom"] or "failed" in r)
    row = dict(ok[0])
    steps = [r["step_ms"] for r in ok]
    row.update(step_ms=statistics.median(steps), step_ms_min=min(steps), step_ms_max=max(steps),
               step_ms_runs=steps, tokens_per_s=statistics.median(r["tokens_per_s"] for r in ok),
               peak_allocated_gb=max(r["peak_allocated_gb"] for r in ok),
               peak_reserved_gb=max(r["peak_reserved_gb"] for r in ok),
               wall_s=[r["wall_s"] for r in ok])
    return row


def ours_as_run(rows: list[dict], preset: str) -> list[dict]:
    """The preset's rows of our Trainer run as train.py runs them (no variant) that measured."""
    return [r for r in rows if r["preset"] == preset and r["impl"] == "ours" and not r.get("variant")
            and not r["oom"] and "failed" not in r]


def add_ratios(rows: list[dict]) -> None:
    """Ratios to our baseline and to HF. The baseline is our best configuration without
    recompute or offload: the lowest peak among those within TIE of the fastest one's step
    (closer than that is timing noise, not a speed difference)."""
    for preset in dict.fromkeys(r["preset"] for r in rows):
        ok = [r for r in rows if r["preset"] == preset and not r["oom"] and "failed" not in r]
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


def recompute_kind(overrides: dict) -> str:
    """What a row does to activations: none, or the policy / lever that trades them."""
    kinds = [overrides["checkpoint_policy"]] if overrides.get("gradient_checkpointing") else []
    if overrides.get("activation_memory_budget", 1.0) < 1.0:
        kinds.append("budget")
    if overrides.get("offload_activations"):
        kinds.append("offload")
    return "+".join(kinds) or "none"


def fmt(v, spec: str) -> str:
    return "" if v is None else format(v, spec)


def table(rows: list[dict]) -> str:
    from tabulate import tabulate

    body = []
    for r in rows:
        if r["oom"] or "failed" in r:
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


def loss_kernel_bench(args) -> int:
    """--loss_kernels: the head and cross-entropy alone at GPT-2's vocabulary, bf16 autocast,
    the head padded to 50304 rows as the model's is (a multiple of 64: aligned rows for cuBLAS):
    each kernel's forward + backward time (median of --repeat interleaved rounds of --steps) and
    peak above its inputs, then its loss and gradients against fp64, with a random head and with
    one whose rows share a direction, as a trained head's do."""
    import torch.nn.functional as F
    from tabulate import tabulate

    quick = args.quick
    if not quick and not torch.cuda.is_available():
        raise BadInput("--loss_kernels measures CUDA kernels; use --quick on a CPU")
    device = torch.device("cpu" if quick else "cuda")
    n, widths, n_check = (512, (64,), 256) if quick else (12288, (768, 1024), 4096)
    head, vocab = (1000, 1000) if quick else (50304, 50257)  # head rows; targets below vocab
    plain = (lambda x, w, t: F.cross_entropy(x @ w.t(), t))
    kernels = {"plain": plain if quick else torch.compile(plain), "ours": linear_cross_entropy}
    for c in args.loss_chunks:  # the chunk's size against its count (our default: CHUNK_BYTES)
        kernels[f"ours, {c} tokens a chunk"] = functools.partial(linear_cross_entropy, chunk=c)
    kernels.update({} if quick else LOSS_KERNELS)  # the libraries' Triton kernels need CUDA
    gen = torch.Generator(device=device)

    def inputs(n_tokens, width, shared):
        gen.manual_seed(0)
        x = torch.randn(n_tokens, width, device=device, generator=gen).requires_grad_()
        common = 0.02 * torch.randn(width, device=device, generator=gen) if shared else 0.0
        w = (0.02 * torch.randn(head, width, device=device, generator=gen) + common).requires_grad_()
        t = torch.randint(0, vocab, (n_tokens,), device=device, generator=gen)
        t[::9] = IGNORE_INDEX  # counted in neither
        return x, w, t

    def step(fn, x, w, t):
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = fn(x, w, t)
        loss.backward()
        result = loss.detach(), x.grad, w.grad
        x.grad = w.grad = None
        return result

    rows = []
    for width in widths:
        x, w, t = inputs(n, width, False)
        peaks, times = {}, {name: [] for name in kernels}
        for name, fn in kernels.items():
            step(fn, x, w, t)  # compiles
            peaks[name] = None
            if device.type == "cuda":
                torch.cuda.synchronize()
                base = torch.cuda.memory_allocated()
                torch.cuda.reset_peak_memory_stats()
                step(fn, x, w, t)
                peaks[name] = (torch.cuda.max_memory_allocated() - base) / 2**30
        for _ in range(args.repeat):
            for name, fn in kernels.items():
                if device.type == "cuda":
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
                for _ in range(args.steps):
                    step(fn, x, w, t)
                if device.type == "cuda":
                    torch.cuda.synchronize()
                times[name].append((time.perf_counter() - t0) / args.steps * 1000)
        rows += [dict(kind="speed", tokens=n, width=width, head=head, kernel=name,
                      ms=statistics.median(times[name]), ms_min=min(times[name]),
                      ms_max=max(times[name]), peak_gb=peaks[name]) for name in kernels]
    rel = lambda a, b: float((a.double() - b.double()).norm() / b.double().norm())  # noqa: E731
    for shared in (False, True):
        x, w, t = inputs(n_check, widths[0], shared)
        exact = step(lambda x, w, t: F.cross_entropy(x.double() @ w.double().t(), t), x, w, t)
        for name, fn in kernels.items():
            loss, gx, gw = step(fn, x, w, t)
            rows.append(dict(kind="accuracy", head="shared direction" if shared else "random",
                             kernel=name, loss_error=abs(float(loss) - float(exact[0])),
                             grad_x_error=rel(gx, exact[1]), grad_w_error=rel(gw, exact[2])))
    speed = tabulate([[r["width"], r["kernel"], f"{r['ms']:.2f}", f"{r['ms_min']:.2f}-{r['ms_max']:.2f}",
                       fmt(r["peak_gb"], ".3f")] for r in rows if r["kind"] == "speed"],
                     headers=[f"width ({n} tokens, {head} x width head)", "kernel", "fwd+bwd ms", "spread ms",
                              "peak GiB above inputs"], tablefmt="github", disable_numparse=True)
    accuracy = tabulate([[r["head"], r["kernel"], f"{r['loss_error']:.1e}", f"{r['grad_x_error']:.4f}",
                          f"{r['grad_w_error']:.4f}"] for r in rows if r["kind"] == "accuracy"],
                        headers=[f"head ({n_check} x {widths[0]} x {head})", "kernel",
                                 "loss error", "grad_x rel. error", "grad_w rel. error"],
                        tablefmt="github", disable_numparse=True)
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "loss_kernels.json", dict(device=device_name(device),
                                               torch_version=torch.__version__, rows=rows))
    text = f"{speed}\n\nagainst fp64:\n\n{accuracy}\n"
    with atomic_path(out / "loss_kernels.md") as tmp:
        tmp.write_text(text)
    print(text + f"wrote {out / 'loss_kernels.json'}, {out / 'loss_kernels.md'}")
    return 0


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
    parser.add_argument("--profile", default="", metavar="LABEL[,LABEL...]",
                        help="after the bench, run these rows again under torch.profiler and "
                             "write where their step's time goes (OUT_DIR/profile_*.md)")
    parser.add_argument("--profile_steps", type=int, default=5)
    parser.add_argument("--report", default="", metavar="JSON[,JSON...]",
                        help="only redo the table and the plot from earlier bench.json files "
                             "(a row of a later file replaces the same row of an earlier one)")
    parser.add_argument("--write_costs", default="", metavar="PRESET",
                        help="with --report: write the planner's step costs "
                             f"({COSTS_FILE.name}) from this preset's compiled rows")
    parser.add_argument("--loss_kernels", action="store_true",
                        help="time the lean loss against the libraries' fused kernels alone, "
                             "and check each one's loss and gradients against fp64")
    parser.add_argument("--loss_chunks", default="", metavar="N[,N...]",
                        help="also our lean loss with N tokens a chunk: alone with "
                             "--loss_kernels, else every lean row --only selects")
    parser.add_argument("--plans", default="", metavar="batch,budget",
                        help="check the planner instead: these tables (see above)")
    parser.add_argument("--batch_presets", default="shakespeare_char,gpt2,gpt2-medium")
    parser.add_argument("--batch_plans", default=",".join(PLAN_POLICIES), metavar="PLAN[,PLAN...]",
                        help="with --plans batch: the plans each preset runs at its recommended batch")
    parser.add_argument("--budget_presets", default="gpt2,gpt2-medium")
    parser.add_argument("--budgets", default="3,6,10,20", help="GiB, comma-separated")
    parser.add_argument("--against", default="", metavar="JSON[,JSON...]",
                        help="with --plans: the bench.json files to compare the budget plans with")
    args = parser.parse_args(argv)
    try:
        args.loss_chunks = list(dict.fromkeys(int(c) for c in filter(None, args.loss_chunks.split(","))))
    except ValueError:
        raise BadInput(f"--loss_chunks {args.loss_chunks!r}: expected token counts, "
                         "comma-separated") from None
    if any(c < 1 for c in args.loss_chunks):
        raise BadInput("--loss_chunks takes token counts of at least 1")
    if args.loss_chunks and (args.plans or args.report):
        raise BadInput("--loss_chunks adds rows of the losses or of the lean plans; it does "
                         "not go with --plans or --report")
    if args.steps < 1 or args.repeat < 1 or args.profile_steps < 1:
        raise BadInput("--steps, --repeat and --profile_steps must be at least 1")
    if args.loss_kernels and (args.plans or args.report or args.profile or args.snapshot or args.only):
        raise BadInput("--loss_kernels times the losses alone; it does not go with --plans, "
                         "--report, --profile, --snapshot or --only")
    if args.profile and (args.plans or args.report):
        raise BadInput("--profile runs bench rows; it does not go with --plans or --report")
    if args.exact and not args.only:
        raise BadInput("--exact matches whole labels given by --only; name the rows with --only")
    if args.plans:
        return check_plans(args)
    if args.loss_kernels:
        return loss_kernel_bench(args)
    if args.report:
        meta, rows = read_reports(args.report)
        Path(args.out_dir).mkdir(parents=True, exist_ok=True)
        report(Path(args.out_dir), meta, rows)
        if args.write_costs:
            write_json(COSTS_FILE, plan_costs(meta, rows, args.write_costs))
            print(f"wrote {COSTS_FILE}")
        return 0
    if args.quick:
        device, presets, shapes = torch.device("cpu"), ["tiny"], {"tiny": (2, 32)}
    else:
        if not torch.cuda.is_available():
            raise BadInput("the full bench needs CUDA; use --quick on a CPU")
        device = torch.device("cuda")
        presets = args.presets.split(",")
        unknown = [p for p in presets if p not in VOCAB]
        if unknown:
            raise BadInput(f"unknown preset {unknown[0]!r}; choose from {', '.join(VOCAB)}")
        shapes = {p: PRESETS[p]["cuda"] for p in presets}
    use_expandable_segments()  # as every training run does
    # a repeat of a row, and the next row with the same blocks, load compiled code from disk
    torch._inductor.config.fx_graph_cache = True
    torch._functorch.config.enable_autograd_cache = True
    try:
        import transformers  # noqa: F401
        have_hf = True
    except ImportError:
        have_hf = False
    jobs = {preset: bench_jobs(preset, args, have_hf) for preset in presets}
    if not any(jobs.values()):
        raise BadInput(f"--only {args.only!r} selects no row; name rows as bench.md labels them, "
                         f"e.g. {'eager none' if args.quick else 'compiled block +lean'!r}")
    if args.loss_chunks and not any(job[3] and job[3].endswith(CHUNK_VARIANT)
                                    for js in jobs.values() for job in js):
        raise BadInput("--loss_chunks adds rows of the lean plans, and --only selects none; "
                         "select one, e.g. --only " + ("'eager none +lean'" if args.quick
                                                       else "'compiled block +lean'"))
    for option, labels in (("--profile", args.profile.split(",")), ("--snapshot", [args.snapshot])):
        unknown = [label for label in filter(None, labels)
                   if all(label not in (job[1] for job in js) for js in jobs.values())]
        if unknown:
            raise BadInput(f"{option} {unknown[0]!r} is not a row of this run; name a row that "
                             f"--only selects, e.g. {next(iter(jobs.values()))[0][1]!r}")
    if args.snapshot and device.type != "cuda":
        raise BadInput("--snapshot records the CUDA allocator's history; run it on a GPU")
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    meta = dict(device=device_name(device),
                torch_version=torch.__version__, steps=args.steps, repeat=args.repeat,
                transformers_version=transformers.__version__ if have_hf else None)
    runs: dict[tuple[str, str], list[dict]] = {}
    with tempfile.TemporaryDirectory() as data_dir:
        for preset in presets:
            vocab = VOCAB.get(preset, 65)
            ids = np.random.default_rng(0).integers(0, vocab, 64 * shapes[preset][1] * 16)
            write_dataset(Path(data_dir) / f"bench_{preset}", ids, dict(vocab_size=vocab))
            for rep in range(args.repeat):
                for impl, label, kw, variant in jobs[preset]:
                    snapshot = ([SnapshotCallback(out / f"snapshot_{preset}.pickle")]
                                if args.snapshot == label else [])
                    r = run_row(preset, impl, label, kw, variant, data_dir, shapes[preset], device,
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
            for impl, label, kw, variant in jobs[preset]:
                if label in args.profile.split(","):
                    path = out / f"profile_{preset}_{re.sub(r'[^A-Za-z0-9]+', '_', label).strip('_')}.md"
                    path.unlink(missing_ok=True)  # an earlier run's profile is not this one's
                    r = run_row(preset, impl, label, kw, variant, data_dir, shapes[preset], device,
                                args.profile_steps, [ProfileCallback(path, args.profile_steps)])
                    print(f"{preset} {label} under torch.profiler: " + (
                        "OOM" if r["oom"] else r.get("failed") or f"{path}\n{path.read_text()}"))
    report(out, meta, [merge_repeats(v) for v in runs.values()])
    return 0


def read_reports(paths: str) -> tuple[dict, list[dict]]:
    """The rows of comma-separated bench.json files (a row of a later file replaces the same
    row of an earlier one) and the last file's meta, with every source named."""
    merged, meta = {}, {}
    for path in paths.split(","):
        data = read_json(path, required=("rows",), what="bench report",
                         writer="bench.py, which writes it as OUT_DIR/bench.json (--out_dir, "
                                "out/bench by default)")
        differ = [k for k in ("device", "torch_version", "steps", "repeat")
                  if meta and data.get(k) != meta.get(k)]
        if differ:
            raise BadInput(f"{path}: its {differ[0]} ({data.get(differ[0])!r}) is not that of the "
                             f"reports before it ({meta.get(differ[0])!r}); merge reports of one "
                             "machine, torch and --steps/--repeat")
        for r in data.pop("rows"):
            r.setdefault("variant", r.pop("kernel", None))  # its name in older files
            merged[r["preset"], r["label"]] = r
        meta = dict(data, sources=meta.get("sources", []) + data.get("sources", [path]))
    return meta, list(merged.values())


def bench_jobs(preset: str, args, have_hf: bool) -> list[tuple]:
    """(impl, label, overrides, variant) of every row this run measures for the preset."""
    jobs = [("hf", label, {"checkpointing": "checkpointing" in label}, None)
            for label in ("HF eager", "HF eager +gradient checkpointing")
            if have_hf and preset != "tiny"]
    jobs += [("whole", REFERENCE, dict(PLANS)["none"], None)] if preset != "tiny" else []
    jobs += [("ours", label, kw, variant) for label, kw, variant in our_rows(args.quick)]
    # --loss_chunks: each lean plan also at those chunk sizes, run where --only selects the plan
    # or names the row itself
    chunked = [(label, (impl, f"{label} ({c}{CHUNK_VARIANT})", kw, f"{c}{CHUNK_VARIANT}"))
               for c in args.loss_chunks for impl, label, kw, variant in jobs
               if impl == "ours" and kw["lean_loss"] and variant is None]
    parts = args.only.split(",")  # "" (every row) is in every label
    picked = [job for job in jobs if (job[1] in parts if args.exact else any(p in job[1] for p in parts))]
    labels = {job[1] for job in picked}
    return picked + [job for base, job in chunked if job[1] in parts or base in labels]


def plan_costs(meta: dict, rows: list[dict], preset: str) -> dict:
    """The planner's cost table: each plan's step time over the fastest plan's, from this
    preset's compiled rows of our Trainer, run as train.py runs them (no variant)."""
    steps = {r["label"].removeprefix("compiled "): r for r in ours_as_run(rows, preset)
             if r["label"].startswith("compiled ")}
    if not steps:
        raise BadInput(f"no compiled rows of preset {preset!r} in the report; run "
                         f"bench.py --presets {preset} first")
    fastest = min(r["step_ms"] for r in steps.values())
    r = next(iter(steps.values()))
    sources = len(meta.get("sources", [])) or 1
    merged = f", {sources} reports merged (one process each)" if sources > 1 else ""
    # a run cut short leaves some rows with fewer runs than --repeat asked for
    runs = sorted({len(row.get("step_ms_runs", [row["step_ms"]])) for row in steps.values()})
    span = f"{runs[0]}-{runs[-1]}" if len(runs) > 1 else f"{runs[0]}"
    counted = "one run a row" if runs == [1] else f"the median of {span} interleaved runs a row"
    return {"hardware": f"{meta['device']}, torch {meta['torch_version']}, bf16 autocast, compiled, "
                        f"{preset} at {r['batch_size']} x {r['block_size']}, bench.py --steps "
                        f"{meta['steps']}, {counted}{merged}",
            "step_ratio": {label: round(r["step_ms"] / fastest, 3) for label, r in steps.items()}}


def run_row(preset, impl, label, kw, variant, data_dir, shape, device, steps: int,
            callbacks: list) -> dict:
    """One run of one row (the callbacks see its steps), with what it is and its wall time."""
    release()
    # what an earlier row left allocated would count in this row's peak
    leftover = measure(device).current_gb if device.type == "cuda" else 0.0
    t0 = time.perf_counter()
    try:
        if impl == "hf":
            r = run_hf(preset, kw["checkpointing"], steps, shape, device, callbacks)
        elif impl == "whole":
            r = run_whole(preset, kw, data_dir, steps, shape, device, callbacks)
        else:
            r = run_ours(preset, kw, variant, data_dir, steps, shape, callbacks)
    except Exception as e:  # one broken configuration must not void the others
        r = dict(oom=False, failed=f"{type(e).__name__}: {str(e).splitlines()[0]}")
    r.update(preset=preset, label=label, impl=impl, variant=variant, batch_size=shape[0],
             block_size=shape[1], recompute=recompute_kind(kw if impl != "hf" else {}),
             wall_s=time.perf_counter() - t0, leftover_gb=leftover)
    return r


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


# -- the planner's promises ----------------------------------------------------------
PLAN_POLICIES = {label: [_arg(k, v) for k, v in dict(PLANS)[label].items()]
                 for label in ("none", "block", "block +lean")}
PLAN_BATCH_STEPS = 3  # timed steps of a batch-size run: enough to reach the step's peak
# After training, in the same process: what the device holds beyond the allocator's reserve
# (CUDA context, loaded kernels, library handles), which the headroom must leave free.
CHILD = """
import json, sys, torch, train
from neuromanifold_gpt.predictor import GIB, device_memory_gb
code = train.main(sys.argv[1:])
if torch.cuda.is_initialized():
    free, total = device_memory_gb(torch.device("cuda"))
    print("CHECK " + json.dumps(dict(used_gb=total - free,
          reserved_now_gb=torch.cuda.memory_reserved() / GIB, total_gb=total)))
sys.exit(code)
"""


def run_train(data_dir: str, preset: str, extra: list[str], steps: int, metrics: Path) -> dict:
    """One train.py process of a few steps: its exit, report lines, and metrics."""
    args = ["--preset", preset, "--dataset", preset, "--data_dir", data_dir,
            "--max_iters", str(steps + 1), "--eval_iters", "1", "--eval_interval", "100000",
            "--log_interval", "100000", "--warmup_iters", "0", "--metrics_file", str(metrics), *extra]
    proc = subprocess.run([sys.executable, "-c", CHILD, *args], capture_output=True, text=True)
    check = next((json.loads(line[6:]) for line in proc.stdout.splitlines()
                  if line.startswith("CHECK ")), {})
    report = [line for line in proc.stdout.splitlines() if "free of" in line or "memory plan" in line]
    m = json.loads(metrics.read_text()) if metrics.is_file() else {}
    return dict(preset=preset, args=" ".join(extra), exit=proc.returncode, check=check, report=report,
                error=proc.stderr.strip().splitlines()[-1:] if proc.returncode else [],
                batch_size=m.get("batch_size"), oom=m.get("oom"), predicted_gb=m.get("predicted_peak_gb"),
                peak_gb=m.get("peak_memory_gb"), reserved_gb=m.get("peak_reserved_gb"),
                step_ms=m.get("step_time_ms"), policy=m.get("policy"), lean_loss=m.get("lean_loss"),
                offload=m.get("offload_activations"), in_backward=m.get("optimizer_in_backward"),
                checkpointed_blocks=m.get("checkpointed_blocks"))


def fastest_bench_row(rows: list[dict], preset: str, budget: float) -> dict | None:
    fitting = [r for r in ours_as_run(rows, preset) if r["peak_allocated_gb"] <= budget]
    return min(fitting, key=lambda r: r["step_ms"], default=None)


def check_plans(args) -> int:
    tables = args.plans.split(",")
    if not set(tables) <= {"batch", "budget"}:
        raise BadInput(f"--plans {args.plans!r}: name the tables batch and/or budget")
    try:
        budgets = [float(b) for b in args.budgets.split(",")]
    except ValueError:
        raise BadInput(f"--budgets {args.budgets!r}: expected GiB as numbers, comma-separated") from None
    batch_plans = list(dict.fromkeys(p.strip() for p in args.batch_plans.split(",")))
    unknown = [p for p in batch_plans if p not in PLAN_POLICIES]
    if unknown:
        raise BadInput(f"--batch_plans: unknown plan {unknown[0]!r}; "
                         f"choose from {', '.join(PLAN_POLICIES)}")
    # (table, preset, train.py arguments, timed steps, metrics file, what the row adds)
    runs = [("budget", preset, ["--memory_budget_gb", str(budget)], args.steps,
             f"budget_{preset}_{budget:g}.json", dict(budget_gb=budget))
            for preset in args.budget_presets.split(",") for budget in budgets if "budget" in tables]
    runs += [("batch", preset, ["--batch_size", "auto", *PLAN_POLICIES[policy]], PLAN_BATCH_STEPS,
              f"batch_{preset}_{policy.replace(' ', '')}.json", dict(plan=policy))
             for preset in args.batch_presets.split(",") for policy in batch_plans if "batch" in tables]
    used = dict.fromkeys(run[1] for run in runs)
    unknown = [p for p in used if p not in VOCAB]
    if unknown:
        raise BadInput(f"unknown preset {unknown[0]!r}; choose from {', '.join(VOCAB)}")
    bench_rows = read_reports(args.against)[1] if args.against else []
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    results: dict[str, list[dict]] = {"batch": [], "budget": []}
    lines = []
    with tempfile.TemporaryDirectory() as data_dir:
        for preset in used:
            ids = np.random.default_rng(0).integers(0, VOCAB[preset], 2_000_000)
            write_dataset(Path(data_dir) / preset, ids, dict(vocab_size=VOCAB[preset]))
        for table, preset, extra, steps, name, facts in runs:
            r = dict(run_train(data_dir, preset, extra, steps, out / name), **facts)
            if table == "budget":
                best = fastest_bench_row(bench_rows, preset, facts["budget_gb"])
                r.update(bench_row=best and best["label"], bench_step_ms=best and best["step_ms"])
            results[table].append(r)
            print(json.dumps(r), flush=True)
            write_json(out / "plans.json", results)
        if "budget" in tables:
            lines += ["| preset | budget GiB | plan | predicted GiB | measured GiB | within | step ms | "
                      "fastest fitting bench row | its step ms | ratio |",
                      "|---|---|---|---|---|---|---|---|---|---|"]
            for r in results["budget"]:
                plan = next((x.split(": ", 1)[1].split(" (")[0] for x in r["report"]
                             if x.startswith("memory plan")), (r["error"] or [""])[0])
                within = "yes" if r["peak_gb"] is not None and r["peak_gb"] <= r["budget_gb"] else "no"
                ratio = (r["step_ms"] / r["bench_step_ms"]
                         if r["step_ms"] and r["bench_step_ms"] else None)
                lines.append(f"| {r['preset']} | {r['budget_gb']:g} | {plan} | "
                             f"{fmt(r['predicted_gb'], '.2f')} | {fmt(r['peak_gb'], '.2f')} | {within} | "
                             f"{fmt(r['step_ms'], '.1f')} | {r['bench_row'] or ''} | "
                             f"{fmt(r['bench_step_ms'], '.1f')} | {fmt(ratio, '.2f')} |")
            lines.append("")
        if "batch" in tables:
            lines += ["| preset | plan | recommended batch | predicted GiB | measured GiB | error % | "
                      "reserved GiB | ran |", "|---|---|---|---|---|---|---|---|"]
            for r in results["batch"]:
                err = (r["predicted_gb"] / r["peak_gb"] - 1) * 100 if r["peak_gb"] else None
                ran = "yes" if r["exit"] == 0 else f"no (exit {r['exit']})"
                lines.append(f"| {r['preset']} | {r['plan']} | {r['batch_size']} | "
                             f"{fmt(r['predicted_gb'], '.2f')} | {fmt(r['peak_gb'], '.2f')} | "
                             f"{fmt(err, '+.1f')} | {fmt(r['reserved_gb'], '.2f')} | {ran} |")
            lines.append("")
    text = "\n".join(lines) + "\n"
    with atomic_path(out / "plans.md") as tmp:
        tmp.write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
