"""The lean loss equals the plain loss in value and gradients, and never holds the logits."""

import functools

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from neuromanifold_gpt import build_model
from neuromanifold_gpt.config.base import NeuroManifoldConfig
from neuromanifold_gpt.loss import (
    CHUNK_BYTES,
    LinearCrossEntropyLoss,
    _chunk_loss_and_grad,
    _compiled_chunk_loss_and_grad,
    chunk_tokens,
    linear_cross_entropy,
)


def _inputs(N=100, C=16, V=130, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, C, generator=g, dtype=dtype, requires_grad=True)
    w = torch.randn(V, C, generator=g, dtype=dtype, requires_grad=True)
    t = torch.randint(0, V, (N,), generator=g)
    t[::7] = -100  # ignored positions, as F.cross_entropy's default ignore_index
    return x, w, t


@pytest.mark.parametrize("chunk", [1, 33, 100, None])
def test_equals_plain_loss_and_gradients(chunk):
    x, w, t = _inputs()
    lean = linear_cross_entropy(x, w, t, chunk=chunk)
    (3 * lean).backward()  # a non-unit upstream gradient must scale the stored gradients
    gx, gw = x.grad.clone(), w.grad.clone()
    x.grad = w.grad = None
    plain = F.cross_entropy(x @ w.t(), t)
    (3 * plain).backward()
    torch.testing.assert_close(lean, plain, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(gx, x.grad, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(gw, w.grad, rtol=1e-10, atol=1e-12)


def test_compiled_cuda_chunk_arithmetic_equals_the_in_place_one():
    """CUDA runs each chunk's loss and gradient as one compiled expression (the one-hot a
    comparison, so compile writes no fp32 copy of the logits) whose result overwrites the
    logits; the CPU builds the gradient in place in an fp32 copy. Both give the same loss and
    gradient, here compiled for the CPU."""
    g = torch.Generator().manual_seed(0)
    logits = (3 * torch.randn(64, 1000, generator=g)).to(torch.bfloat16)
    targets = torch.randint(0, 1000, (64,), generator=g)
    weights = torch.rand(64, generator=g) * (torch.arange(64) % 5 != 0)  # ignored rows weigh 0
    loss, grad = _chunk_loss_and_grad(logits.clone(), targets, weights)
    for fused in (functools.partial(_chunk_loss_and_grad, fused=True), _compiled_chunk_loss_and_grad):
        for dtype in (torch.bfloat16, torch.float32):  # in fp32 the upcast is the logits themselves
            chunk = logits.to(dtype, copy=True)
            fused_loss, fused_grad = fused(chunk, targets, weights)
            # written over the logits: the chunk holds one (c, V) buffer, not two
            assert fused_grad.data_ptr() == chunk.data_ptr() and fused_grad.dtype == dtype
            torch.testing.assert_close(fused_loss, loss, rtol=1e-6, atol=1e-6)
            torch.testing.assert_close(fused_grad.bfloat16(), grad, rtol=1e-2, atol=1e-5)


def test_no_grad_computes_only_the_loss():
    x, w, t = _inputs()
    with torch.no_grad():
        lean = linear_cross_entropy(x, w, t, chunk=10)
    assert not lean.requires_grad
    torch.testing.assert_close(lean, F.cross_entropy(x @ w.t(), t).detach())


def test_bf16_autocast_matches_plain_within_bf16_rounding():
    x, w, t = _inputs(N=256, C=32, V=192, dtype=torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        lean = linear_cross_entropy(x, w, t, chunk=64)
    lean.backward()
    gx, gw = x.grad.clone(), w.grad.clone()
    assert gx.dtype == torch.float32 and gw.dtype == torch.float32
    x.grad = w.grad = None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        plain = F.cross_entropy((x @ w.t()).float(), t)
    plain.backward()
    torch.testing.assert_close(lean, plain, rtol=1e-3, atol=1e-3)
    assert (gx - x.grad).norm() / x.grad.norm() < 1e-2
    assert (gw - w.grad).norm() / w.grad.norm() < 1e-2


def test_bf16_autocast_keeps_a_shared_direction_of_the_head():
    """GPT-2's vocabulary, a head whose rows share a direction (as a trained head's do): the
    gradient's sum of p * w over the vocabulary then cancels the target row's share of it, and
    only sums kept in fp32 survive that (cut-cross-entropy 25.1.1's bf16 sums do not,
    tests/test_gpu.py). Against fp64."""
    g = torch.Generator().manual_seed(0)
    N, C, V = 512, 768, 50304
    x = torch.randn(N, C, generator=g).requires_grad_()
    common = 0.02 * torch.randn(C, generator=g)
    w = (0.02 * torch.randn(V, C, generator=g) + common).requires_grad_()
    t = torch.randint(0, 50257, (N,), generator=g)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        lean = linear_cross_entropy(x, w, t, chunk=64)
    lean.backward()
    gx, gw = x.grad, w.grad
    x.grad = w.grad = None
    F.cross_entropy(x.double() @ w.double().t(), t).backward()
    assert (gx - x.grad).norm() / x.grad.norm() < 1e-2
    assert (gw - w.grad).norm() / w.grad.norm() < 1e-2


def _model_pair(**kw):
    cfg = dict(block_size=32, vocab_size=97, n_layer=2, n_head=2, n_embd=32, dropout=0.0)
    cfg.update(kw)
    torch.manual_seed(0)
    plain = build_model(NeuroManifoldConfig(**cfg))
    torch.manual_seed(0)
    lean = build_model(NeuroManifoldConfig(**cfg))
    lean.lean_loss = LinearCrossEntropyLoss()
    return plain, lean


@pytest.mark.parametrize("checkpointing", [False, True])
def test_model_with_lean_loss_trains_identically(checkpointing):
    plain, lean = _model_pair(gradient_checkpointing=checkpointing)
    assert plain.state_dict().keys() == lean.state_dict().keys()  # no parameters of its own
    x = torch.randint(0, 97, (3, 32))
    lp, ll = plain(x, x)[1], lean(x, x)[1]
    lp.backward()
    ll.backward()
    torch.testing.assert_close(ll, lp, rtol=1e-6, atol=1e-6)
    for (name, p), q in zip(plain.named_parameters(), lean.parameters(), strict=True):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-5, atol=1e-7, msg=name)


class _LargestTensor(TorchDispatchMode):
    """Records the largest tensor any op produces (forward and backward)."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def test_never_materialises_the_full_logits():
    N, V = 4 * 64, 1024
    _, lean = _model_pair(block_size=64, vocab_size=V)
    plain, _ = _model_pair(block_size=64, vocab_size=V)
    x = torch.randint(0, V, (4, 64))
    chunk = chunk_tokens(N, V, chunk_bytes=32 * V * 4)  # 32-token chunks
    sizes = {}
    for name, model in (("plain", plain), ("lean", lean)):
        if name == "lean":
            model.lean_loss = LinearCrossEntropyLoss(chunk)
        with _LargestTensor() as mode:
            model(x, x)[1].backward()
        sizes[name] = mode.largest
    assert sizes["plain"] >= N * V  # the plain loss holds (B*T, V)
    assert sizes["lean"] <= chunk * V  # the lean one never more than a chunk of it


def test_chunk_tokens_caps_the_chunk_and_prefers_equal_chunks():
    assert chunk_tokens(12288, 50304) == 2048  # 400 MiB cap -> 2084 tokens; 2048 divides 12288
    assert chunk_tokens(12288, 50304, chunk_bytes=128 * 2**20) == 512  # 667; 512 divides
    assert chunk_tokens(100, 65) == 100  # small problems: one chunk
    assert chunk_tokens(7, 10**9) == 1
    c = chunk_tokens(10007, 50304)  # a prime: no divisor, balanced chunks under the cap
    assert c * 4 * 50304 <= CHUNK_BYTES
