"""The training loop: AdamW, cosine schedule with warm-up, gradient accumulation, clipping,
bf16 autocast on CUDA, periodic evaluation, snapshots, and measured memory and speed."""

from __future__ import annotations

import contextlib
import math
import statistics
import time
from pathlib import Path

import torch

from . import build_model
from .config.base import TrainConfig
from .data import BatchLoader
from .memory import MemoryMonitorCallback
from .metrics import write_json, write_tsv

# Dense bf16 peak FLOP/s by device name, for MFU (the vendor's datasheet figures).
PEAK_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L4": 121e12, "A10": 125e12}


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
    return torch.optim.AdamW(groups, lr=cfg.learning_rate, betas=(cfg.beta1, cfg.beta2),
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
        self.cfg = cfg
        self.quiet = quiet
        self.device, self.dtype = resolve_device(cfg)
        self.batch_size, self.block_size = cfg.resolved_batch(self.device.type)
        torch.manual_seed(cfg.seed)
        self.loader = BatchLoader(cfg.data_dir, cfg.dataset, self.batch_size, self.block_size,
                                  self.device, seed=cfg.seed)
        self.model_config = cfg.model_config(self.loader.vocab_size, self.block_size)
        self.model = build_model(self.model_config).to(self.device)
        from .checkpointing import checkpointed_layers

        self.layers = checkpointed_layers(self.model_config)
        if cfg.compile:
            for block in self.model.transformer.h:
                block.compile()
        self.optimizer = make_optimizer(self.model, cfg, self.device)
        self.memory = MemoryMonitorCallback(self.device)
        self.callbacks = [self.memory] + list(callbacks or [])
        self.autocast = (torch.autocast(self.device.type, dtype=self.dtype)
                         if self.dtype != torch.float32 else contextlib.nullcontext())
        self.iter_num = 0
        self.snapshot_path = Path(cfg.out_dir) / "snapshot.pt"
        if cfg.init_from == "resume":
            self._load_snapshot()

    def log(self, msg: str) -> None:
        if not self.quiet:
            print(msg, flush=True)

    # -- snapshots ---------------------------------------------------------------------
    def _save_snapshot(self) -> None:
        state = {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "iter_num": self.iter_num,
            "config": self.cfg.to_dict(),
            "rng_cpu": torch.get_rng_state(),
            "rng_data": self.loader.generator.get_state(),
        }
        if self.device.type == "cuda":
            state["rng_cuda"] = torch.cuda.get_rng_state(self.device)
        self.snapshot_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.snapshot_path.with_suffix(".tmp")
        torch.save(state, tmp)
        tmp.replace(self.snapshot_path)

    def _load_snapshot(self) -> None:
        if not self.snapshot_path.is_file():
            raise ValueError(f"init_from=resume but {self.snapshot_path} does not exist; train with "
                             f"--save_snapshot true first or use --init_from scratch")
        state = torch.load(self.snapshot_path, map_location=self.device, weights_only=True)
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.iter_num = state["iter_num"]
        torch.set_rng_state(state["rng_cpu"])
        self.loader.generator.set_state(state["rng_data"])
        if "rng_cuda" in state and self.device.type == "cuda":
            torch.cuda.set_rng_state(state["rng_cuda"], self.device)

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
        for _ in range(cfg.gradient_accumulation_steps):
            x, y = self.loader.get_batch("train")
            with self.autocast:
                _, loss = self.model(x, y)
                loss = loss / cfg.gradient_accumulation_steps
            loss.backward()
            total += loss.detach()
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(total)

    def run(self) -> dict:
        cfg = self.cfg
        for line in startup_report(cfg, self.model, self.device, self.dtype, self.batch_size,
                                   self.block_size, self.layers):
            self.log(line)
        tokens_per_iter = self.batch_size * self.block_size * cfg.gradient_accumulation_steps
        peak_flops = next((v for k, v in PEAK_FLOPS.items() if k in device_name(self.device)), None)
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
            "peak_memory_gb": self.memory.peak_gb if measured else None,
            "peak_reserved_gb": self.memory.peak_reserved_gb if measured else None,
            "peak_memory_source": self.memory.source,
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
        metrics = {"preset": cfg.preset, "oom": True, "error": str(e).splitlines()[0],
                   "device_name": device_name(trainer.device), "torch_version": torch.__version__}
        if cfg.metrics_file:
            write_json(cfg.metrics_file, metrics)
        raise TrainingOOM(metrics["error"]) from None
    losses = metrics.pop("_losses")
    if cfg.metrics_file:
        write_json(cfg.metrics_file, metrics)
    if cfg.memory_trace_file:
        peaks = {i: (p, r) for i, p, r in trainer.memory.trace}
        rows = [(i, loss, *peaks.get(i, (float("nan"), float("nan")))) for i, loss in losses]
        write_tsv(cfg.memory_trace_file, ["step", "loss", "peak_memory_gb", "peak_reserved_gb"],
                  rows)
    metrics["losses"] = [loss for _, loss in losses]
    return metrics
