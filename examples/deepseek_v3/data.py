"""A synthetic language for the example: sequences of a random sparse first-order Markov chain.

Every token ``a`` of a vocabulary of ``V`` has ``branching`` distinct successors drawn at random, taken with the
fixed probabilities ``p_i`` proportional to ``1 / (i + 1)`` (a Zipf-like tail). A model that learns the chain
reaches the chain's entropy rate ``-sum_i p_i log p_i`` nats per token (:attr:`MarkovCorpus.entropy`), down
from ``log V`` for a model that knows nothing: the loss curve has a known floor, so it shows how much was learnt.

Everything is a pure function of the seed: the chain, and batch ``i`` of stream ``s`` (``train`` or ``eval``),
whatever the number of processes. Nothing is downloaded or read from disk.
"""

from __future__ import annotations

import math
import zlib

import torch

from deepep_plugin.errors import expect


class MarkovCorpus:
    """Deterministic token batches of a random sparse Markov chain.

    Args:
        vocab_size: ``V``, number of token ids.
        seq_len: ``S``; each sequence holds ``S + 1`` tokens (inputs and next-token targets).
        seed: chooses the chain and every batch.
        branching: successors per token, ``1 <= branching <= V``.
    """

    def __init__(self, vocab_size: int, seq_len: int, seed: int, branching: int = 4) -> None:
        expect(vocab_size >= 2, f"vocab_size must be >= 2, got {vocab_size}")
        expect(seq_len >= 1, f"seq_len must be >= 1, got {seq_len}")
        expect(1 <= branching <= vocab_size, f"branching must be in [1, vocab_size={vocab_size}], got {branching}")
        self.vocab_size, self.seq_len, self.seed, self.branching = vocab_size, seq_len, seed, branching
        g = torch.Generator().manual_seed(seed)
        # successors[a] = ``branching`` distinct tokens, in a random order (int64 [V, branching]).
        self.successors = torch.rand(vocab_size, vocab_size, generator=g).argsort(dim=1)[:, :branching]
        probs = 1.0 / torch.arange(1, branching + 1, dtype=torch.float64)
        probs = probs / probs.sum()
        self.probs = probs  # float64 [branching]
        self.cumulative = probs.cumsum(0).float()  # float32 [branching], last entry ~1
        self.cumulative[-1] = 1.0

    @property
    def entropy(self) -> float:
        """Entropy rate of the chain in nats per token: the lowest loss any model can reach on it."""
        return float(-(self.probs * self.probs.log()).sum())

    @property
    def uniform_loss(self) -> float:
        """``log V``: the loss of a model that predicts every token with equal probability."""
        return math.log(self.vocab_size)

    def batch(self, index: int, batch_size: int, stream: str = "train") -> torch.Tensor:
        """Batch ``index`` of ``stream``: int64 ``[batch_size, S + 1]`` on the CPU.

        The same ``(seed, stream, index)`` gives the same batch on every process and every run; a training run
        with ``R`` ranks gives rank ``r`` the batches ``step * R + r``, so ranks never see the same data.
        """
        expect(batch_size >= 1, f"batch_size must be >= 1, got {batch_size}")
        key = zlib.crc32(f"{self.seed}/{stream}/{index}".encode())
        g = torch.Generator().manual_seed(key)
        tokens = torch.empty(batch_size, self.seq_len + 1, dtype=torch.int64)
        tokens[:, 0] = torch.randint(self.vocab_size, (batch_size,), generator=g)
        choice = torch.searchsorted(self.cumulative, torch.rand(batch_size, self.seq_len, generator=g))
        choice.clamp_(max=self.branching - 1)
        for t in range(self.seq_len):
            tokens[:, t + 1] = self.successors[tokens[:, t], choice[:, t]]
        return tokens
