"""NeuroManifoldGPT: the GPT-2 language model (token + position embeddings, a stack of
NeuroManifoldBlocks, a final LayerNorm and a head tied to the token embedding)."""

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config.base import NeuroManifoldConfig
from ..errors import BadInput
from .block import NeuroManifoldBlock


class NeuroManifoldGPT(nn.Module):
    def __init__(self, config: NeuroManifoldConfig):
        super().__init__()
        self.config = config
        V = config.padded_vocab_size  # padded to a multiple of 64 for faster matmuls
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(V, config.n_embd),
            wpe=nn.Embedding(config.block_size, config.n_embd),
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([NeuroManifoldBlock(config) for _ in range(config.n_layer)]),
            ln_f=nn.LayerNorm(config.n_embd, bias=config.bias),
        ))
        self.lm_head = nn.Linear(config.n_embd, V, bias=False)
        self.transformer.wte.weight = self.lm_head.weight  # weight tying
        # a loss module that takes the hidden states and the head's weight instead of the logits
        # (no parameters of its own): set from outside as a run's plan asks, see
        # distributed.parallelize and neuromanifold_gpt/loss.py; None is the plain cross-entropy
        self.lean_loss = None
        self.apply(self._init_weights)
        for name, p in self.named_parameters():  # GPT-2's scaled init of residual projections
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    @staticmethod
    def _init_weights(module):
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def num_params(self, non_embedding: bool = True) -> int:
        """Parameter count; by default without the position table (as nanoGPT reports it)."""
        n = sum(p.numel() for p in self.parameters())
        return n - self.transformer.wpe.weight.numel() if non_embedding else n

    def forward(self, idx, targets=None):
        """(logits of the last position, None) without targets; (None, loss) with them: the
        (B, T, V) logits are never returned, since a caller holding them would double the
        loss's memory."""
        B, T = idx.size()
        if T > self.config.block_size:
            raise BadInput(f"sequence of length {T} exceeds block_size={self.config.block_size}")
        pos = torch.arange(T, dtype=torch.long, device=idx.device)  # (T,)
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))  # (B, T, C)
        for block in self.transformer.h:
            x = block(x)
        if targets is None:
            return self.lm_head(self.transformer.ln_f(x[:, [-1], :])), None  # (B, 1, V)
        return None, self.loss(x, targets)

    def loss(self, x, targets):
        """The final LayerNorm, the head and the cross-entropy: one region, which compile
        (distributed.parallelize) turns into kernels that never hold fp32 logits."""
        x = self.transformer.ln_f(x)
        if self.lean_loss is not None:
            return self.lean_loss(x, self.lm_head.weight, targets)
        logits = self.lm_head(x)  # (B, T, V)
        return F.cross_entropy(logits.view(-1, logits.size(-1)).float(), targets.view(-1))
