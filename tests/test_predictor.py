"""The memory predictor: its figures against counted memory, the recommended batch size,
the startup report, the metrics, and the out-of-memory exit."""

import json

import numpy as np
import pytest
import torch

import train
from neuromanifold_gpt import build_model, levers
from neuromanifold_gpt.config.base import TrainConfig
from neuromanifold_gpt.data import write_dataset
from neuromanifold_gpt.loss import LinearCrossEntropyLoss
from neuromanifold_gpt.optim import make_optimizer
from neuromanifold_gpt.planner import largest_batch
from neuromanifold_gpt.predictor import GIB, predict
from neuromanifold_gpt.trainer import Trainer
from tests.conftest import one_line_error, plan_of

VOCAB = 200


@pytest.mark.parametrize("preset, bias", [("gpt2", None), ("shakespeare_char", None),
                                          ("gpt2", False)])
def test_weights_gradients_and_adamw_states_are_counted_exactly(preset, bias):
    cfg = TrainConfig.from_flags(preset=preset, bias=bias)
    with torch.device("meta"):
        n = sum(p.numel() for p in build_model(cfg.model_config(VOCAB, 128)).parameters())
    p = predict(plan_of(cfg, VOCAB))
    b = p.breakdown
    assert b["params"] * GIB == 4 * n and b["optimizer"] * GIB == 8 * n
    assert p.phases["optimizer step"] * GIB == 16 * n  # weights + grads + AdamW, nothing else


def _tracked_peak_gb(cfg: TrainConfig, dtype: torch.dtype) -> float:
    """Peak of every tensor alive during one training step (after a warm-up step), counted
    tensor by tensor: on the CPU nothing else holds memory the predictor should know of."""
    from torch.distributed._tools.mem_tracker import MemTracker

    B, T = cfg.resolved_batch("cpu")
    torch.manual_seed(0)
    model = build_model(cfg.model_config(VOCAB, T), cfg.activation_checkpoint)
    if cfg.memory_levers.lean_loss:
        model.lean_loss = LinearCrossEntropyLoss()
    optimizer = make_optimizer(model, cfg.optimizer, cfg.memory_levers, torch.device("cpu"))
    x = torch.randint(0, VOCAB, (B, T))
    autocast = torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32)

    def step():
        with autocast, levers.forward_context(cfg.memory_levers):
            loss = model(x, x)[1]
        loss.backward()
        if cfg.optimizer.grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optimizer.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()
    tracker = MemTracker()
    tracker.track_external(model, optimizer)
    with tracker:
        step()
    return tracker.get_tracker_snapshot("peak")[torch.device("cpu")]["Total"] / GIB


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("overrides", [
    dict(),
    dict(lean_loss=True),
    dict(gradient_checkpointing=True),
    dict(gradient_checkpointing=True, checkpoint_policy="attention", lean_loss=True),
    dict(gradient_checkpointing=True, checkpoint_policy="mlp", lean_loss=True),
    dict(gradient_checkpointing=True, checkpoint_policy="selective", lean_loss=True),
    dict(gradient_checkpointing=True, lean_loss=True, optimizer_in_backward=True, grad_clip=0.0),
], ids=["plain", "lean", "block", "attention", "mlp", "selective", "in-backward"])
def test_eager_prediction_within_10_percent_of_counted_peak(overrides, dtype):
    cfg = TrainConfig.from_flags(preset="gpt2", n_layer=3, n_embd=128, n_head=4, batch_size=4,
                                 block_size=128, **overrides)
    measured = _tracked_peak_gb(cfg, dtype)
    predicted = predict(plan_of(cfg, VOCAB, dtype=dtype)).peak_gb
    assert abs(predicted / measured - 1) < 0.10, (predicted, measured)


def test_levers_lower_the_prediction_where_they_act():
    def peak(**kw):
        cfg = TrainConfig.from_flags(preset="gpt2", batch_size=12, block_size=1024, **kw)
        return predict(plan_of(cfg.with_flags(compile=True), 50257, "cuda")).peak_gb

    plain, lean = peak(lean_loss=False), peak(lean_loss=True)
    block = peak(lean_loss=True, gradient_checkpointing=True)
    budget = peak(lean_loss=True, activation_memory_budget=0.25)
    offload = peak(lean_loss=True, gradient_checkpointing=True, offload_activations=True)
    assert block < budget < lean < plain
    assert offload < block


def test_the_cuda_lean_loss_holds_one_chunk_of_logits_in_the_compute_dtype():
    """On CUDA the compiled chunk arithmetic writes the logits' gradient over them: the loss's
    phase grows by one bf16 (c, V) buffer per token of chunk, not two."""
    cfg = TrainConfig.from_flags(preset="gpt2", batch_size=12, block_size=1024, lean_loss=True,
                                 compile=True)
    loss_gib = {c: predict(plan_of(cfg.with_flags(loss_chunk_tokens=c), 50257, "cuda")).phases["loss"]
                for c in (512, 2048)}
    head_rows = cfg.model_config(50257).padded_vocab_size  # 50304
    assert (loss_gib[2048] - loss_gib[512]) * GIB == pytest.approx(2 * (2048 - 512) * head_rows)


def test_largest_batch_is_the_largest_that_fits():
    plan = plan_of(TrainConfig.from_flags(preset="gpt2", block_size=1024, compile=True, lean_loss=False),
                   50257, "cuda")
    b = largest_batch(plan, 36.0)
    assert predict(plan, b).peak_gb <= 36.0 < predict(plan, b + 1).peak_gb
    assert largest_batch(plan, 0.5) == 0  # not even one sequence


def _args(data_dir, tmp_path, *extra):
    return ["--dataset", "tiny", "--data_dir", str(data_dir), "--out_dir", str(tmp_path / "out"),
            "--n_layer", "1", "--n_embd", "32", "--n_head", "2", "--batch_size", "2",
            "--block_size", "16", "--max_iters", "2", "--eval_iters", "1",
            "--metrics_file", str(tmp_path / "metrics.json"), *extra]


def test_startup_report_and_metrics_carry_the_prediction(data_dir, tmp_path, capsys):
    assert train.main(_args(data_dir, tmp_path, "--lean_loss", "true")) == 0
    out = capsys.readouterr().out
    assert "compile: off (auto); memory levers: lean loss" in out
    assert "predicted peak memory:" in out and "recommended batch size:" in out
    m = json.loads((tmp_path / "metrics.json").read_text())
    assert m["predicted_peak_gb"] > 0 and m["recommended_batch_size"] > 0
    assert m["predicted/measured"] is None  # a CPU run measures the process, not tensors
    assert m["compile"] is False and m["lean_loss"] is True and m["oom"] is False


def test_cuda_out_of_memory_ends_with_one_line_exit_3_and_metrics(data_dir, tmp_path, capsys,
                                                                  monkeypatch):
    def out_of_memory(self):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(Trainer, "train_step", out_of_memory)
    trace = tmp_path / "trace.tsv"
    assert train.main(_args(data_dir, tmp_path) + ["--memory_trace_file", str(trace)]) == 3
    err = one_line_error(capsys)
    assert "GiB (predicted)" in err and "the device has" in err
    assert "--batch_size" in err
    m = json.loads((tmp_path / "metrics.json").read_text())
    assert m["oom"] is True and m["batch_size"] == 2
    assert m["predicted_peak_gb"] > 0 and 0 < m["recommended_batch_size"] < m["batch_size"]
    assert trace.read_text() == "step\tloss\tpeak_memory_gb\tpeak_reserved_gb\n"  # empty, not missing


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("compile", [False, True])
@pytest.mark.parametrize("overrides", [dict(lean_loss=False),
                                       dict(gradient_checkpointing=True, lean_loss=True),
                                       dict(gradient_checkpointing=True, checkpoint_policy="mlp",
                                            lean_loss=False)])
def test_prediction_within_10_percent_of_cuda_peak(tmp_path, overrides, compile):
    """At 32 x 512 tokens. The predictor leaves out 0.14-0.39 GiB that does not grow with the
    batch: at 8 x 512 the lean-loss cases' predicted / measured was 0.81-0.90 on the H200, at
    32 x 512 0.96-0.98. A fresh compile cache: graphs an earlier test left would count in this
    run's peak."""
    from neuromanifold_gpt.trainer import train as run

    torch._dynamo.reset()
    ids = np.random.default_rng(0).integers(0, 50257, 100_000)
    write_dataset(tmp_path / "gpt2ids", ids, dict(vocab_size=50257))
    cfg = TrainConfig.from_flags(dataset="gpt2ids", data_dir=str(tmp_path), preset="gpt2",
                                 n_layer=4, batch_size=32, block_size=512, max_iters=3,
                                 eval_iters=1, compile=compile, **overrides)
    m = run(cfg, quiet=True)
    assert abs(m["predicted/measured"] - 1) < 0.10, m["predicted/measured"]


def test_compiled_coefficient_matches_what_the_partitioner_saves():
    """The compiled per-layer coefficient against a count: the bytes compile's min-cut
    partitioner hands from forward to backward for one bf16-autocast block on the CPU (the
    activations only, not the weights). Measured: 44.5 bytes per token x width against the
    predictor's 36 (CUDA-calibrated; the CPU attention also keeps its log-sum-exp)."""
    from functorch.compile import min_cut_rematerialization_partition
    from torch._dynamo.backends.common import aot_autograd

    from neuromanifold_gpt.config.base import NeuroManifoldConfig
    from neuromanifold_gpt.predictor import _kept_per_layer

    B, T, C = 4, 64, 64
    saved = []

    def count_saved(gm, example_inputs):
        for node in gm.graph.find_nodes(op="placeholder"):
            val = node.meta.get("val")
            if not node.name.startswith("tangents") and val is not None and val.numel() >= B * T:
                saved.append(val.numel() * val.element_size())
        return gm

    backend = aot_autograd(fw_compiler=lambda gm, _: gm, bw_compiler=count_saved,
                           partition_fn=min_cut_rematerialization_partition)
    torch._dynamo.reset()
    block = build_model(NeuroManifoldConfig(block_size=T, n_layer=1, n_head=4, n_embd=C)).transformer.h[0]
    block.compile(backend=backend, dynamic=False)
    x = torch.randn(B, T, C, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = block(x)
    y.float().sum().backward()
    counted = sum(saved) / (B * T * C)
    predicted = _kept_per_layer("none", compiled=True, a=2, dropout=False)
    assert abs(predicted / counted - 1) < 0.25, (predicted, counted)
