"""What a run tells: the startup report, the log line, MFU, the run's record (record.py; after
a CUDA out-of-memory or a non-finite loss, the record of that) and the files they go to.

`trainer` below is a Trainer (neuromanifold_gpt/trainer.py) after its setup."""

from __future__ import annotations

import statistics

import torch

from . import distributed, planner
from .config.base import TrainConfig
from .device import device_name
from .files import write_tsv
from .provenance import run_provenance
from .record import RunRecord

# Dense bf16 peak FLOP/s by the exact name torch.cuda.get_device_name gives, for MFU (the
# vendor's datasheet figures, half the "with sparsity" ones). Matched whole: "NVIDIA L40S" is
# not an L4. A device not listed reports no MFU.
PEAK_FLOPS = {"NVIDIA H200": 989e12, "NVIDIA H100 80GB HBM3": 989e12, "NVIDIA H100 PCIe": 756e12,
              "NVIDIA A100-SXM4-80GB": 312e12, "NVIDIA A100-SXM4-40GB": 312e12,
              "NVIDIA A100 80GB PCIe": 312e12, "NVIDIA A100-PCIE-40GB": 312e12,
              "NVIDIA L4": 121e12, "NVIDIA A10": 125e12}
TRACE_HEADER = ["step", "loss", "peak_memory_gb", "peak_reserved_gb"]  # memory_trace_file's columns


def flops_per_token(model) -> float:
    """nanoGPT's estimate: 6N for the matmuls plus the attention scores, forward and backward."""
    c = model.config
    return 6 * model.num_params() + 12 * c.n_layer * c.n_embd * c.block_size


def peak_flops(device: torch.device, world_size: int) -> float | None:
    """The run's peak FLOP/s over all devices (None when the device is not in PEAK_FLOPS)."""
    peak = PEAK_FLOPS.get(device_name(device))
    return peak * world_size if peak else None  # tokens per iteration are global: MFU per device


def startup_report(plan, model) -> list[str]:
    device, dtype, batch_size, block_size = plan.device, plan.dtype, plan.batch_size, plan.block_size
    tokens = batch_size * block_size * plan.accumulation
    mc, layers = model.config, plan.layers
    lines = [
        f"number of parameters: {model.num_params() / 1e6:.2f}M",
        f"device: {device_name(device)}, dtype: {str(dtype).replace('torch.', '')}"
        f"{' (autocast)' if device.type == 'cuda' and dtype != torch.float32 else ''}",
        f"tokens per iteration will be: {tokens:,} "
        f"({plan.accumulation} x {batch_size} x {block_size})",
    ]
    if mc.gradient_checkpointing:
        which = "all" if len(layers) == mc.n_layer else ",".join(map(str, layers))
        lines.append(f"✓ Gradient checkpointing: ENABLED (policy: "
                     f"{plan.checkpoint.checkpoint_policy}, blocks: {which} of {mc.n_layer})")
    else:
        lines.append("✗ Gradient checkpointing: DISABLED")
    return lines


def startup_lines(trainer) -> list[str]:
    """Everything printed once before the first step."""
    t = trainer
    lines = startup_report(t.plan, t.model) + t.report.lines
    if t.plan.cuda_graphs:
        lines.append("CUDA graphs: the compiled code replays as graphs (one launch each)")
    if t.dist.parallelism != "none":
        lines.append(f"distributed: {t.dist.parallelism.upper()} over {t.dist.world_size} "
                     f"rank(s), {t.plan.micro_steps} "
                     f"micro-step(s) of {t.batch_size} x {t.block_size} per rank per iteration")
    return lines


def format_log_line(r: dict) -> str:
    line = (f"iter {r['iter']}: loss {r['loss']:.4f}, time {r['time_ms']:.2f}ms, "
            f"tok/s {r['tokens_per_sec']:,.0f}")
    if "mfu" in r:
        line += f", mfu {r['mfu'] * 100:.2f}%"
    mem = [f"{k} {v:.3f}" for k, v in r.items() if k.startswith("memory/")]
    return line + (", " + ", ".join(mem) if mem else "")


def _run_facts(trainer) -> dict:
    """What every record of a run holds, whatever its outcome: the plan, the device, the code."""
    t, plan = trainer, trainer.plan
    mc, levers = plan.model, plan.levers
    return dict(
        preset=t.cfg.model.preset,
        params=t.model.num_params() if t.model is not None else None,
        gradient_checkpointing=mc.gradient_checkpointing,
        policy=plan.policy,
        checkpointed_blocks=len(plan.layers),
        batch_size=t.batch_size, block_size=t.block_size,
        gradient_accumulation_steps=plan.accumulation,
        tokens_per_iter=t.batch_size * t.block_size * plan.accumulation,
        iters=t.iter_num, device=t.device.type, device_name=device_name(t.device),
        dtype=str(t.dtype).replace("torch.", ""),
        **run_provenance(t.device),  # torch version, commit, dirty flag, training-code hash, CUDA version
        world_size=t.dist.world_size, parallelism=t.dist.parallelism,
        predicted_peak_gb=t.report.prediction.peak_gb, recommended_batch_size=t.report.recommended,
        device_memory_gb=t.device_gb, compile=plan.compile,
        compile_unit=plan.compile_unit if plan.compile else None,
        cuda_graphs=plan.cuda_graphs, lean_loss=levers.lean_loss,
        offload_activations=levers.offload_activations,
        optimizer_in_backward=levers.optimizer_in_backward,
        activation_memory_budget=levers.activation_memory_budget)


def run_record(trainer, step_times, losses, evals, peak) -> RunRecord:
    """The record of a run that trained to its end."""
    t = trainer
    facts = _run_facts(t)
    step = statistics.median(step_times) if step_times else None
    measured = bool(t.memory.trace)
    # every rank's (peak, reserved); the run's figure is the largest
    peaks = distributed.gather((t.memory.peak_gb, t.memory.peak_reserved_gb))
    peak_gb = max(p for p, _ in peaks) if measured else None
    return RunRecord(
        **facts,
        peak_memory_gb=peak_gb,
        peak_memory_gb_per_rank=[p for p, _ in peaks] if measured else None,
        peak_reserved_gb=max(r for _, r in peaks) if measured else None,
        peak_memory_source=t.memory.source,
        peak_rss_gb=max(r for _, r in peaks) if measured and t.device.type == "cpu" else None,
        # allocator peaks only: a CPU run measures the whole process's resident memory
        predicted_over_measured=t.report.prediction.peak_gb / peak_gb
        if measured and t.device.type == "cuda" else None,
        step_time_ms=step * 1000 if step else None,
        tokens_per_sec=facts["tokens_per_iter"] / step if step else None,
        mfu=flops_per_token(t.model) * facts["tokens_per_iter"] / step / peak if step and peak else None,
        final_train_loss=evals.get("train"),
        final_val_loss=evals.get("val"),
        last_step_loss=losses[-1][1] if losses else None)


def oom_record(trainer, error: Exception) -> tuple[RunRecord, str]:
    """After a CUDA out-of-memory: the run's record (oom: true) and the one-line advice."""
    t = trainer
    b, advice = planner.oom_advice(t.report, t.batch_size)
    record = RunRecord(**_run_facts(t) | {"recommended_batch_size": b}, oom=True,
                       error=str(error).splitlines()[0])
    message = (f"batch_size {t.batch_size} x {t.block_size} needs about "
               f"{t.report.prediction.peak_gb:.1f} GiB (predicted); the device has "
               f"{t.device_gb:.1f} GiB ({t.free_gb:.1f} GiB free at start); use {advice}")
    return record, message


def nonfinite_record(trainer, error: Exception) -> RunRecord:
    """After the loss became NaN or infinite: the run's record, saying at which step."""
    return RunRecord(**_run_facts(trainer), nonfinite_loss=True, nonfinite_step=trainer.iter_num,
                     error=str(error))


def write_run_files(cfg: TrainConfig, record: RunRecord, trace_rows: list[tuple]) -> None:
    """memory_trace_file and then metrics_file, each when set: a metrics file means the run
    ended and everything it wrote is complete."""
    if cfg.evaluation.memory_trace_file:
        write_tsv(cfg.evaluation.memory_trace_file, TRACE_HEADER, trace_rows)
    if cfg.evaluation.metrics_file:
        record.write(cfg.evaluation.metrics_file)
