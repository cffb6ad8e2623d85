"""CUDA-only checks (skipped without a GPU): allocator-measured savings and unchanged training
with bf16 autocast, where fused dropout kernels draw from the CUDA RNG."""

import pytest
import torch

from neuromanifold_gpt.config.cli import parse_args
from neuromanifold_gpt.trainer import train

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def run(data_dir, *extra):
    args = ["--data_dir", str(data_dir), "--dataset", "tiny", "--device", "cuda", "--n_layer", "4",
            "--n_head", "4", "--n_embd", "256", "--batch_size", "32", "--block_size", "512",
            "--max_iters", "5", "--eval_iters", "2", "--dropout", "0.2", "--log_interval", "100"]
    return train(parse_args(args + list(extra)), quiet=True)


def test_every_policy_saves_allocator_memory_and_keeps_the_losses(data_dir):
    base = run(data_dir)
    assert base["peak_memory_source"] == "torch.cuda.max_memory_allocated"
    for policy in ("block", "attention", "mlp", "selective"):
        ck = run(data_dir, "--gradient_checkpointing", "true", "--checkpoint_policy", policy)
        assert ck["peak_memory_gb"] < base["peak_memory_gb"], policy
        assert ck["losses"] == pytest.approx(base["losses"], rel=1e-3), policy


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


@pytest.mark.parametrize("shared_direction", [False, True], ids=["random head", "shared direction"])
def test_lean_loss_on_cuda_matches_fp64_within_bf16_rounding(shared_direction):
    """The lean loss as CUDA runs it (each chunk's arithmetic compiled) under bf16 autocast at
    GPT-2's vocabulary, against the fp64 loss. A head whose rows share a direction, as a
    trained head's do, makes the gradient's sums cancel: only fp32 sums keep it (cut-cross-
    entropy's bf16 ones do not: `python3 -m benchmarks.loss_kernels` measures the differences)."""
    from neuromanifold_gpt.loss import linear_cross_entropy

    g = torch.Generator(device="cuda").manual_seed(0)
    N, C, V = 4096, 768, 50304
    x = torch.randn(N, C, device="cuda", generator=g).requires_grad_()
    common = 0.02 * torch.randn(C, device="cuda", generator=g) if shared_direction else 0.0
    w = (0.02 * torch.randn(V, C, device="cuda", generator=g) + common).requires_grad_()
    t = torch.randint(0, 50257, (N,), device="cuda", generator=g)
    t[::9] = -100  # ignored positions count in neither
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = linear_cross_entropy(x, w, t)
    (2 * loss).backward()  # a non-unit upstream gradient
    lean = (loss.detach(), x.grad, w.grad)
    x.grad = w.grad = None
    exact = torch.nn.functional.cross_entropy(x.double() @ w.double().t(), t)
    (2 * exact).backward()
    assert lean[1].dtype == lean[2].dtype == torch.float32  # gradients in the weights' dtype
    assert abs(float(lean[0]) - float(exact)) < 1e-3
    assert _rel(lean[1], x.grad) < 1e-2 and _rel(lean[2], w.grad) < 1e-2


@pytest.mark.parametrize("plan", [
    ("--gradient_checkpointing", "true", "--checkpoint_policy", "block", "--lean_loss", "true"),
    ("--gradient_checkpointing", "true", "--checkpoint_policy", "block", "--lean_loss", "false"),
    ("--gradient_checkpointing", "false", "--lean_loss", "false"),
    ("--gradient_checkpointing", "false", "--lean_loss", "true")],
    ids=["blocks: block +lean", "whole model: block", "whole model: none", "blocks: none +lean"])
def test_cuda_graphs_train_as_the_same_kernels_launched_one_by_one(data_dir, plan):
    """On CUDA the compiled code replays as CUDA graphs: each block and the loss region with the
    lean loss, else the whole model. With evaluations between steps (other graphs, replayed in
    between), the losses and the evaluation are those of the same compiled kernels launched one
    by one. With two micro-steps a step no graph is made: a replay would overwrite the gradients
    the first micro-step left for the second to add to."""
    from unittest import mock

    from torch._inductor import cudagraph_trees

    flags = ("--compile", "true", *plan, "--eval_interval", "2", "--dropout", "0.0")

    def recorded(*extra):
        torch._dynamo.reset()
        with mock.patch.object(cudagraph_trees, "cudagraphify_impl",
                               wraps=cudagraph_trees.cudagraphify_impl) as record:
            return run(data_dir, *flags, *extra), record.call_count

    try:
        graphs, made = recorded()
        assert made >= 2  # at least the forward and backward graphs
        assert graphs["cuda_graphs"] is True
        launched, none_made = recorded("--cuda_graphs", "false")
        assert none_made == 0 and launched["cuda_graphs"] is False
        assert graphs["losses"] == pytest.approx(launched["losses"], rel=1e-5)
        assert graphs["final_val_loss"] == pytest.approx(launched["final_val_loss"], rel=1e-5)
        accumulated, made = recorded("--gradient_accumulation_steps", "2")
        assert made == 0 and len(accumulated["losses"]) == 5
    finally:
        torch._dynamo.reset()  # the graphs' memory would count in a later test's peak


@pytest.mark.parametrize("checkpointing", ["false", "true"])
def test_the_in_step_curve_under_cuda_graphs_reaches_the_runs_peak(data_dir, tmp_path, checkpointing):
    """Replayed graphs keep their tensors in a pool the allocator no longer counts; the step
    that captures them is recorded, so the curve still climbs to the run's peak."""
    from neuromanifold_gpt.plots import read_trace

    path = tmp_path / "t.tsv"
    try:
        torch._dynamo.reset()
        m = run(data_dir, "--compile", "true", "--gradient_checkpointing", checkpointing,
                "--memory_timeline_file", str(path))
        assert m["cuda_graphs"] is True
        tl = read_trace(path)
        assert max(tl["allocated_gb"]) == pytest.approx(m["peak_memory_gb"], rel=0.02)
    finally:
        torch._dynamo.reset()
