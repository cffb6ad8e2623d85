"""What a bench row is and how one runs: every row of ours is a TrainConfig, a plan of the
planner with its variant's fields set, trained by the library's own `train` on random tokens
(memory and speed do not depend on the data): one warm-up step (compile, optimizer state), then
`steps` timed steps; peak memory is the allocator's peak over the timed steps, step time their
median.

The reference (a whole-model torch.compile of our model with the plain loss and no
checkpointing, as nanoGPT trains) and HuggingFace's GPT2LMHeadModel are not our Trainer: they
train in a plain loop of the same bf16 autocast, fused AdamW and clipping (`plain_step`)."""

from __future__ import annotations

import gc
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from neuromanifold_gpt import build_model
from neuromanifold_gpt.config.base import PRESETS, TrainConfig
from neuromanifold_gpt.data import write_dataset
from neuromanifold_gpt.errors import BadInput, TrainingOOM
from neuromanifold_gpt.loss import KERNELS
from neuromanifold_gpt.memory import MemoryMonitorCallback, measure
from neuromanifold_gpt.optim import make_optimizer
from neuromanifold_gpt.planner import PLANS
from neuromanifold_gpt.trainer import train

VOCAB = {"shakespeare_char": 65, "gpt2": 50257, "gpt2-medium": 50257}
REFERENCE = "reference"  # whole-model compile, plain loss, no checkpointing
QUICK = {"tiny": (2, 32)}  # --quick: a tiny model on the CPU, (batch, block)

# A row's variant: the config fields it sets beside its plan's. The libraries' loss kernels,
# by the names the rows give them, are not what the predictor models: their rows predict nothing.
LOSS_KERNELS = {name.replace("_", " "): name for name in KERNELS if name != "chunked"}
VARIANTS = {
    **{name: dict(loss_kernel=kernel) for name, kernel in LOSS_KERNELS.items()},
    # a lean plan's whole model compiled, not block by block, replayed as CUDA graphs on
    # either side of the eager loss where the blocks would be
    "whole model": dict(compile_unit="model"),
    # the compiled code's kernels launched one by one instead of replayed as CUDA graphs
    "no cuda graphs": dict(cuda_graphs=False),
}
CHUNK_VARIANT = " tokens a chunk"  # "512 tokens a chunk": the lean loss at that chunk size


def variant_fields(variant: str | None) -> dict:
    """The config fields a variant sets."""
    if variant is None:
        return {}
    if variant.endswith(CHUNK_VARIANT):
        return dict(loss_chunk_tokens=int(variant.removesuffix(CHUNK_VARIANT)))
    return VARIANTS[variant]


def row_settings(fields: dict, compile: bool) -> dict:
    """A plan's row: its fields, compiled or not; a plan that steps in backward is measured as it
    can run, unclipped (there is no global gradient norm before its steps)."""
    clip = dict(grad_clip=0.0) if fields.get("optimizer_in_backward") else {}
    return dict(fields, compile=compile, **clip)


def runs(overrides: dict) -> bool:
    """Whether the library runs a row: its config passes the cross-field rules."""
    try:
        TrainConfig.from_flags(**overrides)
    except BadInput:
        return False
    return True


def our_rows(quick: bool) -> list[tuple[str, dict, str | None]]:
    """(label, TrainConfig overrides, variant): every plan the planner weighs, eager and
    compiled; the lean plans, which compile block by block, also with the whole model compiled
    (but for the plans that offload or step in backward; none +lean and block +lean under every
    variant), and the plain and block plans without CUDA graphs."""
    eager = [(f"eager {label}", row_settings(kw, False), None) for label, kw in PLANS
             if runs(row_settings(kw, False))]
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
        compiled += [(f"compiled {label} ({v})", dict(row_settings(kw, True), **variant_fields(v)), v)
                     for v in variants]
    return eager + compiled


def bench_jobs(preset: str, quick: bool, have_hf: bool, only: str = "", exact: bool = False,
               loss_chunks: tuple[int, ...] = ()) -> list[tuple]:
    """(impl, label, overrides, variant) of every row `only` selects for the preset: labels
    containing one of its comma-separated parts ("" selects all), or equal to one (exact)."""
    jobs = [("hf", label, {"checkpointing": "checkpointing" in label}, None)
            for label in ("HF eager", "HF eager +gradient checkpointing")
            if have_hf and preset not in QUICK]
    jobs += [("whole", REFERENCE, dict(PLANS)["none"], None)] if preset not in QUICK else []
    jobs += [("ours", label, kw, variant) for label, kw, variant in our_rows(quick)]
    # loss_chunks: each lean plan also at those chunk sizes, run where `only` selects the plan
    # or names the row itself
    chunked = [(label, (impl, f"{label} ({c}{CHUNK_VARIANT})",
                        dict(kw, **variant_fields(f"{c}{CHUNK_VARIANT}")), f"{c}{CHUNK_VARIANT}"))
               for c in loss_chunks for impl, label, kw, variant in jobs
               if impl == "ours" and kw["lean_loss"] and variant is None]
    parts = only.split(",")  # "" (every row) is in every label
    picked = [job for job in jobs if (job[1] in parts if exact else any(p in job[1] for p in parts))]
    labels = {job[1] for job in picked}
    return picked + [job for base, job in chunked if job[1] in parts or base in labels]


def parse_chunks(text: str) -> tuple[int, ...]:
    """--loss_chunks N[,N...]: token counts, each once."""
    try:
        chunks = tuple(dict.fromkeys(int(c) for c in filter(None, text.split(","))))
    except ValueError:
        raise BadInput(f"--loss_chunks {text!r}: expected token counts, comma-separated") from None
    if any(c < 1 for c in chunks):
        raise BadInput("--loss_chunks takes token counts of at least 1")
    return chunks


def machine(quick: bool, presets: str) -> tuple[torch.device, dict[str, tuple[int, int]]]:
    """The device and each preset's (batch, block): the CPU's tiny model with --quick, else
    the presets at their CUDA shapes."""
    if quick:
        return torch.device("cpu"), QUICK
    if not torch.cuda.is_available():
        raise BadInput("the full bench needs CUDA; use --quick on a CPU")
    unknown = [p for p in presets.split(",") if p not in VOCAB]
    if unknown:
        raise BadInput(f"unknown preset {unknown[0]!r}; choose from {', '.join(VOCAB)}")
    return torch.device("cuda"), {p: PRESETS[p]["cuda"] for p in presets.split(",")}


def transformers_version() -> str | None:
    """HuggingFace transformers' version, None where it is not installed (no HF rows then)."""
    try:
        import transformers
    except ImportError:
        return None
    return transformers.__version__


def write_tokens(data_dir: str | Path, name: str, vocab: int, n_tokens: int) -> None:
    """A dataset of random tokens: memory and speed do not depend on the data."""
    ids = np.random.default_rng(0).integers(0, vocab, n_tokens)
    write_dataset(Path(data_dir) / name, ids, dict(vocab_size=vocab))


def write_bench_data(data_dir: str, preset: str, shape: tuple[int, int]) -> None:
    write_tokens(data_dir, f"bench_{preset}", VOCAB.get(preset, 65), 64 * shape[1] * 16)


def release() -> None:
    """Free everything the previous row left, so rows do not see each other's memory."""
    gc.collect()
    torch._dynamo.reset()  # compiled graphs hold their constants and workspaces
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


def bench_config(preset: str, data_dir: str, steps: int, shape, overrides: dict) -> TrainConfig:
    """A row's run: its overrides on the preset at its shape; no evaluation, which measures
    nothing here and would compile the model's inference graph for every row."""
    B, T = shape
    model_kw = dict(n_layer=2, n_head=2, n_embd=64) if preset in QUICK else {}
    return TrainConfig.from_flags(preset="shakespeare_char" if preset in QUICK else preset,
                                  dataset=f"bench_{preset}", data_dir=data_dir, batch_size=B,
                                  block_size=T, max_iters=steps + 1, eval_iters=0,
                                  log_interval=10**6, warmup_iters=0, decay_lr=False,
                                  **model_kw, **overrides)


def run_ours(preset: str, overrides: dict, data_dir: str, steps: int, shape, callbacks: list) -> dict:
    cfg = bench_config(preset, data_dir, steps, shape, overrides)
    try:
        m = train(cfg, callbacks=callbacks, quiet=True)
    except TrainingOOM as e:
        return dict(oom=True, error=str(e))
    library_kernel = overrides.get("loss_kernel", "chunked") != "chunked"
    return dict(oom=False, peak_allocated_gb=m["peak_memory_gb"],
                peak_reserved_gb=m["peak_reserved_gb"], step_ms=m["step_time_ms"],
                tokens_per_s=m["tokens_per_sec"],
                predicted_gb=None if library_kernel else m["predicted_peak_gb"],
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
    """Our model under one torch.compile of the whole model, the plain loss inside it."""
    cfg = bench_config(preset, data_dir, steps, shape, dict(overrides, compile=True))
    B, T = shape
    vocab = VOCAB.get(preset, 65)
    model = build_model(cfg.model_config(vocab, T)).to(device)
    model.compile()
    optimizer = make_optimizer(model, cfg.optimizer, cfg.memory_levers, device)
    step = plain_step(lambda x: model(x, x)[1], model, optimizer, vocab, shape, device,
                      cfg.optimizer.grad_clip)
    return dict(timed_steps(step, steps, B * T, device, callbacks), compile=True)


def run_hf(preset: str, checkpointing: bool, steps: int, shape, device: torch.device,
           callbacks: list) -> dict:
    """HuggingFace GPT2LMHeadModel of the preset's shape, trained as its users do: eager,
    loss from labels=input_ids, with or without gradient_checkpointing_enable()."""
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


def recompute_kind(overrides: dict) -> str:
    """What a row does to activations: none, or the policy / lever that trades them."""
    kinds = [overrides["checkpoint_policy"]] if overrides.get("gradient_checkpointing") else []
    if overrides.get("activation_memory_budget", 1.0) < 1.0:
        kinds.append("budget")
    if overrides.get("offload_activations"):
        kinds.append("offload")
    return "+".join(kinds) or "none"


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
            r = run_ours(preset, kw, data_dir, steps, shape, callbacks)
    except Exception as e:  # one broken configuration must not void the others
        r = dict(oom=False, failed=f"{type(e).__name__}: {str(e).splitlines()[0]}")
    r.update(preset=preset, label=label, impl=impl, variant=variant, batch_size=shape[0],
             block_size=shape[1], recompute=recompute_kind(kw if impl != "hf" else {}),
             wall_s=time.perf_counter() - t0, leftover_gb=leftover)
    return r
