"""Every policy must give the loss and gradients of no checkpointing, and must really recompute."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

import neuromanifold_gpt.checkpointing as ckpt
from neuromanifold_gpt import NeuroManifoldConfig, build_model
from neuromanifold_gpt.config.base import ActivationCheckpoint

CASES = [dict(checkpoint_policy=p) for p in ("block", "attention", "mlp", "selective")] + [
    dict(checkpoint_policy="block", checkpoint_every=2),
    dict(checkpoint_policy="block", checkpoint_layers=1),
]


def make(dropout=0.0, **ckpt_kwargs):
    cfg = NeuroManifoldConfig(block_size=32, vocab_size=65, n_layer=3, n_head=4, n_embd=32,
                              dropout=dropout, bias=True,
                              gradient_checkpointing=bool(ckpt_kwargs),
                              activation_checkpoint=ActivationCheckpoint(**ckpt_kwargs))
    torch.manual_seed(0)
    return build_model(cfg)


def batch():
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, 65, (4, 32), generator=g), torch.randint(0, 65, (4, 32), generator=g)


def loss_and_grads(model):
    x, y = batch()
    torch.manual_seed(2)  # same dropout masks in both runs
    _, loss = model(x, y)
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters()}


@pytest.mark.parametrize("dropout", [0.0, 0.2])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
def test_same_loss_and_gradients(case, dropout):
    ref_loss, ref_grads = loss_and_grads(make(dropout))
    loss, grads = loss_and_grads(make(dropout, **case))
    torch.testing.assert_close(loss, ref_loss)
    assert grads.keys() == ref_grads.keys()
    for name in ref_grads:
        torch.testing.assert_close(grads[name], ref_grads[name], msg=lambda m, n=name: f"{n}: {m}")


def backward_flops(model) -> int:
    x, y = batch()
    _, loss = model(x, y)
    with FlopCounterMode(display=False) as counter:
        loss.backward()
    return counter.get_total_flops()


@pytest.mark.parametrize("policy", ["block", "attention", "mlp"])
def test_backward_recomputes_matmuls(policy):
    assert backward_flops(make(checkpoint_policy=policy)) > backward_flops(make())


class CountOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.counts = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.counts[func.overloadpacket.__name__] = self.counts.get(func.overloadpacket.__name__, 0) + 1
        return func(*args, **(kwargs or {}))


def backward_ops(model) -> dict:
    x, y = batch()
    _, loss = model(x, y)
    with CountOps() as mode:
        loss.backward()
    return mode.counts


def test_selective_recomputes_elementwise_but_not_matmuls():
    base, sel = backward_ops(make()), backward_ops(make(checkpoint_policy="selective"))
    assert sel.get("gelu", 0) == 3 and base.get("gelu", 0) == 0  # one GELU re-run per block
    assert sel.get("native_layer_norm", 0) == 6 and base.get("native_layer_norm", 0) == 0
    assert backward_flops(make(checkpoint_policy="selective")) == backward_flops(make())


def test_layer_knobs_choose_blocks():
    assert ckpt.checkpointed_layers(make(checkpoint_policy="block").config) == [0, 1, 2]
    assert ckpt.checkpointed_layers(make(checkpoint_policy="block", checkpoint_every=2).config) == [0, 2]
    assert ckpt.checkpointed_layers(make(checkpoint_policy="block", checkpoint_layers=1).config) == [0]
    assert ckpt.checkpointed_layers(make().config) == []


@pytest.mark.parametrize("knobs, runs", [
    (dict(checkpoint_policy="block"), [(2, 2), (2, 2), (2, 2)]),
    (dict(checkpoint_policy="block", checkpoint_every=2), [(2, 2), (1, 1), (2, 2)]),
    (dict(checkpoint_policy="block", checkpoint_layers=1), [(2, 2), (1, 1), (1, 1)]),
    (dict(checkpoint_policy="mlp", checkpoint_every=2, checkpoint_layers=2), [(1, 2), (1, 1), (1, 1)]),
])
def test_layer_knobs_recompute_only_the_chosen_blocks(knobs, runs):
    """Counted in a real forward and backward: what a block checkpoints runs twice, the
    rest once, so the knobs are checked on the wrapped modules, not on the index helper."""
    model = make(**knobs)
    counts = {}
    for i, block in enumerate(model.transformer.h):
        for part, layer in (("attn", block.attn.c_attn), ("mlp", block.mlp.c_fc)):
            counts[i, part] = 0
            layer.register_forward_pre_hook(  # on entry: recompute may stop early
                lambda *_, key=(i, part): counts.__setitem__(key, counts[key] + 1))
    loss_and_grads(model)
    assert [(counts[i, "attn"], counts[i, "mlp"]) for i in range(len(runs))] == runs


def test_only_active_when_training(monkeypatch):
    model = make(checkpoint_policy="block")
    x, y = batch()

    def boom(*a, **k):
        raise AssertionError("checkpoint called")

    monkeypatch.setattr(ckpt, "checkpoint", boom)
    model.eval()
    model(x, y)  # eval: the plain forward
    model.train()
    with torch.no_grad():
        model(x, y)  # no autograd graph: nothing to save, nothing to recompute
    with pytest.raises(AssertionError, match="checkpoint called"):
        model(x, y)


def test_state_dict_unchanged_and_no_double_apply():
    plain, wrapped = make(), make(checkpoint_policy="block")
    assert plain.state_dict().keys() == wrapped.state_dict().keys()
    wrapped.load_state_dict(plain.state_dict())
    with pytest.raises(ValueError, match="already applied"):
        ckpt.apply_activation_checkpointing(wrapped, wrapped.config)


@pytest.mark.parametrize("ckpt, lean, per_block", [
    (dict(checkpoint_policy="block"), True, True), (dict(checkpoint_policy="block"), False, False),
    (dict(checkpoint_policy="block", checkpoint_every=2), True, True),
    (dict(checkpoint_policy="mlp"), True, True), ({}, True, True), ({}, False, False)])
def test_compile_unit_follows_the_plan(ckpt, lean, per_block):
    """A single process compiles block by block with the lean loss, which runs eager after the
    blocks, and the whole model, the plain loss inside it, otherwise (compile is lazy: nothing
    is traced here)."""
    from neuromanifold_gpt import distributed

    model = make(**ckpt)
    model.config.memory_levers.lean_loss = lean
    distributed.parallelize(model, distributed.DistInfo(), torch.device("cpu"), compile=True,
                            graphs=False)
    compiled = lambda m: getattr(m, "_compiled_call_impl", None) is not None  # noqa: E731
    assert compiled(model) is not per_block
    assert all(compiled(b) is per_block for b in model.transformer.h)
    assert hasattr(model.loss, "_torchdynamo_orig_callable") is per_block


@pytest.mark.parametrize("policy, lean, device, parallelism, micro_steps, offload, graphs", [
    ("block", True, "cuda", "none", 1, False, True), ("block", True, "cpu", "none", 1, False, False),
    ("block", True, "cuda", "none", 2, False, False), ("block", True, "cuda", "ddp", 1, False, False),
    ("block", True, "cuda", "fsdp", 1, False, False), ("block", True, "cuda", "none", 1, True, False),
    ("block", False, "cuda", "none", 1, False, True), ("none", False, "cuda", "none", 1, False, True),
    ("none", False, "cuda", "none", 2, False, False), ("none", False, "cuda", "ddp", 1, False, False),
    ("none", True, "cuda", "none", 1, False, True), ("mlp", True, "cuda", "none", 1, False, True),
    ("none", True, "cuda", "none", 1, True, False)])
def test_compiled_code_replays_cuda_graphs_only_where_they_are_safe(
        monkeypatch, policy, lean, device, parallelism, micro_steps, offload, graphs):
    """CUDA graphs ("reduce-overhead"), for the blocks and the loss region or for the whole
    model: in a single process on CUDA with one micro-step a step; not under DDP or FSDP2,
    whose hooks and collectives sit between the blocks, not with several micro-steps, whose
    gradients a replay would overwrite, not with activations offloaded to the host, whose
    copies between the graphs made the step 25 times slower. Nothing runs here: compile's
    mode is what is asked for."""
    from neuromanifold_gpt import distributed

    modes = []
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, **kw: modes.append(kw.get("mode")))
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: modes.append(kw.get("mode")) or fn)
    monkeypatch.setattr(distributed, "DDP", lambda model, **kw: model)
    monkeypatch.setattr(distributed, "init_device_mesh", lambda *a: None)
    monkeypatch.setattr(distributed, "fully_shard", lambda *a, **kw: None)
    model = make(**(dict(checkpoint_policy=policy) if policy != "none" else {}))
    model.config.memory_levers.lean_loss = lean
    model.config.memory_levers.offload_activations = offload
    info = distributed.DistInfo(world_size=1 if parallelism == "none" else 2, parallelism=parallelism)
    replays = distributed.replays_graphs(model.config, info, torch.device(device), True, micro_steps)
    assert replays is graphs
    distributed.parallelize(model, info, torch.device(device), compile=True, graphs=replays)
    units = len(model.transformer.h) + 1 if parallelism == "fsdp" or lean else 1
    assert modes == [("reduce-overhead" if graphs else None)] * units


def test_the_trainer_tells_the_compile_plan_its_micro_steps(monkeypatch, data_dir):
    """Several micro-steps a step must reach distributed.cuda_graphs, which then leaves the
    graphs out (a replay would overwrite the gradients kept between micro-steps); the Trainer
    compiles the blocks by the same decision it marks its steps by."""
    from neuromanifold_gpt import distributed
    from neuromanifold_gpt.config.cli import parse_args
    from neuromanifold_gpt.trainer import Trainer

    seen, handed = [], []
    monkeypatch.setattr(distributed, "cuda_graphs", lambda info, device, steps: not seen.append(steps))
    parallelize = distributed.parallelize
    monkeypatch.setattr(distributed, "parallelize", lambda model, info, device, compile, graphs: (
        handed.append(graphs) or parallelize(model, info, device, compile, graphs)))
    cfg = parse_args(["--data_dir", str(data_dir), "--dataset", "tiny", "--n_layer", "2", "--n_head", "2",
                      "--n_embd", "32", "--batch_size", "2", "--block_size", "16", "--compile", "true",
                      "--gradient_checkpointing", "true", "--lean_loss", "true",
                      "--gradient_accumulation_steps", "3"])
    trainer = Trainer(cfg, quiet=True)
    trainer.build()  # compile is lazy: nothing is traced here
    assert seen and set(seen) == {3}
    assert trainer.graphs  # what the trainer marks each step for is what the blocks compiled to
    assert handed == [True]
