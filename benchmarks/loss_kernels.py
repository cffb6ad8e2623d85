"""The head and cross-entropy alone at GPT-2's vocabulary: our lean loss against the plain
loss and the fused kernels of cut-cross-entropy and Liger (the kernels --loss_kernel chooses).

    python3 -m benchmarks.loss_kernels --repeat 3      # CUDA; the libraries: pip install -e '.[compare]'
    python3 -m benchmarks.loss_kernels --loss_chunks 512,4096   # also ours at these chunk sizes
    python3 -m benchmarks.loss_kernels --quick         # CPU smoke run: tiny shapes, no library kernels

bf16 autocast, the head padded to 50304 rows as the model's is (a multiple of 64: aligned rows
for cuBLAS): each kernel's forward + backward time (median of --repeat interleaved rounds of
--steps) and peak above its inputs, then its loss and gradients against fp64, with a random
head and with one whose rows share a direction, as a trained head's do. Writes
OUT_DIR/loss_kernels.json and loss_kernels.md.
"""

from __future__ import annotations

import argparse
import functools
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from neuromanifold_gpt.device import device_name
from neuromanifold_gpt.errors import BadInput, entry_point
from neuromanifold_gpt.files import atomic_path, write_json
from neuromanifold_gpt.loss import IGNORE_INDEX, KERNELS, linear_cross_entropy

from .reports import fmt
from .rows import LOSS_KERNELS, parse_chunks


def kernels(quick: bool, loss_chunks: tuple[int, ...]) -> dict:
    """name -> fn(x, weight, targets): the plain loss, ours (at its own and the asked chunk
    sizes) and, on CUDA, the libraries' Triton kernels, named as the bench's rows name them."""
    plain = lambda x, w, t: F.cross_entropy(x @ w.t(), t)  # noqa: E731
    out = {"plain": plain if quick else torch.compile(plain), "ours": linear_cross_entropy}
    for c in loss_chunks:  # the chunk's size against its count (our default: CHUNK_BYTES)
        out[f"ours, {c} tokens a chunk"] = functools.partial(linear_cross_entropy, chunk=c)
    if not quick:
        out.update({name: KERNELS[kernel] for name, kernel in LOSS_KERNELS.items()})
    return out


# (timed tokens, widths, tokens checked against fp64, head rows, vocabulary: targets below it)
SHAPES = {"quick": (512, (64,), 256, 1000, 1000), "cuda": (12288, (768, 1024), 4096, 50304, 50257)}


def measure_kernels(fns: dict, device: torch.device, shapes: tuple, steps: int, repeat: int) -> list[dict]:
    n, widths, n_check, head, vocab = shapes
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

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    rows = []
    for width in widths:
        x, w, t = inputs(n, width, False)
        peaks, times = {}, {name: [] for name in fns}
        for name, fn in fns.items():
            step(fn, x, w, t)  # compiles
            peaks[name] = None
            if device.type == "cuda":
                sync()
                base = torch.cuda.memory_allocated()
                torch.cuda.reset_peak_memory_stats()
                step(fn, x, w, t)
                peaks[name] = (torch.cuda.max_memory_allocated() - base) / 2**30
        for _ in range(repeat):
            for name, fn in fns.items():
                sync()
                t0 = time.perf_counter()
                for _ in range(steps):
                    step(fn, x, w, t)
                sync()
                times[name].append((time.perf_counter() - t0) / steps * 1000)
        rows += [dict(kind="speed", tokens=n, width=width, head=head, kernel=name,
                      ms=statistics.median(times[name]), ms_min=min(times[name]),
                      ms_max=max(times[name]), peak_gb=peaks[name]) for name in fns]
    rel = lambda a, b: float((a.double() - b.double()).norm() / b.double().norm())  # noqa: E731
    for shared in (False, True):
        x, w, t = inputs(n_check, widths[0], shared)
        exact = step(lambda x, w, t: F.cross_entropy(x.double() @ w.double().t(), t), x, w, t)
        for name, fn in fns.items():
            loss, gx, gw = step(fn, x, w, t)
            rows.append(dict(kind="accuracy", head="shared direction" if shared else "random",
                             kernel=name, loss_error=abs(float(loss) - float(exact[0])),
                             grad_x_error=rel(gx, exact[1]), grad_w_error=rel(gw, exact[2])))
    return rows


def tables(rows: list[dict], shapes: tuple) -> str:
    from tabulate import tabulate

    n, widths, n_check, head, _ = shapes
    speed = [r for r in rows if r["kind"] == "speed"]
    accuracy = [r for r in rows if r["kind"] == "accuracy"]
    speed_text = tabulate([[r["width"], r["kernel"], f"{r['ms']:.2f}", f"{r['ms_min']:.2f}-{r['ms_max']:.2f}",
                            fmt(r["peak_gb"], ".3f")] for r in speed],
                          headers=[f"width ({n} tokens, {head} x width head)", "kernel",
                                   "fwd+bwd ms", "spread ms", "peak GiB above inputs"],
                          tablefmt="github", disable_numparse=True)
    accuracy_text = tabulate([[r["head"], r["kernel"], f"{r['loss_error']:.1e}", f"{r['grad_x_error']:.4f}",
                               f"{r['grad_w_error']:.4f}"] for r in accuracy],
                             headers=[f"head ({n_check} x {widths[0]} x {head})", "kernel",
                                      "loss error", "grad_x rel. error", "grad_w rel. error"],
                             tablefmt="github", disable_numparse=True)
    return f"{speed_text}\n\nagainst fp64:\n\n{accuracy_text}\n"


@entry_point
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=20, help="forward + backward passes a round")
    parser.add_argument("--repeat", type=int, default=1, help="interleaved rounds; report median and spread")
    parser.add_argument("--out_dir", default="out/bench")
    parser.add_argument("--quick", action="store_true", help="CPU, tiny shapes, no library kernels")
    parser.add_argument("--loss_chunks", default="", metavar="N[,N...]",
                        help="also our lean loss with N tokens a chunk")
    args = parser.parse_args(argv)
    chunks = parse_chunks(args.loss_chunks)
    if args.steps < 1 or args.repeat < 1:
        raise BadInput("--steps and --repeat must be at least 1")
    if not args.quick and not torch.cuda.is_available():
        raise BadInput("benchmarks.loss_kernels measures CUDA kernels; use --quick on a CPU")
    device = torch.device("cpu" if args.quick else "cuda")
    shapes = SHAPES["quick" if args.quick else "cuda"]
    rows = measure_kernels(kernels(args.quick, chunks), device, shapes, args.steps, args.repeat)
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "loss_kernels.json", dict(device=device_name(device),
                                               torch_version=torch.__version__, rows=rows))
    text = tables(rows, shapes)
    with atomic_path(out / "loss_kernels.md") as tmp:
        tmp.write_text(text)
    print(text + f"wrote {out / 'loss_kernels.json'}, {out / 'loss_kernels.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
