"""Memory levers beyond activation checkpointing, each behind its own MemoryLevers flag.

offload_activations       tensors saved for backward go to pinned host memory during forward
                          and come back in backward (torch.autograd.graph.save_on_cpu). With
                          block checkpointing these are just the block inputs, so the device
                          keeps no activations at all between forward and backward.
optimizer_in_backward     AdamW updates each parameter from a post-accumulate-grad hook as
                          soon as its gradient is complete, then frees that gradient: the full
                          set of gradients never exists (no global clipping, no accumulation).
activation_memory_budget  torch.compile's partitioner keeps at most this fraction of the
                          activations it would keep by default and recomputes the rest in
                          backward, cheapest first (torch._functorch.config).
"""

from __future__ import annotations

import contextlib
import weakref

import torch

from .config.base import MemoryLevers


class OptimizerInBackward(torch.optim.AdamW):
    """AdamW whose update runs inside backward. State, param_groups (the lr schedule) and
    state_dict are plain AdamW's, so snapshots and resume work unchanged; step() is a no-op
    because every parameter has already been stepped when backward returns."""

    def __init__(self, params, **kwargs):
        super().__init__(params, **kwargs)
        # weak: a strong reference from the parameters' hooks would be a cycle through C++ that
        # the garbage collector cannot see, keeping model and AdamW states alive forever
        this = weakref.ref(self)

        def hook(p: torch.Tensor) -> None:
            optimizer = this()
            if optimizer is not None:
                optimizer._step_parameter(p)

        for group in self.param_groups:
            for p in group["params"]:
                p.register_post_accumulate_grad_hook(hook)

    def _step_parameter(self, p: torch.Tensor) -> None:
        # The hook runs right after p's gradient is accumulated and every earlier one was
        # freed here, so p is the only parameter with a gradient: AdamW's step updates p alone.
        super().step()
        p.grad = None

    def step(self, closure=None):
        return None


def forward_context(levers: MemoryLevers) -> contextlib.AbstractContextManager:
    """The levers that act while the forward pass runs (and compiles)."""
    stack = contextlib.ExitStack()
    if levers.offload_activations:
        stack.enter_context(torch.autograd.graph.save_on_cpu(pin_memory=torch.cuda.is_available()))
    if levers.activation_memory_budget < 1.0:
        # read when compile partitions a block's joint graph, i.e. in its first forward
        stack.enter_context(torch._functorch.config.patch(
            activation_memory_budget=levers.activation_memory_budget))
    return stack
