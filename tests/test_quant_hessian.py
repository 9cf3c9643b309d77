"""Tests of the streaming per-expert Hessians."""

from __future__ import annotations

import pytest
import torch

from qmoe_ray.quant import HessianAccumulator, hessian


def test_mean_convention_and_batch_streaming():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(3, 100, 12, generator=g)
    H, n = hessian(X)
    assert H.dtype == torch.float32 and n.tolist() == [100, 100, 100]
    expect = torch.einsum("etc,etd->ecd", X.double(), X.double()) / 100
    assert torch.allclose(H.double(), expect, atol=1e-5)
    acc = HessianAccumulator(3, 12)
    for chunk in X.split(7, dim=1):
        for e in range(3):
            acc.add(e, chunk[e])
    H2, n2 = acc.result()
    assert torch.equal(n2, n) and torch.allclose(H2, H, atol=1e-5)


def test_list_input_with_empty_expert_and_half_precision():
    X = [torch.randn(5, 4).to(torch.bfloat16), torch.zeros(0, 4), torch.randn(9, 4)]
    H, n = hessian(X)
    assert n.tolist() == [5, 0, 9]
    assert torch.equal(H[1], torch.zeros(4, 4))
    x0 = X[0].double()
    assert torch.allclose(H[0].double(), x0.T @ x0 / 5, atol=1e-5)


def test_routed_masked_and_merged_accumulation_agree():
    g = torch.Generator().manual_seed(1)
    X = torch.randn(40, 6, generator=g)
    ids = torch.randint(-1, 4, (40,), generator=g)  # -1: dropped token
    a = HessianAccumulator(4, 6)
    a.add_routed(X, ids)
    b = HessianAccumulator(4, 6)
    for e in range(4):
        b.add(e, X[ids == e])
    assert torch.equal(a.counts, b.counts)
    assert torch.allclose(a.result()[0], b.result()[0])
    assert int(a.counts.sum()) == int((ids >= 0).sum())
    # masked batch add: the same tokens laid out [E, T, cols] with padding
    Xb = X.expand(4, 40, 6)
    mask = ids[None, :] == torch.arange(4)[:, None]
    c = HessianAccumulator(4, 6)
    c.add_batch(Xb, mask)
    assert torch.equal(c.counts, a.counts)
    assert torch.allclose(c.result()[0], a.result()[0], atol=1e-6)
    # two half-accumulators merged equal the whole
    d1, d2 = HessianAccumulator(4, 6), HessianAccumulator(4, 6)
    d1.add_routed(X[:20], ids[:20])
    d2.add_routed(X[20:], ids[20:])
    d1.merge(d2)
    assert torch.equal(d1.counts, a.counts)
    assert torch.allclose(d1.result()[0], a.result()[0], atol=1e-6)


def test_hessian_bad_input():
    acc = HessianAccumulator(2, 4)
    with pytest.raises(ValueError, match="out of range"):
        acc.add(2, torch.zeros(3, 4))
    with pytest.raises(ValueError, match=r"\[tokens, 4\]"):
        acc.add(0, torch.zeros(3, 5))
    with pytest.raises(ValueError, match="floating"):
        acc.add(0, torch.zeros(3, 4, dtype=torch.int64))
    with pytest.raises(ValueError, match="merge"):
        acc.merge(HessianAccumulator(3, 4))
    with pytest.raises(ValueError, match="empty"):
        hessian([])
    with pytest.raises(ValueError, match="floating"):
        hessian(torch.zeros(2, 3, 4, dtype=torch.int32))


def test_float32_sums_of_one_product_equal_float64_ones_bit_for_bit():
    """The job's path: one product per expert, so the sums' dtype changes no bit of H (the
    float64 division rounded to float32 is the float32 division)."""
    g = torch.Generator().manual_seed(3)
    X = [torch.randn(n, 64, generator=g) * s for n, s in ((500, 1.0), (7, 40.0), (0, 1.0),
                                                          (3000, 0.01))]
    X[2] = torch.zeros(0, 64)
    H32, n32 = hessian(X, dtype=torch.float32)
    H64, n64 = hessian(X, dtype=torch.float64)
    assert torch.equal(H32, H64) and torch.equal(n32, n64)
    # streamed in batches the sums round differently: close, not equal
    acc32, acc64 = HessianAccumulator(1, 64, dtype=torch.float32), HessianAccumulator(1, 64)
    for chunk in X[3].split(100):
        acc32.add(0, chunk)
        acc64.add(0, chunk)
    S32, S64 = acc32.result()[0], acc64.result()[0]
    assert torch.allclose(S32, S64, rtol=1e-5, atol=1e-9) and not torch.equal(S32, S64)


def test_release_hands_the_sums_over_and_spends_the_accumulator():
    acc = HessianAccumulator(2, 8, dtype=torch.float32)
    acc.add(0, torch.ones(4, 8))
    kept, _ = acc.result()
    ptr = acc.sums.data_ptr()
    H, n = acc.result(release=True)
    assert torch.equal(H, kept) and n.tolist() == [4, 0]
    assert H.data_ptr() == ptr  # float32 sums: divided in place, no copy
    for call in (lambda: acc.add(0, torch.ones(1, 8)), lambda: acc.result(),
                 lambda: acc.add_batch(torch.ones(2, 1, 8)),
                 lambda: HessianAccumulator(2, 8).merge(acc)):
        with pytest.raises(RuntimeError, match="released by result\\(release=True\\)"):
            call()
