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


def _fused_and_chunked(shared_direction: bool):
    """cut-cross-entropy's kernel (the lean loss on CUDA) and our chunked loss, both under bf16
    autocast at GPT-2's vocabulary, then the fp64 loss: each one's loss and gradients."""
    from neuromanifold_gpt.loss import (
        fused_linear_cross_entropy,
        linear_cross_entropy,
        uses_fused_kernel,
    )

    if not uses_fused_kernel("cuda", torch.bfloat16):
        pytest.fail("cut-cross-entropy is not installed: pip install -e '.[cuda]'")
    g = torch.Generator(device="cuda").manual_seed(0)
    N, C, V = 4096, 768, 50304
    x = torch.randn(N, C, device="cuda", generator=g).requires_grad_()
    common = 0.02 * torch.randn(C, device="cuda", generator=g) if shared_direction else 0.0
    w = (0.02 * torch.randn(V, C, device="cuda", generator=g) + common).requires_grad_()
    t = torch.randint(0, 50257, (N,), device="cuda", generator=g)
    t[::9] = -100  # ignored positions count in neither
    out = {}
    for name, fn in (("fused", fused_linear_cross_entropy), ("chunked", linear_cross_entropy)):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = fn(x, w, t)
        (2 * loss).backward()  # a non-unit upstream gradient
        out[name] = (loss.detach(), x.grad, w.grad)
        x.grad = w.grad = None
    exact = torch.nn.functional.cross_entropy(x.double() @ w.double().t(), t)
    (2 * exact).backward()
    out["exact"] = (exact.detach(), x.grad, w.grad)
    return out


def test_fused_kernel_matches_the_chunked_reference_within_bf16_rounding():
    out = _fused_and_chunked(shared_direction=False)
    (lf, gxf, gwf), (lc, gxc, gwc), (le, gxe, gwe) = out["fused"], out["chunked"], out["exact"]
    assert gxf.dtype == gwf.dtype == torch.float32  # gradients in the weights' dtype
    assert abs(float(lf) - float(lc)) < 2e-3 and abs(float(lf) - float(le)) < 2e-3
    assert _rel(gxf, gxc) < 2e-2 and _rel(gwf, gwc) < 2e-2
    assert _rel(gxf, gxe) < 2e-2 and _rel(gwf, gwe) < 2e-2


@pytest.mark.xfail(strict=True, raises=AssertionError, reason=(
    "cut-cross-entropy 25.1.1 sums the gradients' partial products in bf16 buffers "
    "(zeros_like(e)): with the head's rows sharing a direction, as a trained head's do, they "
    "cancel and its grad_x was 0.369 from the chunked loss's on the H200 (0.807 with its "
    "default filter_eps); the chunked loss keeps fp32 sums (tests/test_loss.py)"))
def test_fused_kernel_keeps_a_shared_direction_of_the_head():
    out = _fused_and_chunked(shared_direction=True)
    (_, gxf, gwf), (_, gxc, gwc) = out["fused"], out["chunked"]
    assert _rel(gxf, gxc) < 2e-2 and _rel(gwf, gwc) < 2e-2
