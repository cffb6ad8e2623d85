"""The training loop: AdamW, cosine schedule with warm-up, gradient accumulation, clipping,
bf16 autocast on CUDA, periodic evaluation, snapshots, and measured memory and speed."""

from __future__ import annotations

import contextlib
import math
import statistics
import time
from pathlib import Path

import torch

from . import build_model, distributed, levers, planner
from .checkpointing import checkpointed_layers
from .config.base import TrainConfig
from .data import BatchLoader
from .memory import MemoryMonitorCallback
from .metrics import atomic_path, write_json, write_tsv
from .predictor import device_memory_gb

# Dense bf16 peak FLOP/s by device name, for MFU (the vendor's datasheet figures).
PEAK_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L4": 121e12, "A10": 125e12}


TRACE_HEADER = ["step", "loss", "peak_memory_gb", "peak_reserved_gb"]  # memory_trace_file's columns


class TrainingOOM(RuntimeError):
    """CUDA ran out of memory during training; the metrics record it."""


def resolve_device(cfg: TrainConfig) -> tuple[torch.device, torch.dtype]:
    if cfg.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(cfg.device)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device={cfg.device} but CUDA is not available; use --device cpu "
                             f"or --device auto")
    if cfg.dtype == "auto":
        use_bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
        dtype = torch.bfloat16 if use_bf16 else torch.float32
    else:
        dtype = getattr(torch, cfg.dtype)
    return device, dtype


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    import platform

    return f"cpu ({platform.machine()}, {torch.get_num_threads()} threads)"


def lr_at(it: int, cfg: TrainConfig) -> float:
    """Linear warm-up, then cosine decay to min_lr at lr_decay_iters."""
    if not cfg.decay_lr:
        return cfg.learning_rate
    if it < cfg.warmup_iters:
        return cfg.learning_rate * (it + 1) / (cfg.warmup_iters + 1)
    decay_iters = cfg.lr_decay_iters or cfg.max_iters
    if it >= decay_iters:
        return cfg.min_lr
    ratio = (it - cfg.warmup_iters) / max(1, decay_iters - cfg.warmup_iters)
    return cfg.min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (cfg.learning_rate - cfg.min_lr)


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig, device: torch.device):
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    optimizer = levers.OptimizerInBackward if cfg.optimizer_in_backward else torch.optim.AdamW
    return optimizer(groups, lr=cfg.learning_rate, betas=(cfg.beta1, cfg.beta2),
                     fused=device.type == "cuda")


def flops_per_token(model) -> float:
    """nanoGPT's estimate: 6N for the matmuls plus the attention scores, forward and backward."""
    c = model.config
    return 6 * model.num_params() + 12 * c.n_layer * c.n_embd * c.block_size


def startup_report(cfg, model, device, dtype, batch_size, block_size, layers) -> list[str]:
    tokens = batch_size * block_size * cfg.gradient_accumulation_steps
    mc = model.config
    lines = [
        f"number of parameters: {model.num_params() / 1e6:.2f}M",
        f"device: {device_name(device)}, dtype: {str(dtype).replace('torch.', '')}"
        f"{' (autocast)' if device.type == 'cuda' and dtype != torch.float32 else ''}",
        f"tokens per iteration will be: {tokens:,} "
        f"({cfg.gradient_accumulation_steps} x {batch_size} x {block_size})",
    ]
    if mc.gradient_checkpointing:
        which = "all" if len(layers) == mc.n_layer else ",".join(map(str, layers))
        lines.append(f"✓ Gradient checkpointing: ENABLED (policy: {mc.checkpoint_policy}, "
                     f"blocks: {which} of {mc.n_layer})")
    else:
        lines.append("✗ Gradient checkpointing: DISABLED")
    return lines


class Trainer:
    def __init__(self, cfg: TrainConfig, callbacks: list | None = None, quiet: bool = False):
        planner.use_expandable_segments()  # before CUDA starts
        self.device, self.dtype = resolve_device(cfg)
        self.dist, self.device = distributed.init(self.device, cfg)
        self.quiet = quiet or not self.dist.is_main  # only rank 0 prints
        self.free_gb, self.device_gb = device_memory_gb(self.device)  # before the model exists
        _, self.block_size = cfg.resolved_batch(self.device.type)
        torch.manual_seed(cfg.seed)
        self.loader = BatchLoader(cfg.data_dir, cfg.dataset, 1, self.block_size,
                                  self.device, seed=cfg.seed + self.dist.rank)  # own stream per rank
        # compile, lean loss, batch and a budget's plan, where cfg leaves them to the machine;
        # every rank plans for the least free memory, so all choose alike
        self.setup = planner.Planner(self.loader.vocab_size, self.device.type, self.dtype,
                                     self.dist.world_size).setup(
            cfg, min(distributed.gather(self.free_gb)), self.device_gb)
        self.cfg = cfg = self.setup.cfg
        self.batch_size, _ = cfg.resolved_batch(self.device.type)
        self.loader.batch_size = self.batch_size
        self.model_config = cfg.model_config(self.loader.vocab_size, self.block_size)
        self.compile = cfg.compile
        if cfg.activation_memory_budget < 1.0 and not self.compile:
            raise ValueError(f"activation_memory_budget={cfg.activation_memory_budget} acts only "
                             f"on compiled blocks and compile is off on {self.device.type}; set "
                             f"--compile true or the budget to 1")
        self.prediction = self.setup.prediction
        self.recommended_batch_size = self.setup.recommended
        self.model = build_model(self.model_config).to(self.device)
        self.layers = checkpointed_layers(self.model_config)
        if self.dist.world_size > 1:
            torch.manual_seed(cfg.seed + self.dist.rank)  # same initial weights, own dropout masks
        # the module to train through (DDP wrapper, or self.model sharded in place by FSDP2)
        self.wrapped = distributed.parallelize(self.model, self.dist, self.device, self.compile)
        self.optimizer = make_optimizer(self.model, cfg, self.device)
        self.memory = MemoryMonitorCallback(self.device)
        self.callbacks = [self.memory] + list(callbacks or [])
        self.autocast = (torch.autocast(self.device.type, dtype=self.dtype)
                         if self.dtype != torch.float32 else contextlib.nullcontext())
        self.iter_num = 0
        self.snapshot_path = Path(cfg.out_dir) / "snapshot.pt"
        if cfg.init_from == "resume":
            self._load_snapshot()

    def memory_report(self) -> list[str]:
        """The startup report's memory lines: levers, plan, predicted peak, recommended batch."""
        return self.setup.lines

    def log(self, msg: str) -> None:
        if not self.quiet:
            print(msg, flush=True)

    # -- snapshots ---------------------------------------------------------------------
    def _save_snapshot(self) -> None:
        # every rank takes part (FSDP2 gathers the shards); rank 0 writes
        model_state, optimizer_state = distributed.full_state_dicts(self.model, self.optimizer)
        rng = {"cpu": torch.get_rng_state(), "data": self.loader.generator.get_state()}
        if self.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(self.device)
        rng_per_rank = distributed.gather(rng)  # each rank has its own data stream and dropout
        if not self.dist.is_main:
            return
        state = {"model": model_state, "optimizer": optimizer_state, "iter_num": self.iter_num,
                 "config": self.cfg.to_dict(), "rng": rng_per_rank}
        with atomic_path(self.snapshot_path) as tmp:
            torch.save(state, tmp)

    def _load_snapshot(self) -> None:
        if not self.snapshot_path.is_file():
            raise ValueError(f"init_from=resume but {self.snapshot_path} does not exist; train with "
                             f"--save_snapshot true first or use --init_from scratch")
        state = torch.load(self.snapshot_path, map_location="cpu", weights_only=True)
        if len(state["rng"]) != self.dist.world_size:
            raise ValueError(f"{self.snapshot_path} was written by {len(state['rng'])} process(es), "
                             f"this run has {self.dist.world_size}; resume with the same number "
                             f"(torchrun --nproc_per_node) or use --init_from scratch")
        distributed.load_full_state_dicts(self.model, self.optimizer, state["model"],
                                          state["optimizer"])
        self.iter_num = state["iter_num"]
        rng = state["rng"][self.dist.rank]
        torch.set_rng_state(rng["cpu"])
        self.loader.generator.set_state(rng["data"])
        if "cuda" in rng and self.device.type == "cuda":
            torch.cuda.set_rng_state(rng["cuda"], self.device)

    # -- evaluation --------------------------------------------------------------------
    @torch.no_grad()
    def estimate_loss(self) -> dict[str, float]:
        """Mean loss over eval_iters batches per split; the same batches at every evaluation."""
        self.model.eval()
        saved = self.loader.generator.get_state()
        out = {}
        for split in ("train", "val"):
            self.loader.generator.manual_seed(self.cfg.seed + 1)
            losses = []
            for _ in range(self.cfg.eval_iters):
                x, y = self.loader.get_batch(split)
                with self.autocast:
                    losses.append(self.model(x, y)[1].item())
            out[split] = sum(losses) / len(losses)
        self.loader.generator.set_state(saved)
        self.model.train()
        return out

    # -- training ----------------------------------------------------------------------
    def train_step(self) -> float:
        """One optimizer step over gradient_accumulation_steps micro-batches; returns the loss."""
        cfg = self.cfg
        for group in self.optimizer.param_groups:
            group["lr"] = lr_at(self.iter_num, cfg)
        total = 0.0
        micro_steps = cfg.gradient_accumulation_steps // self.dist.world_size  # per rank
        for k in range(micro_steps):
            x, y = self.loader.get_batch("train")
            with distributed.sync_gradients(self.wrapped, sync=k == micro_steps - 1):
                with self.autocast, levers.forward_context(cfg):
                    loss = self.wrapped(x, y)[1] / micro_steps  # the logits are not kept
                loss.backward()
            total += loss.detach()
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return distributed.mean_over_ranks(total)  # the loss of the global batch

    def run(self) -> dict:
        cfg = self.cfg
        for line in startup_report(cfg, self.model, self.device, self.dtype, self.batch_size,
                                   self.block_size, self.layers) + self.memory_report():
            self.log(line)
        if self.dist.parallelism != "none":
            self.log(f"distributed: {self.dist.parallelism.upper()} over {self.dist.world_size} "
                     f"rank(s), {cfg.gradient_accumulation_steps // self.dist.world_size} "
                     f"micro-step(s) of {self.batch_size} x {self.block_size} per rank per iteration")
        tokens_per_iter = self.batch_size * self.block_size * cfg.gradient_accumulation_steps
        peak_flops = next((v for k, v in PEAK_FLOPS.items() if k in device_name(self.device)), None)
        if peak_flops:
            peak_flops *= self.dist.world_size  # tokens_per_iter is global: MFU per device
        step_times, losses, evals = [], [], {}
        start_iter, first = self.iter_num, True
        self.model.train()
        while True:
            at_end = self.iter_num >= cfg.max_iters
            if at_end or (self.iter_num > start_iter and self.iter_num % cfg.eval_interval == 0):
                evals = self.estimate_loss()
                self.log(f"step {self.iter_num}: train loss {evals['train']:.4f}, "
                         f"val loss {evals['val']:.4f}")
                if cfg.save_snapshot:
                    self._save_snapshot()
            if at_end:
                break
            t0 = time.perf_counter()
            loss = self.train_step()
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            dt = time.perf_counter() - t0
            losses.append((self.iter_num, loss))
            if first:  # warm-up done: the optimizer state exists, compile has run
                for cb in self.callbacks:
                    getattr(cb, "on_warmup_end", lambda: None)()
                first = False
            else:
                step_times.append(dt)
                for cb in self.callbacks:
                    getattr(cb, "on_step_end", lambda i: None)(self.iter_num)
            if self.iter_num % cfg.log_interval == 0 or self.iter_num == cfg.max_iters - 1:
                record = {"iter": self.iter_num, "loss": loss, "time_ms": dt * 1000,
                          "tokens_per_sec": tokens_per_iter / dt}
                if peak_flops:
                    record["mfu"] = flops_per_token(self.model) * tokens_per_iter / dt / peak_flops
                for cb in self.callbacks:
                    getattr(cb, "on_log", lambda r: None)(record)
                self.log(format_log_line(record))
            self.iter_num += 1
        return self._metrics(step_times, losses, evals, tokens_per_iter, peak_flops)

    def _metrics(self, step_times, losses, evals, tokens_per_iter, peak_flops) -> dict:
        mc = self.model_config
        step = statistics.median(step_times) if step_times else None
        measured = bool(self.memory.trace)
        # every rank's (peak, reserved); the run's figure is the largest
        peaks = distributed.gather((self.memory.peak_gb, self.memory.peak_reserved_gb))
        return {
            "preset": self.cfg.preset,
            "params": self.model.num_params(),
            "gradient_checkpointing": mc.gradient_checkpointing,
            "policy": mc.checkpoint_policy if mc.gradient_checkpointing else "none",
            "checkpointed_blocks": len(self.layers),
            "batch_size": self.batch_size,
            "block_size": self.block_size,
            "gradient_accumulation_steps": self.cfg.gradient_accumulation_steps,
            "tokens_per_iter": tokens_per_iter,
            "iters": self.iter_num,
            "device": self.device.type,
            "device_name": device_name(self.device),
            "dtype": str(self.dtype).replace("torch.", ""),
            "torch_version": torch.__version__,
            "world_size": self.dist.world_size,
            "parallelism": self.dist.parallelism,
            "peak_memory_gb": max(p for p, _ in peaks) if measured else None,
            "peak_memory_gb_per_rank": [p for p, _ in peaks] if measured else None,
            "peak_reserved_gb": max(r for _, r in peaks) if measured else None,
            "peak_memory_source": self.memory.source,
            "predicted_peak_gb": self.prediction.peak_gb,
            # allocator peaks only: a CPU run measures the whole process's resident memory
            "predicted/measured": self.prediction.peak_gb / max(p for p, _ in peaks)
            if measured and self.device.type == "cuda" else None,
            "recommended_batch_size": self.recommended_batch_size,
            "compile": self.compile,
            "lean_loss": mc.lean_loss,
            "offload_activations": self.cfg.offload_activations,
            "optimizer_in_backward": self.cfg.optimizer_in_backward,
            "activation_memory_budget": self.cfg.activation_memory_budget,
            "step_time_ms": step * 1000 if step else None,
            "tokens_per_sec": tokens_per_iter / step if step else None,
            "mfu": flops_per_token(self.model) * tokens_per_iter / step / peak_flops
            if step and peak_flops else None,
            "final_train_loss": evals.get("train"),
            "final_val_loss": evals.get("val"),
            "last_step_loss": losses[-1][1] if losses else None,
            "oom": False,
            "_losses": losses,
        }


def format_log_line(r: dict) -> str:
    line = (f"iter {r['iter']}: loss {r['loss']:.4f}, time {r['time_ms']:.2f}ms, "
            f"tok/s {r['tokens_per_sec']:,.0f}")
    if "mfu" in r:
        line += f", mfu {r['mfu'] * 100:.2f}%"
    mem = [f"{k} {v:.3f}" for k, v in r.items() if k.startswith("memory/")]
    return line + (", " + ", ".join(mem) if mem else "")


def train(cfg: TrainConfig, callbacks: list | None = None, quiet: bool = False) -> dict:
    """Run training; write metrics_file and memory_trace_file when set. Returns the metrics."""
    trainer = Trainer(cfg, callbacks, quiet)
    try:
        metrics = trainer.run()
    except torch.cuda.OutOfMemoryError as e:
        b, advice = planner.oom_advice(trainer.setup, trainer.batch_size)
        metrics = {"preset": cfg.preset, "oom": True, "error": str(e).splitlines()[0],
                   "batch_size": trainer.batch_size, "block_size": trainer.block_size,
                   "predicted_peak_gb": trainer.prediction.peak_gb,
                   "device_memory_gb": trainer.device_gb, "recommended_batch_size": b,
                   "device_name": device_name(trainer.device), "torch_version": torch.__version__}
        if cfg.metrics_file:
            write_json(cfg.metrics_file, metrics)
        if cfg.memory_trace_file:  # no step finished: an empty trace, not a missing one
            write_tsv(cfg.memory_trace_file, TRACE_HEADER, [])
        raise TrainingOOM(
            f"batch_size {trainer.batch_size} x {trainer.block_size} needs about "
            f"{trainer.prediction.peak_gb:.1f} GiB (predicted); the device has "
            f"{trainer.device_gb:.1f} GiB ({trainer.free_gb:.1f} GiB free at start); use "
            f"{advice}") from None
    trainer.wrapped = None  # DDP goes before the process group (see distributed.close)
    distributed.close()  # every rank is past its last collective
    losses = metrics.pop("_losses")
    if cfg.metrics_file and trainer.dist.is_main:
        write_json(cfg.metrics_file, metrics)
    if cfg.memory_trace_file and trainer.dist.is_main:  # rank 0's own steps
        peaks = {i: (p, r) for i, p, r in trainer.memory.trace}
        rows = [(i, loss, *peaks.get(i, (float("nan"), float("nan")))) for i, loss in losses]
        write_tsv(cfg.memory_trace_file, TRACE_HEADER, rows)
    metrics["losses"] = [loss for _, loss in losses]
    return metrics
