"""Peak memory and speed of every recompute policy and memory lever, eager and compiled,
against HuggingFace GPT-2 of the same shape in the same process.

    python3 bench.py                      # CUDA: gpt2, gpt2-medium (12 x 1024), shakespeare_char (64 x 256)
    python3 bench.py --presets gpt2 --steps 8
    python3 bench.py --snapshot "compiled block +lean"   # also dump that row's CUDA memory history
    python3 bench.py --quick              # CPU smoke run: tiny shapes, eager, a few seconds

Each row trains on random tokens (memory and speed do not depend on the data) through the
same Trainer as train.py: one warm-up step (compile, optimizer state), then --steps timed
steps; peak memory is the allocator's peak over the timed steps, step time their median.
The baseline is our fastest configuration without recompute or offload; HF runs
GPT2LMHeadModel eager, as its users do, with and without gradient_checkpointing_enable().
Writes OUT_DIR/bench.json (every figure), bench.md (the table) and bench.png (peak memory
vs step time per preset, with the Pareto front).
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from neuromanifold_gpt.config.base import PRESETS, TrainConfig
from neuromanifold_gpt.data import write_dataset
from neuromanifold_gpt.errors import TrainingOOM, entry_point
from neuromanifold_gpt.files import atomic_path, read_json, write_json
from neuromanifold_gpt.memory import measure, reset_peak
from neuromanifold_gpt.plots import plot_bench
from neuromanifold_gpt.trainer import train

VOCAB = {"shakespeare_char": 65, "gpt2": 50257, "gpt2-medium": 50257}
LEAN = dict(lean_loss=True)
BLOCK = dict(gradient_checkpointing=True, checkpoint_policy="block")
IN_BACKWARD = dict(optimizer_in_backward=True, grad_clip=0.0)
TIE = 0.03  # step times this close count as equally fast when choosing the baseline


def policy(name: str) -> dict:
    return dict(gradient_checkpointing=True, checkpoint_policy=name)


def our_rows(quick: bool) -> list[tuple[str, dict]]:
    """(label, TrainConfig overrides): every policy with and without the lean loss, the
    levers, eager and compiled."""
    eager = [("none", {}), ("none +lean", LEAN)]
    for p in ("block", "attention", "mlp", "selective"):
        eager += [(p, policy(p)), (f"{p} +lean", {**policy(p), **LEAN})]
    rows = [(f"eager {label}", dict(kw, compile=False)) for label, kw in eager]
    if quick:
        return rows + [("eager block +lean +opt-in-bwd +offload",
                        dict(BLOCK, **LEAN, **IN_BACKWARD, offload_activations=True, compile=False))]
    compiled = [("none", {}), ("none +lean", LEAN), ("block +lean", {**BLOCK, **LEAN})]
    compiled += [(f"{p} +lean", {**policy(p), **LEAN}) for p in ("attention", "mlp", "selective")]
    compiled += [
        ("block/2 +lean", dict(BLOCK, checkpoint_every=2, **LEAN)),
        ("none +lean budget 0.5", dict(LEAN, activation_memory_budget=0.5)),
        ("none +lean budget 0.25", dict(LEAN, activation_memory_budget=0.25)),
        ("block +lean +opt-in-bwd", dict(BLOCK, **LEAN, **IN_BACKWARD)),
        ("block +lean +opt-in-bwd +offload", dict(BLOCK, **LEAN, **IN_BACKWARD,
                                                  offload_activations=True)),
    ]
    return rows + [(f"compiled {label}", dict(kw, compile=True)) for label, kw in compiled]


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


def release() -> None:
    """Free everything the previous row left, so rows do not see each other's memory."""
    gc.collect()
    torch._dynamo.reset()  # compiled graphs hold their constants and workspaces
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


def run_ours(preset: str, label: str, overrides: dict, data_dir: str, steps: int, shape,
             snapshot: Path | None) -> dict:
    B, T = shape
    model_kw = dict(n_layer=2, n_head=2, n_embd=64) if preset == "tiny" else {}
    cfg = TrainConfig.from_flags(preset="shakespeare_char" if preset == "tiny" else preset,
                                 dataset=f"bench_{preset}", data_dir=data_dir, batch_size=B,
                                 block_size=T, max_iters=steps + 1, eval_interval=10**6,
                                 eval_iters=1, log_interval=10**6, warmup_iters=0, decay_lr=False,
                                 **model_kw, **overrides)
    callbacks = [SnapshotCallback(snapshot)] if snapshot else []
    try:
        m = train(cfg, callbacks=callbacks, quiet=True)
    except TrainingOOM as e:
        return dict(oom=True, error=str(e))
    return dict(oom=False, peak_allocated_gb=m["peak_memory_gb"],
                peak_reserved_gb=m["peak_reserved_gb"], step_ms=m["step_time_ms"],
                tokens_per_s=m["tokens_per_sec"], predicted_gb=m["predicted_peak_gb"],
                memory_source=m["peak_memory_source"], compile=m["compile"])


def run_hf(preset: str, checkpointing: bool, steps: int, shape, device: torch.device) -> dict:
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
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    times, peaks, reserved = [], [], []
    try:
        for step in range(steps + 1):
            x = torch.randint(0, VOCAB[preset], (B, T), device=device)
            t0 = time.perf_counter()
            with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
                loss = model(input_ids=x, labels=x).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            if step:  # the first step is warm-up, as in the Trainer
                times.append(time.perf_counter() - t0)
                m = measure(device)
                peaks.append(m.peak_gb)
                reserved.append(m.peak_reserved_gb)
            reset_peak(device)
    except torch.cuda.OutOfMemoryError as e:
        return dict(oom=True, error=str(e).splitlines()[0])
    finally:
        del model, optimizer
    step = statistics.median(times)
    return dict(oom=False, peak_allocated_gb=max(peaks), peak_reserved_gb=max(reserved),
                step_ms=step * 1000, tokens_per_s=B * T / step, predicted_gb=None,
                memory_source=measure(device).source, compile=False)


def add_ratios(rows: list[dict]) -> None:
    """Ratios to our baseline and to HF. The baseline is our best configuration without
    recompute or offload: the lowest peak among those within TIE of the fastest one's step
    (closer than that is timing noise, not a speed difference)."""
    for preset in dict.fromkeys(r["preset"] for r in rows):
        ok = [r for r in rows if r["preset"] == preset and not r["oom"] and "failed" not in r]
        plain = [r for r in ok if r["impl"] == "ours" and r["recompute"] == "none"]
        fastest = min((r["step_ms"] for r in plain), default=None)
        ties = [r for r in plain if r["step_ms"] <= (1 + TIE) * fastest] if plain else []
        base = min(ties, key=lambda r: r["peak_allocated_gb"]) if ties else None
        hf = {r["label"]: r for r in ok if r["impl"] == "hf"}
        hf_eager, hf_gc = hf.get("HF eager"), hf.get("HF eager +gradient checkpointing")
        for r in ok:
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


def table(rows: list[dict]) -> str:
    from tabulate import tabulate

    def fmt(v, spec):
        return "" if v is None else format(v, spec)

    body = []
    for r in rows:
        if r["oom"] or "failed" in r:
            body.append([r["preset"], r["label"], "OOM" if r["oom"] else "failed"] + [""] * 9)
            continue
        body.append([r["preset"], r["label"], fmt(r["peak_allocated_gb"], ".2f"),
                     fmt(r["peak_reserved_gb"], ".2f"), fmt(r["step_ms"], ".1f"),
                     fmt(r["tokens_per_s"], ",.0f"), fmt(r.get("mem_vs_baseline"), ".2f"),
                     fmt(r.get("time_vs_baseline"), ".2f"), fmt(r.get("mem_vs_hf_gc"), ".2f"),
                     fmt(r.get("tokens_vs_hf"), ".2f"), fmt(r["predicted_gb"], ".2f"),
                     fmt(r.get("predictor_error") and 100 * r["predictor_error"], "+.1f")])
    headers = ["preset", "configuration", "peak alloc GiB", "reserved GiB", "step ms", "tokens/s",
               "mem / base", "time / base", "mem / HF gc", "tok/s / HF", "predicted GiB",
               "pred. err %"]
    return tabulate(body, headers=headers, tablefmt="github", disable_numparse=True)


@entry_point
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--presets", default="gpt2,gpt2-medium,shakespeare_char")
    parser.add_argument("--steps", type=int, default=6, help="timed steps per row")
    parser.add_argument("--out_dir", default="out/bench")
    parser.add_argument("--quick", action="store_true", help="CPU, tiny shapes, eager rows only")
    parser.add_argument("--only", default="",
                        help="run only rows whose label contains one of these (comma-separated)")
    parser.add_argument("--snapshot", default="", help="dump this row's CUDA memory history")
    parser.add_argument("--report", default="", metavar="JSON[,JSON...]",
                        help="only redo the table and the plot from earlier bench.json files "
                             "(a row of a later file replaces the same row of an earlier one)")
    args = parser.parse_args(argv)
    if args.report:
        merged, meta = {}, {}
        for path in args.report.split(","):
            data = read_json(path, required=("rows",))
            for r in data.pop("rows"):
                merged[r["preset"], r["label"]] = r
            meta = dict(data, sources=meta.get("sources", []) + [path])
        Path(args.out_dir).mkdir(parents=True, exist_ok=True)
        report(Path(args.out_dir), meta, list(merged.values()))
        return 0
    if args.quick:
        device, presets, shapes = torch.device("cpu"), ["tiny"], {"tiny": (2, 32)}
    else:
        if not torch.cuda.is_available():
            raise ValueError("the full bench needs CUDA; use --quick on a CPU")
        device = torch.device("cuda")
        presets = args.presets.split(",")
        unknown = [p for p in presets if p not in VOCAB]
        if unknown:
            raise ValueError(f"unknown preset {unknown[0]!r}; choose from {', '.join(VOCAB)}")
        shapes = {p: PRESETS[p]["cuda"] for p in presets}
    try:
        import transformers  # noqa: F401
        have_hf = True
    except ImportError:
        have_hf = False
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    meta = dict(device=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                torch_version=torch.__version__, steps=args.steps,
                transformers_version=transformers.__version__ if have_hf else None)
    rows = []
    with tempfile.TemporaryDirectory() as data_dir:
        for preset in presets:
            vocab = VOCAB.get(preset, 65)
            ids = np.random.default_rng(0).integers(0, vocab, 64 * shapes[preset][1] * 16)
            write_dataset(Path(data_dir) / f"bench_{preset}", ids, dict(vocab_size=vocab))
            jobs = [(label, None) for label in ("HF eager", "HF eager +gradient checkpointing")
                    if have_hf and preset != "tiny"]  # first: the reference every ratio needs
            jobs += our_rows(args.quick)
            jobs = [(label, kw) for label, kw in jobs
                    if any(part in label for part in args.only.split(","))]
            for label, kw in jobs:
                release()
                # what an earlier row left allocated would count in this row's peak
                leftover = measure(device).current_gb if device.type == "cuda" else 0.0
                t0 = time.perf_counter()
                snap = out / f"snapshot_{preset}.pickle" if args.snapshot == label else None
                try:
                    if kw is None:
                        r = run_hf(preset, "checkpointing" in label, args.steps, shapes[preset],
                                   device)
                    else:
                        r = run_ours(preset, label, kw, data_dir, args.steps, shapes[preset], snap)
                except Exception as e:  # one broken configuration must not void the others
                    r = dict(oom=False, failed=f"{type(e).__name__}: {str(e).splitlines()[0]}")
                r.update(preset=preset, label=label, impl="ours" if kw is not None else "hf",
                         batch_size=shapes[preset][0], block_size=shapes[preset][1],
                         recompute=recompute_kind(kw or {}), wall_s=time.perf_counter() - t0,
                         leftover_gb=leftover)
                rows.append(r)
                print(f"{preset:16s} {label:42s} " + (
                    "OOM" if r["oom"] else r["failed"] if "failed" in r else
                    f"peak {r['peak_allocated_gb']:7.3f} GiB, reserved "
                    f"{r['peak_reserved_gb']:7.3f}, step {r['step_ms']:8.1f} ms, predicted "
                    f"{r['predicted_gb'] or float('nan'):.3f}") + f"  ({r['wall_s']:.0f} s)",
                    flush=True)
                write_json(out / "bench.json", dict(meta, rows=rows))  # a cut-short run keeps its rows
    report(out, meta, rows)
    return 0


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


if __name__ == "__main__":
    sys.exit(main())
