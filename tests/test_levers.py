"""Memory levers: each keeps training numerically unchanged and does what it claims.

torch.compile runs here with the "aot_eager_decomp_partition" backend: the same tracing,
decompositions and min-cut partitioner (which decides what is saved or recomputed) as the
default inductor backend, without generating kernels, so it takes seconds on a CPU."""

import pytest
import torch
import torch._dynamo

import train
from neuromanifold_gpt import build_model, levers
from neuromanifold_gpt.config.base import ActivationCheckpoint, MemoryLevers, NeuroManifoldConfig, TrainConfig
from neuromanifold_gpt.loss import LinearCrossEntropyLoss
from tests.conftest import one_line_error

BACKEND = "aot_eager_decomp_partition"
B, T, C, L, V = 2, 32, 32, 2, 97


def _model(policy: str | None = None, lean_loss: bool = False):
    """policy: checkpoint every block with it (None = no checkpointing)."""
    torch.manual_seed(0)
    model = build_model(NeuroManifoldConfig(
        block_size=T, vocab_size=V, n_layer=L, n_head=2, n_embd=C, dropout=0.0,
        gradient_checkpointing=policy is not None), ActivationCheckpoint(checkpoint_policy=policy or "block"))
    if lean_loss:
        model.lean_loss = LinearCrossEntropyLoss()
    return model


def _loss_and_grads(model, x, context=None):
    with context or torch.autocast("cpu", enabled=False):
        loss = model(x, x)[1]
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def _assert_same(a, b):
    torch.testing.assert_close(a[0], b[0], rtol=1e-5, atol=1e-6)
    for name in a[1]:
        torch.testing.assert_close(a[1][name], b[1][name], rtol=1e-4, atol=1e-6, msg=name)


@pytest.fixture
def batch():
    return torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(1))


def test_optimizer_in_backward_steps_like_adamw_and_frees_gradients(batch):
    kw = dict(lr=1e-2, betas=(0.9, 0.99), weight_decay=0.1)
    plain, lean = _model(), _model()
    opt = torch.optim.AdamW(plain.parameters(), **kw)
    opt_bwd = levers.OptimizerInBackward(lean.parameters(), **kw)
    for _ in range(3):
        plain(batch, batch)[1].backward()
        opt.step()
        opt.zero_grad()
        lean(batch, batch)[1].backward()
        assert all(p.grad is None for p in lean.parameters())  # stepped and freed in backward
        opt_bwd.step()  # a no-op: the training loop may still call it
    for p, q in zip(plain.parameters(), lean.parameters(), strict=True):
        torch.testing.assert_close(q, p, rtol=1e-5, atol=1e-7)
    fresh = torch.optim.AdamW(_model().parameters(), **kw)
    fresh.load_state_dict(opt_bwd.state_dict())  # snapshots stay plain AdamW state


class _Recorder(torch.autograd.graph.saved_tensors_hooks):
    """Stands in for save_on_cpu and records the shape of every tensor it would offload."""

    shapes: list = []

    def __init__(self, pin_memory=False):
        def pack(t):
            _Recorder.shapes.append(tuple(t.shape))
            return t

        super().__init__(pack, lambda t: t)


def test_offload_with_block_checkpointing_moves_only_the_block_inputs(batch, monkeypatch):
    monkeypatch.setattr(torch.autograd.graph, "save_on_cpu", _Recorder)
    _Recorder.shapes = []
    model = _model("block", lean_loss=True)
    _loss_and_grads(model, batch, levers.forward_context(MemoryLevers(offload_activations=True)))
    big = [s for s in _Recorder.shapes if torch.Size(s).numel() >= B * T * C]
    assert big == [(B, T, C)] * (L + 1)  # each block's input, and the final LayerNorm's


def test_offload_keeps_gradients_unchanged(batch):
    ref = _loss_and_grads(_model("block"), batch)
    _assert_same(_loss_and_grads(_model("block"), batch,
                                 levers.forward_context(MemoryLevers(offload_activations=True))), ref)


def _saved_bytes(model, x, context):
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved = {}

    def pack(t):
        if t.untyped_storage().data_ptr() not in params:
            saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with context, torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(x, x)[1]
    loss.backward()
    return sum(saved.values())


def test_compile_memory_budget_recomputes_more_with_equal_gradients(batch):
    ref = _loss_and_grads(_model(), batch)
    saved = {}
    for budget in (1.0, 0.1):
        torch._dynamo.reset()
        model = _model()
        for block in model.transformer.h:
            block.compile(backend=BACKEND)
        context = levers.forward_context(MemoryLevers(activation_memory_budget=budget))
        saved[budget] = _saved_bytes(model, batch, context)  # compiles under the budget
        model.zero_grad()
        _assert_same(_loss_and_grads(model, batch), ref)
    assert saved[0.1] < 0.6 * saved[1.0]


@pytest.mark.parametrize("policy", ["block", "attention", "mlp", "selective"])
def test_compiled_checkpointing_equals_eager_without_checkpointing(batch, policy):
    ref = _loss_and_grads(_model(), batch)
    torch._dynamo.reset()
    model = _model(policy, lean_loss=True)
    model.compile(backend=BACKEND)  # the whole model, as distributed.parallelize does
    _assert_same(_loss_and_grads(model, batch), ref)
    model.zero_grad()
    _assert_same(_loss_and_grads(model, batch), ref)  # and again, from the compiled cache


@pytest.mark.parametrize("overrides, message", [
    (dict(activation_memory_budget=1.5), "must be in [0, 1]"),
    (dict(activation_memory_budget=0.5, compile=False), "set compile=true"),
    (dict(optimizer_in_backward=True), "set grad_clip=0"),
    (dict(optimizer_in_backward=True, grad_clip=0.0, gradient_accumulation_steps=4),
     "gradient_accumulation_steps=1"),
])
def test_bad_lever_settings_are_refused(overrides, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        TrainConfig.from_flags(**overrides)


def test_cli_refuses_optimizer_in_backward_with_clipping(capsys):
    assert train.main(["--optimizer_in_backward", "true"]) == 2
    assert "grad_clip=0" in one_line_error(capsys)


def test_compile_defaults_to_auto():
    assert TrainConfig().compile.enable is None  # on CUDA on, on the CPU off (resolved by the planner)


def test_optimizer_in_backward_does_not_keep_the_model_alive():
    import gc
    import weakref

    model = _model()
    optimizer = levers.OptimizerInBackward(model.parameters(), lr=1e-3)
    model(torch.zeros(1, T, dtype=torch.long), torch.zeros(1, T, dtype=torch.long))[1].backward()
    weight, state = weakref.ref(model.lm_head.weight), weakref.ref(optimizer)
    del model, optimizer
    gc.collect()
    assert weight() is None and state() is None  # hooks on the weights hold no strong reference
