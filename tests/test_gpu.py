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
