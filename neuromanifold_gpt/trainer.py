"""The training loop: gradient accumulation, clipping, bf16 autocast on CUDA, periodic
evaluation, and the callbacks that measure memory; `train` runs it and writes the run's files.
The optimizer and schedule (optim.py), snapshots (snapshot.py) and what a run reports
(reporting.py) live in their own modules."""

from __future__ import annotations

import contextlib
import functools
import math
import time
from pathlib import Path

import torch

from . import distributed, levers, planner, reporting
from .config.base import TrainConfig
from .data import BatchLoader, open_dataset
from .device import resolve_device
from .errors import NonFiniteLoss, TrainingOOM, leave_now
from .files import check_outputs, sweep_stale_temps
from .memory import MemoryMonitorCallback
from .model import NeuroManifoldGPT
from .optim import lr_at, make_optimizer
from .planner import Plan, PlanReport
from .predictor import device_memory_gb
from .record import RunRecord
from .snapshot import load_snapshot, save_snapshot, snapshot_path
from .timeline import StepTimelineCallback, write_timeline


class RanksOutOfMemory(RuntimeError):
    """Some rank ran out of CUDA memory at a point every rank reached: all stop, rank 0 reports."""


class Trainer:
    """Trains the model a Plan describes; cfg gives only what the plan does not decide (the
    schedule, evaluation, outputs and seed)."""

    def __init__(self, cfg: TrainConfig, plan: Plan, report: PlanReport, memory_gb: tuple[float, float],
                 callbacks: list | None = None, quiet: bool = False):
        self.cfg, self.plan, self.report = cfg, plan, report
        self.device, self.dtype, self.dist = plan.device, plan.dtype, plan.dist
        self.free_gb, self.device_gb = memory_gb  # before the model existed
        self.quiet = quiet or not self.dist.is_main  # only rank 0 prints
        self.batch_size, self.block_size = plan.batch_size, plan.block_size
        self.loader = BatchLoader(cfg.data.data_dir, cfg.data.dataset, self.batch_size, self.block_size,
                                  self.device, seed=cfg.system.seed + self.dist.rank)  # own stream per rank
        self.memory = MemoryMonitorCallback(self.device, count_tensors=not plan.compile)
        self.callbacks = [self.memory] + list(callbacks or [])
        self.autocast = (torch.autocast(self.device.type, dtype=self.dtype)
                         if self.dtype != torch.float32 else contextlib.nullcontext())
        self.iter_num = 0
        self.snapshot_path = snapshot_path(cfg.evaluation.out_dir)
        self.apart = False  # ranks may be waiting in different collectives (no agreement then)
        self.model = self.wrapped = None
        self.ahead = None  # (the generator's state before it, the next training batch)
        # called with "forward", "backward" and "optimizer" as each phase of a step begins; a
        # hook on the model would be traced by compile and recompile it
        self.on_phase = lambda phase: None

    def build(self) -> None:
        """Where device memory is first taken: the model on the device, the plan applied
        (checkpointing, compile, DDP/FSDP2), its optimizer and (init_from=resume) the
        snapshot's state."""
        cfg, plan = self.cfg, self.plan
        torch.manual_seed(cfg.system.seed)
        self.model = self.agreed(lambda: NeuroManifoldGPT(plan.model).to(self.device))
        if self.dist.world_size > 1:
            torch.manual_seed(cfg.system.seed + self.dist.rank)  # same initial weights, own dropout masks
        # the module to train through (DDP wrapper, or self.model sharded in place by FSDP2);
        # DDP's constructor broadcasts the weights
        self.wrapped = distributed.parallelize(self.model, plan)
        self.optimizer = make_optimizer(self.model, cfg.optimizer, plan.levers, self.device)
        if cfg.evaluation.init_from == "resume":
            self.apart = self.dist.parallelism == "fsdp"  # FSDP2 scatters the loaded state
            self.iter_num = self.agreed(lambda: load_snapshot(
                self.snapshot_path, self.model, self.optimizer, self.loader.generator,
                self.device, self.dist, cfg.to_dict()))
            self.apart = False

    def agreed(self, work):
        """work(), then every rank learns whether any rank ran out of CUDA memory in it, so
        that all stop together instead of waiting for dist_timeout in a collective."""
        error, result = None, None
        try:
            result = work()
        except torch.cuda.OutOfMemoryError as e:
            if self.apart and self.dist.world_size > 1:
                raise  # the others wait in a collective this rank cannot join: it reports alone
            error = e
        message = distributed.first_failure(error, self.device)
        if message is not None:
            raise RanksOutOfMemory(message)
        return result

    def new_step(self) -> None:
        """Before each forward: compiled CUDA graphs may then reuse the last step's outputs'
        memory (Plan.cuda_graphs, planner.settle)."""
        if self.plan.cuda_graphs:
            torch.compiler.cudagraph_mark_step_begin()

    def next_batch(self):
        """The next training batch: the one fetched ahead, else a fresh one."""
        if self.ahead is None:
            return self.loader.get_batch("train")
        batch, self.ahead = self.ahead[1], None
        return batch

    def fetch_ahead(self) -> None:
        """Draw the next step's first batch while the device still runs this step's work, so
        that the next step does not begin by waiting for the host to read and copy it."""
        self.ahead = (self.loader.generator.get_state(), self.loader.get_batch("train"))

    def drop_ahead(self) -> None:
        """Undraw the batch fetched ahead: the generator's state is then that of a run that
        never fetched ahead, as a snapshot must record it."""
        if self.ahead is not None:
            self.loader.generator.set_state(self.ahead[0])
            self.ahead = None

    def log(self, msg: str) -> None:
        if not self.quiet:
            print(msg, flush=True)

    # -- evaluation --------------------------------------------------------------------
    @torch.no_grad()
    def estimate_loss(self) -> dict[str, float]:
        """Mean loss over eval_iters batches per split; the same batches at every evaluation
        (none when eval_iters is 0)."""
        if not self.cfg.evaluation.eval_iters:
            return {}
        self.model.eval()
        saved = self.loader.generator.get_state()
        out = {}
        for split in ("train", "val"):
            self.loader.generator.manual_seed(self.cfg.system.seed + 1)
            losses = []
            for _ in range(self.cfg.evaluation.eval_iters):
                x, y = self.loader.get_batch(split)
                self.new_step()
                with self.autocast:
                    losses.append(self.model(x, y)[1].item())
            out[split] = sum(losses) / len(losses)
        self.loader.generator.set_state(saved)
        self.model.train()
        return out

    # -- training ----------------------------------------------------------------------
    def train_step(self) -> torch.Tensor:
        """One optimizer step over gradient_accumulation_steps micro-batches; returns this
        rank's loss."""
        plan = self.plan
        for group in self.optimizer.param_groups:
            group["lr"] = lr_at(self.iter_num, self.cfg.optimizer)
        total = 0.0
        micro_steps = plan.micro_steps
        self.apart = True  # forward and backward: DDP all-reduces, FSDP2 gathers and scatters
        for k in range(micro_steps):
            x, y = self.next_batch()
            self.new_step()
            with distributed.sync_gradients(self.wrapped, sync=k == micro_steps - 1):
                self.on_phase("forward")
                with self.autocast, levers.forward_context(plan.levers):
                    loss = self.wrapped(x, y)[1] / micro_steps  # the logits are not kept
                self.on_phase("backward")
                loss.backward()
            total += loss.detach()
        self.apart = False
        if plan.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), plan.grad_clip)
        self.on_phase("optimizer")
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return total

    def step(self, first: bool) -> tuple[torch.Tensor, float]:
        """A step and the memory callbacks after it; returns this rank's loss and the step's
        time in seconds."""
        t0 = time.perf_counter()
        with self.memory.counting():
            loss = self.train_step()
        if self.iter_num + 1 < self.cfg.optimizer.max_iters:  # another step follows
            self.fetch_ahead()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        dt = time.perf_counter() - t0
        if first:  # warm-up done: the optimizer state exists, compile has run
            for cb in self.callbacks:
                getattr(cb, "on_warmup_end", lambda: None)()
        else:
            for cb in self.callbacks:
                getattr(cb, "on_step_end", lambda i: None)(self.iter_num)
        return loss, dt

    def nonfinite_message(self, where: str, value: float) -> str:
        return (f"the {where} loss became {value} at step {self.iter_num}; training diverged: lower "
                f"--learning_rate (now {self.cfg.optimizer.learning_rate:g}), raise --warmup_iters or set "
                f"--grad_clip (the metrics record the step)")

    def run(self) -> tuple[RunRecord, list[tuple[int, float]]]:
        """Train; the run's record and its (iteration, loss) per step."""
        cfg, opt, ev = self.cfg, self.cfg.optimizer, self.cfg.evaluation
        for line in reporting.startup_lines(self):
            self.log(line)
        tokens_per_iter = self.batch_size * self.block_size * self.plan.accumulation
        peak_flops = reporting.peak_flops(self.device, self.dist.world_size)
        flops_per_iter = reporting.flops_per_token(self.model) * tokens_per_iter
        step_times, losses, evals = [], [], {}
        start_iter, first = self.iter_num, True
        self.model.train()
        for cb in self.callbacks:
            getattr(cb, "on_train_begin", lambda t: None)(self)
        while True:
            at_end = self.iter_num >= opt.max_iters
            if ev.eval_iters and (at_end or (self.iter_num > start_iter
                                             and self.iter_num % ev.eval_interval == 0)):
                evals = self.estimate_loss()
                bad = [v for v in evals.values() if not math.isfinite(v)]
                if bad:
                    raise NonFiniteLoss(self.nonfinite_message("evaluation", bad[0]))
                self.log(f"step {self.iter_num}: train loss {evals['train']:.4f}, "
                         f"val loss {evals['val']:.4f}")
                if ev.save_snapshot:
                    self.drop_ahead()
                    save_snapshot(self.snapshot_path, self.model, self.optimizer,
                                  self.loader.generator, self.iter_num, cfg.to_dict(), self.device,
                                  self.dist)
            if at_end:
                break
            local_loss, dt = self.agreed(functools.partial(self.step, first))
            loss = distributed.mean_over_ranks(local_loss)  # the loss of the global batch
            if not math.isfinite(loss):
                raise NonFiniteLoss(self.nonfinite_message("training", loss))
            losses.append((self.iter_num, loss))
            if not first:
                step_times.append(dt)
            first = False
            if self.iter_num % ev.log_interval == 0 or self.iter_num == opt.max_iters - 1:
                record = {"iter": self.iter_num, "loss": loss, "time_ms": dt * 1000,
                          "tokens_per_sec": tokens_per_iter / dt}
                if peak_flops:
                    record["mfu"] = flops_per_iter / dt / peak_flops
                for cb in self.callbacks:
                    getattr(cb, "on_log", lambda r: None)(record)
                self.log(reporting.format_log_line(record))
            self.iter_num += 1
        for cb in self.callbacks:  # after the measured steps and the last evaluation
            getattr(cb, "on_train_end", lambda t: None)(self)
        return reporting.run_record(self, step_times, losses, evals, peak_flops), losses


def run_outputs(cfg: TrainConfig) -> dict[str, str | Path]:
    """The files a run writes, by the setting that names them ("" = not written)."""
    ev = cfg.evaluation
    return {"metrics_file": ev.metrics_file, "memory_trace_file": ev.memory_trace_file,
            "memory_timeline_file": ev.memory_timeline_file,
            "out_dir": snapshot_path(ev.out_dir) if ev.save_snapshot else ""}


def check_run(cfg: TrainConfig, world_size: int = 1, more_outputs: dict | None = None) -> None:
    """What a run would refuse, checked without starting it (launch.py, before torchrun starts
    any process): the device, the world size, the outputs, the dataset."""
    device, _ = resolve_device(cfg.system)
    cfg.check_rules(world_size)
    check_outputs(run_outputs(cfg) | (more_outputs or {}))
    open_dataset(cfg.data.data_dir, cfg.data.dataset, cfg.resolved_batch(device.type)[1])


def plan_run(cfg: TrainConfig) -> tuple[Plan, PlanReport, tuple[float, float]]:
    """Join the process group (under torchrun) and make the run's plan on this machine, before
    anything is built; also the device's (free, total) GiB the plan was made for."""
    planner.use_expandable_segments()  # before CUDA starts
    device, dtype = resolve_device(cfg.system)
    dist, device = distributed.init(device, cfg)
    memory_gb = device_memory_gb(device)
    meta, _ = open_dataset(cfg.data.data_dir, cfg.data.dataset, cfg.resolved_batch(device.type)[1])
    # every rank plans for the least free memory, so all choose alike
    free_gb = min(distributed.gather(memory_gb[0]))
    plan, report = planner.make_plan(cfg, meta["vocab_size"], device, dtype, dist, free_gb, memory_gb[1])
    return plan, report, memory_gb


def train(cfg: TrainConfig, callbacks: list | None = None, quiet: bool = False) -> dict:
    """Run training; write memory_trace_file, memory_timeline_file and then metrics_file when
    set (a failed run writes its record instead). Returns the metrics. Every output path is
    checked before any work; every way out leaves the process group."""
    timeline_file = cfg.evaluation.memory_timeline_file
    timeline = StepTimelineCallback(timeline_file) if timeline_file else None
    if timeline:
        callbacks = [*(callbacks or []), timeline]
    outputs = run_outputs(cfg)
    check_outputs(outputs)
    trainer = None
    try:
        trainer = Trainer(cfg, *plan_run(cfg), callbacks, quiet)
        try:
            trainer.build()
            sweep_stale_temps(*filter(None, outputs.values()))  # once every input is valid
            record, losses = trainer.run()
        except (torch.cuda.OutOfMemoryError, RanksOutOfMemory) as e:
            record, message = reporting.oom_record(trainer, e)
            alone = not isinstance(e, RanksOutOfMemory)  # mid-step: the others wait in a collective
            if trainer.dist.is_main or alone:  # agreed: rank 0 writes the record
                reporting.write_run_files(cfg, record, [])  # no step finished: an empty trace
                if timeline_file:
                    write_timeline(timeline_file, [])
            if alone and trainer.dist.world_size > 1:
                leave_now(TrainingOOM(message))
            raise TrainingOOM(message) from None
        except NonFiniteLoss as e:  # every rank sees the same (all-reduced) loss
            if trainer.dist.is_main:
                reporting.write_run_files(cfg, reporting.nonfinite_record(trainer, e), [])
                if timeline_file:
                    write_timeline(timeline_file, [])
            raise
    finally:
        if timeline:  # a recording an error cut short records nothing more
            timeline.close()
        if trainer is not None:
            trainer.wrapped = None  # DDP goes before the process group (see distributed.close)
        distributed.close()
    if trainer.dist.is_main:  # rank 0's own steps
        peaks = {i: (p, r) for i, p, r in trainer.memory.trace}
        rows = [(i, loss, *peaks.get(i, (float("nan"), float("nan")))) for i, loss in losses]
        reporting.write_run_files(cfg, record, rows)
    return record.as_json() | {"losses": [loss for _, loss in losses]}
