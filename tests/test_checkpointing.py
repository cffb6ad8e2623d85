"""Every policy must give the loss and gradients of no checkpointing, and must really recompute."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

import neuromanifold_gpt.checkpointing as ckpt
from neuromanifold_gpt import NeuroManifoldConfig, NeuroManifoldGPT, build_model
from neuromanifold_gpt.config.base import ActivationCheckpoint, TrainConfig
from neuromanifold_gpt.errors import BadInput
from tests.conftest import plan_of

CASES = [dict(checkpoint_policy=p) for p in ("block", "attention", "mlp", "selective")] + [
    dict(checkpoint_policy="block", checkpoint_every=2),
    dict(checkpoint_policy="block", checkpoint_layers=1),
]


def make(dropout=0.0, **ckpt_kwargs):
    cfg = NeuroManifoldConfig(block_size=32, vocab_size=65, n_layer=3, n_head=4, n_embd=32,
                              dropout=dropout, bias=True, gradient_checkpointing=bool(ckpt_kwargs))
    torch.manual_seed(0)
    return build_model(cfg, ActivationCheckpoint(**ckpt_kwargs))


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
    on, off = make(checkpoint_policy="block").config, make().config
    assert ckpt.checkpointed_layers(on, ActivationCheckpoint("block")) == [0, 1, 2]
    assert ckpt.checkpointed_layers(on, ActivationCheckpoint("block", checkpoint_every=2)) == [0, 2]
    assert ckpt.checkpointed_layers(on, ActivationCheckpoint("block", checkpoint_layers=1)) == [0]
    assert ckpt.checkpointed_layers(off, ActivationCheckpoint("block")) == []


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
        ckpt.apply_activation_checkpointing(wrapped, ActivationCheckpoint("block"))


def plan_for(ckpt: dict, device="cpu", world=1, fsdp=False, accumulation=1, **levers):
    """The plan of make(**ckpt)'s model, compiled, on `device`."""
    flags = dict(n_layer=3, n_head=4, n_embd=32, block_size=32, batch_size=4, bias=True,
                 compile=True, gradient_checkpointing=bool(ckpt), gradient_accumulation_steps=accumulation,
                 fsdp=fsdp, **ckpt, **levers)
    return plan_of(TrainConfig.from_flags(**flags), 65, device, world=world, fsdp=fsdp)


@pytest.mark.parametrize("ckpt, lean, per_block", [
    (dict(checkpoint_policy="block"), True, True), (dict(checkpoint_policy="block"), False, False),
    (dict(checkpoint_policy="block", checkpoint_every=2), True, True),
    (dict(checkpoint_policy="mlp"), True, True), ({}, True, True), ({}, False, False)])
def test_compile_unit_follows_the_plan(ckpt, lean, per_block):
    """A single process compiles block by block with the lean loss, which runs eager after the
    blocks, and the whole model, the plain loss inside it, otherwise (compile is lazy: nothing
    is traced here)."""
    from neuromanifold_gpt import distributed

    plan = plan_for(ckpt, lean_loss=lean)
    assert plan.compile_unit == ("block" if per_block else "model")
    model = NeuroManifoldGPT(plan.model)
    distributed.parallelize(model, plan)
    compiled = lambda m: getattr(m, "_compiled_call_impl", None) is not None  # noqa: E731
    assert compiled(model) is not per_block
    assert all(compiled(b) is per_block for b in model.transformer.h)
    assert hasattr(model.loss, "_torchdynamo_orig_callable") is per_block
    assert (model.lean_loss is not None) is lean
    assert ckpt.get("checkpoint_policy") in (None, *{getattr(m, "_checkpoint_policy", None)
                                                      for m in model.modules()})


@pytest.mark.parametrize("unit, lean", [("model", True), ("block", False)])
def test_compile_unit_and_cuda_graphs_are_the_configs_to_set(unit, lean):
    """What the bench compares: the unit asked for wins over the one the levers would choose,
    and graphs asked off stay off where they could replay."""
    plan = plan_for({}, "cuda", lean_loss=lean, compile_unit=unit, cuda_graphs=False)
    assert (plan.compile_unit, plan.cuda_graphs) == (unit, False)
    assert plan_for({}, "cuda", lean_loss=lean).cuda_graphs is True


@pytest.mark.parametrize("flags, line", [
    (dict(compile_unit="model", fsdp=True, world=2, accumulation=2), "compile_unit=model cannot hold FSDP2"),
    (dict(cuda_graphs=True, accumulation=2), "cuda_graphs=true needs a single process"),
    (dict(cuda_graphs=True, device="cpu"), "cuda_graphs=true needs a CUDA device"),
])
def test_compile_settings_that_cannot_work_are_refused(flags, line):
    with pytest.raises(BadInput, match=line):
        plan_for({}, **{"device": "cuda", **flags})


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
    copies between the graphs cost more than the graphs save. Nothing runs here: compile's
    mode is what is asked for."""
    from neuromanifold_gpt import distributed

    modes = []
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, **kw: modes.append(kw.get("mode")))
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: modes.append(kw.get("mode")) or fn)
    monkeypatch.setattr(distributed, "DDP", lambda model, **kw: model)
    monkeypatch.setattr(distributed, "init_device_mesh", lambda *a: None)
    monkeypatch.setattr(distributed, "fully_shard", lambda *a, **kw: None)
    world = 1 if parallelism == "none" else 2
    plan = plan_for(dict(checkpoint_policy=policy) if policy != "none" else {}, device, world,
                    parallelism == "fsdp", micro_steps * world, lean_loss=lean, offload_activations=offload)
    assert plan.cuda_graphs is graphs
    distributed.parallelize(NeuroManifoldGPT(plan.model), plan)
    units = len(plan.layers or range(3)) + 1 if parallelism == "fsdp" or lean else 1
    assert modes == [("reduce-overhead" if graphs else None)] * units


def test_the_trainer_builds_what_its_plan_says(monkeypatch, data_dir):
    """Several micro-steps a step leave the graphs out (a replay would overwrite the gradients
    kept between micro-steps); the Trainer compiles the blocks by the same plan it marks its
    steps by."""
    from neuromanifold_gpt import distributed
    from neuromanifold_gpt.config.cli import parse_args
    from neuromanifold_gpt.trainer import Trainer, plan_run

    handed = []
    parallelize = distributed.parallelize
    monkeypatch.setattr(distributed, "parallelize", lambda model, plan: (
        handed.append(plan) or parallelize(model, plan)))
    cfg = parse_args(["--data_dir", str(data_dir), "--dataset", "tiny", "--n_layer", "2", "--n_head", "2",
                      "--n_embd", "32", "--batch_size", "2", "--block_size", "16", "--compile", "true",
                      "--gradient_checkpointing", "true", "--lean_loss", "true",
                      "--gradient_accumulation_steps", "3"])
    trainer = Trainer(cfg, *plan_run(cfg), quiet=True)
    trainer.build()  # compile is lazy: nothing is traced here
    assert handed == [trainer.plan]
    assert trainer.plan.micro_steps == 3 and trainer.plan.compile_unit == "block"
    assert [getattr(b, "_checkpoint_policy", None) for b in trainer.model.transformer.h] == ["block"] * 2
