"""Memory-lean loss: the linear head and the cross-entropy without the (N, V) logits.

The plain loss holds the (B*T, V) logits and, at the start of backward, their gradient: at
GPT-2's vocabulary that is more than the model's weights, gradients and AdamW states together.

    loss = LinearCrossEntropyLoss()(x, lm_head.weight, targets)  # x: (N, C), targets: (N,)

It walks over chunks of tokens and, for each, computes the logits, the loss and the gradient of
the logits, then turns that gradient at once into the gradients of the hidden states and of the
head weight, summed in fp32. Only one chunk's logits exist at a time; backward merely scales the
stored gradients. On CUDA each chunk's softmax arithmetic is compiled, and the matmuls are
cuBLAS's. Chosen over the fused kernels of cut-cross-entropy and Liger (`loss_kernel`, which
the bench measures side by side, docs/results/): the fastest of the exact kernels alone, and
exact to bf16 rounding where cut-cross-entropy's bf16 sums are not.
"""

from __future__ import annotations

import functools
import importlib

import torch
import torch.nn as nn

from .errors import BadInput

# Largest chunk of logits, counted in fp32 bytes: the loss's working set stays near this
# whatever B*T is (on CUDA one bf16 buffer of half its size; on the CPU an fp32 copy beside it).
# Every chunk adds its gradient into the head's fp32 gradient, reading and writing all of it, so
# fewer, larger chunks are faster; the bench's chunk-size rows (loss_chunk_tokens) chose this
# cap, where the checkpointed peak lies in backward, not in the loss.
CHUNK_BYTES = 400 * 2**20
IGNORE_INDEX = -100  # F.cross_entropy's default: targets equal to it are not counted


def chunk_tokens(n_tokens: int, vocab_size: int, chunk_bytes: int = CHUNK_BYTES) -> int:
    """Tokens per chunk: at most chunk_bytes of fp32 logits, and where possible a divisor of
    n_tokens, so every chunk has the same shape."""
    cap = max(1, min(n_tokens, chunk_bytes // (4 * vocab_size)))
    first = -(-n_tokens // cap)  # fewest chunks under the cap
    for n_chunks in range(first, 2 * first + 1):
        if n_tokens % n_chunks == 0:
            return n_tokens // n_chunks
    return -(-n_tokens // first)


def _chunk_loss_and_grad(logits: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor,
                         fused: bool = False):
    """Summed weighted cross-entropy of one chunk and its gradient w.r.t. the logits.

    logits: (c, V) in the compute dtype; targets: (c,) (ignored ones already set to 0);
    weights: (c,) in fp32 or wider, 1/n_valid for counted tokens and 0 for ignored ones.
    fused: the gradient as one element-wise expression (the one-hot a comparison), which
    compile turns into a single pass that writes it over the logits, in the compute dtype;
    otherwise it is built in place in one fp32 copy of the logits (eager)."""
    z = logits.to(weights.dtype)  # (c, V)
    lse = torch.logsumexp(z, dim=-1)  # (c,)
    target_logit = z.gather(1, targets[:, None]).squeeze(1)  # (c,)
    loss_sum = ((lse - target_logit) * weights).sum()
    # d loss / d logits = (softmax - one_hot) * weight
    if fused:
        one_hot = torch.arange(z.size(1), device=z.device) == targets[:, None]
        grad = ((z - lse[:, None]).exp() - one_hot.to(z.dtype)) * weights[:, None]
        return loss_sum, logits.copy_(grad)  # the chunk holds one buffer, not two
    # in place: the chunk costs one fp32 copy of its logits, not four
    grad = z.sub_(lse[:, None]).exp_()
    grad.scatter_add_(1, targets[:, None], torch.full_like(lse[:, None], -1.0))
    grad.mul_(weights[:, None])
    return loss_sum, grad.to(logits.dtype)


# On CUDA the chunk's arithmetic runs as two compiled kernels (a reduction for the logsumexp and
# one pass that writes the gradient over the logits in the compute dtype): no fp32 copy of the
# chunk's logits, which a scatter into it would need, and a fraction of the eager operations'
# memory traffic. The CPU runs it eagerly, in place.
_compiled_chunk_loss_and_grad = torch.compile(functools.partial(_chunk_loss_and_grad, fused=True),
                                              dynamic=False)


def _add_chunk_grads(g, w, xc, grad_x, grad_w) -> None:
    """grad_x = g @ w (the chunk's rows, written in place, in x's dtype) and grad_w += g.T @ xc
    (in fp32 or wider). g: (c, V), w: (V, C), xc: (c, C) in the compute dtype."""
    if g.is_cuda:
        # cuBLAS sums the bf16 products into the fp32 buffers itself: no (V, C) temporary
        # product and no separate addition over the head's gradient for every chunk
        torch.mm(g, w, out_dtype=grad_x.dtype, out=grad_x)
        torch.addmm(grad_w, g.t(), xc, out_dtype=grad_w.dtype, out=grad_w)
    else:  # the CPU has no mixed-dtype matmul
        grad_x.copy_(g @ w)
        grad_w += g.t() @ xc


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype autocast would run the head matmul in (x's own dtype without autocast)."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, targets, ignore_index, chunk, dtype, need_grad):
        # x: (N, C), weight: (V, C), targets: (N,). Autocast is off in here; dtypes are explicit.
        w = weight.to(dtype)
        acc = torch.promote_types(dtype, torch.float32)  # the loss math is never below fp32
        valid = targets != ignore_index
        weights = valid.to(acc) / valid.sum().clamp(min=1)  # the mean over counted tokens
        safe_targets = targets.masked_fill(~valid, 0)
        grad_x = torch.empty_like(x) if need_grad else None  # (N, C)
        grad_w = torch.zeros_like(weight, dtype=acc) if need_grad else None  # (V, C)
        loss = torch.zeros((), dtype=acc, device=x.device)
        chunk_loss_and_grad = _compiled_chunk_loss_and_grad if x.is_cuda else _chunk_loss_and_grad
        for s in range(0, x.size(0), chunk):
            xc = x[s: s + chunk].to(dtype)  # (c, C)
            # g: the chunk's (c, V) logits, then (on CUDA, in the same buffer) their gradient
            part, g = chunk_loss_and_grad(xc @ w.t(), safe_targets[s: s + chunk], weights[s: s + chunk])
            loss += part
            if need_grad:
                _add_chunk_grads(g, w, xc, grad_x[s: s + chunk], grad_w)
            del g  # freed before the next chunk's logits exist
        # Kept as ctx attributes, not save_for_backward: they are results, not inputs, and
        # must stay on the device even when saved activations are offloaded to the host.
        ctx.grad_x = grad_x
        ctx.grad_w = grad_w.to(weight.dtype) if need_grad else None
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        grad_x, grad_w = ctx.grad_x, ctx.grad_w
        ctx.grad_x = ctx.grad_w = None
        # in place: a second (V, C) fp32 buffer would raise the peak at the start of backward
        grad_x = grad_x.mul_(grad_loss) if ctx.needs_input_grad[0] else None
        grad_w = grad_w.mul_(grad_loss) if ctx.needs_input_grad[1] else None
        return grad_x, grad_w, None, None, None, None, None


def linear_cross_entropy(x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                         ignore_index: int = IGNORE_INDEX, chunk: int | None = None) -> torch.Tensor:
    """F.cross_entropy(x @ weight.T, targets) (mean over targets != ignore_index) without
    ever holding the (N, V) logits. x: (N, C) or (B, T, C); targets: matching (N,) or (B, T)."""
    x = x.reshape(-1, x.size(-1))
    targets = targets.reshape(-1)
    dtype = compute_dtype(x)
    chunk = min(chunk, x.size(0)) if chunk else chunk_tokens(x.size(0), weight.size(0))
    # ctx.needs_input_grad ignores no_grad mode: evaluation must skip the gradient matmuls here
    need_grad = torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)
    with torch.autocast(x.device.type, enabled=False):
        return _LinearCrossEntropy.apply(x, weight, targets, ignore_index, chunk, dtype, need_grad)


def _library(module: str, package: str):
    try:
        return importlib.import_module(module)
    except ImportError:
        raise BadInput(f"loss_kernel needs {package}: pip install -e '.[compare]' (Linux with a "
                       f"CUDA torch)") from None


def _cce(filter_eps: str | None):
    """cut-cross-entropy's fused kernel; filter_eps None computes every block of the gradient,
    "high" (its default) skips the blocks whose |softmax - one-hot| all lie below 2.4e-4."""
    def fn(x, weight, targets, chunk=None):
        cce = _library("cut_cross_entropy", "cut-cross-entropy")
        dtype = compute_dtype(x)
        return cce.linear_cross_entropy(x.reshape(-1, x.size(-1)).to(dtype), weight.to(dtype),
                                        targets.reshape(-1), ignore_index=IGNORE_INDEX,
                                        impl="cce", filter_eps=filter_eps)
    return fn


def _liger(x, weight, targets, chunk=None):
    liger = _library("liger_kernel.transformers", "liger-kernel")
    return liger.LigerFusedLinearCrossEntropyLoss()(weight, x.reshape(-1, x.size(-1)), targets.reshape(-1))


# The lean loss's kernels: ours, and the fused linear cross-entropy kernels of maintained
# libraries (Triton, CUDA only), which the bench measures ours against
KERNELS = {"chunked": linear_cross_entropy, "cce": _cce(None), "cce_filtered": _cce("high"),
           "liger": _liger}


class LinearCrossEntropyLoss(nn.Module):
    """The lean loss as a module without parameters (the state_dict is unchanged).
    chunk: tokens a chunk (None = chunk_tokens's); kernel: a name in KERNELS."""

    def __init__(self, chunk: int | None = None, kernel: str = "chunked"):
        super().__init__()
        self.chunk, self.kernel = chunk, KERNELS[kernel]

    @torch.compiler.disable  # a Python loop: compiled code calls it as is
    def forward(self, x, weight, targets):
        return self.kernel(x, weight, targets, chunk=self.chunk)
