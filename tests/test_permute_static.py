"""``permute`` with a known row count runs in static shapes (no ``nonzero``, no device read: CUDA-graph safe) and
gives exactly what the dynamic path gives, gradients included; ``unpermute`` reads nothing either."""

from __future__ import annotations

import pytest
import torch

from deepep_plugin.permute import permute, unpermute


def _case(seed: int, n: int, k: int, e_loc: int, drop: float):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 16, generator=g)
    idx = torch.randint(0, e_loc + 2, (n, k), generator=g)  # ids >= e_loc: experts elsewhere
    idx[torch.rand(n, k, generator=g) < drop] = -1
    w = torch.rand(n, k, generator=g)
    return x, idx, w


def _run(x, idx, w, e_loc, alignment, rows):
    x, w = x.clone().requires_grad_(), w.clone().requires_grad_()
    perm = permute(x, idx, e_loc, w, alignment=alignment, num_out_rows=rows)
    out = unpermute(perm.x * perm.probs[:, None] * 3.0, perm, x.size(0))
    g = torch.Generator().manual_seed(9)
    (out * torch.randn(out.shape, generator=g)).sum().backward()
    return perm, out.detach(), x.grad, w.grad


@pytest.mark.parametrize("seed,n,k,e_loc,drop,alignment", [
    (1, 40, 4, 3, 0.2, 1), (2, 40, 8, 1, 0.5, 16), (3, 0, 2, 4, 0.0, 8), (4, 17, 1, 6, 0.9, 1),
    (5, 64, 6, 2, 0.0, 4), (6, 5, 3, 5, 1.0, 2),
])
def test_static_path_equals_the_dynamic_path(seed, n, k, e_loc, drop, alignment) -> None:
    x, idx, w = _case(seed, n, k, e_loc, drop)
    if n:
        idx[0, :] = idx[0, 0]  # one row selecting the same local expert several times
    dyn = _run(x, idx, w, e_loc, alignment, None)
    total = int(dyn[0].tokens_per_expert.sum())
    for rows in (total, total + 7):  # exact, and with padding at the end
        st = _run(x, idx, w, e_loc, alignment, rows)
        assert torch.equal(st[0].tokens_per_expert, dyn[0].tokens_per_expert)
        assert torch.equal(st[0].x[:total], dyn[0].x) and not st[0].x[total:].any()
        assert torch.equal(st[0].row_ids[:total], dyn[0].row_ids) and (st[0].row_ids[total:] == -1).all()
        assert torch.equal(st[0].probs[:total], dyn[0].probs)
        for a, b in zip(st[1:], dyn[1:]):
            assert torch.equal(a, b)


def test_static_path_reads_nothing_from_the_device(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args, **kwargs):
        raise AssertionError("a device read (nonzero / item)")

    x, idx, w = _case(7, 30, 4, 3, 0.3)
    monkeypatch.setattr(torch, "nonzero", refuse)
    monkeypatch.setattr(torch.Tensor, "item", refuse)
    monkeypatch.setattr(torch.Tensor, "tolist", refuse)
    perm = permute(x, idx, 3, w, alignment=4, num_out_rows=200)
    unpermute(perm.x, perm, 30)
