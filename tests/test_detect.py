"""sf.detect_pattern: the most structured pattern a weight's zeros allow, with its density.
Each named pattern is checked against the format it names (an n:m weight converts with NM.from_dense
and that n:m, a block pattern's kept blocks are >= 90% full) and against a brute-force search."""

from __future__ import annotations

import copy
import json
import pickle

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import sparseflow as sf
from sparseflow.formats.detect import BLOCK_FILL, BLOCK_SIDES, NM_FILL

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
FAST = settings(deadline=None, suppress_health_check=[HealthCheck.too_slow])


def gen(seed):
    return torch.Generator().manual_seed(seed)


def nm_exact(rows, cols, n, m, seed=0, dtype=torch.float32):
    """Exactly n non-zeros in every full group of m."""
    g = gen(seed)
    keep = torch.rand(rows, -(-cols // m), m, generator=g).argsort(-1).argsort(-1) < n
    w = torch.randn(rows, cols, generator=g).abs().add(0.1)
    return (w * keep.view(rows, -1)[:, :cols]).to(dtype)


def blocky(rows, cols, block, keep=0.3, seed=0, dtype=torch.float32):
    bm, bk = block
    g = gen(seed)
    kept = torch.rand(-(-rows // bm), -(-cols // bk), generator=g) < keep
    kept[0, 0], kept[-1, -1] = True, False  # some blocks kept, some not
    mask = kept.repeat_interleave(bm, 0).repeat_interleave(bk, 1)[:rows, :cols]
    return (torch.randn(rows, cols, generator=g).abs().add(0.1) * mask).to(dtype)


def brute_force(w: torch.Tensor) -> str:
    """The documented rule, one candidate at a time on the dense mask."""
    rows, cols = w.shape
    nonzero = w != 0
    nnz = int(nonzero.sum())
    if nnz == w.numel():
        return "dense"
    if nnz == 0:
        return "unstructured"
    for m in (4, 8, 16):
        if cols < m:
            continue
        n = int(F.pad(nonzero, (0, (-cols) % m)).view(rows, -1, m).sum(-1).max())
        if 2 * n <= m and nnz >= NM_FILL * n * w.numel() / m:
            return f"{n}:{m}"
    best = None
    for bm in BLOCK_SIDES:
        for bk in BLOCK_SIDES:
            if rows < bm or cols < bk:
                continue
            kept = sf.BSR.blocked(nonzero, (bm, bk)).any(-1).any(-1)
            mask = kept.repeat_interleave(bm, 0).repeat_interleave(bk, 1)[:rows, :cols]
            if bool(kept.all()) or nnz < BLOCK_FILL * int(mask.sum()):
                continue
            rank = (bm * bk, -abs(bm.bit_length() - bk.bit_length()), bm)
            if best is None or rank > best[0]:
                best = (rank, f"block({bm},{bk})")
    return best[1] if best else "unstructured"


# ------------------------------------------------------------------------------------ each pattern


@pytest.mark.parametrize("dtype", DTYPES)
def test_dense(dtype):
    p = sf.detect_pattern(torch.randn(33, 70).abs().add(0.1).to(dtype))
    assert p == "dense" and p.kind == "dense" and p.density == 1.0
    assert (p.n, p.m, p.block) == (None, None, None)


@pytest.mark.parametrize("n,m", [(2, 4), (1, 4), (1, 8), (3, 8), (4, 8), (2, 16), (5, 16), (8, 16)])
def test_n_m(n, m):
    w = nm_exact(64, 160, n, m, seed=n * m)
    p = sf.detect_pattern(w)
    assert p == f"{n}:{m}" and p.kind == "n:m" and (p.n, p.m) == (n, m) and p.block is None
    assert p.density == pytest.approx(n / m)
    assert str(p) == f"{n}:{m}" and isinstance(p, str)
    sf.NM.from_dense(w, n=p.n, m=p.m)  # the detected n:m converts without pruning


def test_2_4_with_a_few_extra_zeros_and_partial_group():
    w = nm_exact(128, 258, 2, 4, seed=1)
    w[torch.rand(w.shape, generator=gen(2)) < 0.1] = 0
    p = sf.detect_pattern(w)
    assert p == "2:4" and p.density == pytest.approx(int((w != 0).sum()) / w.numel())


def test_smallest_m_first():
    """A 2:4 weight is also 4:8 and 8:16; a 4:8 weight that is not 2:4 is reported as 4:8."""
    assert sf.detect_pattern(nm_exact(32, 64, 2, 4)) == "2:4"
    w = torch.zeros(32, 64)
    w[:, 0::8] = w[:, 1::8] = w[:, 2::8] = w[:, 3::8] = 1.0  # four in a row: 4:4 in group 0, 0 in group 1
    assert sf.detect_pattern(w) == "4:8"


@pytest.mark.parametrize("block", [(4, 4), (8, 8), (16, 16), (32, 32), (64, 64), (128, 128),
                                   (4, 32), (32, 4), (8, 128), (128, 16), (16, 64)])
def test_blocks(block):
    w = blocky(300, 290, block, seed=block[0] * 1000 + block[1])
    p = sf.detect_pattern(w)
    assert p == f"block({block[0]},{block[1]})" and p.kind == "block" and p.block == block
    assert (p.n, p.m) == (None, None)
    assert p.density == pytest.approx(int((w != 0).sum()) / w.numel())
    # Its kept blocks (the part inside the weight) are >= 90% full, and some blocks are dropped.
    kept = sf.BSR.blocked(w != 0, block).any(-1).any(-1)
    covered = kept.repeat_interleave(block[0], 0).repeat_interleave(block[1], 1)[: w.shape[0], : w.shape[1]]
    assert int((w != 0).sum()) >= BLOCK_FILL * int(covered.sum()) and not bool(kept.all())


def test_block_edges_count_only_inside_the_weight():
    """300 rows are 2 full 128-row blocks and a 44-row edge: a kept edge block is full."""
    assert sf.detect_pattern(blocky(300, 300, (128, 128), keep=0.5, seed=3)) == "block(128,128)"


def test_block_with_holes_inside_kept_blocks():
    w = blocky(256, 256, (32, 32), keep=0.3, seed=4)
    holes = torch.rand(w.shape, generator=gen(5))
    assert sf.detect_pattern(w.masked_fill(holes < 0.05, 0)) == "block(32,32)"  # 95% full
    assert sf.detect_pattern(w.masked_fill(holes < 0.3, 0)) == "unstructured"  # 70% full


@pytest.mark.parametrize("density", [0.5, 0.3, 0.1, 0.05, 0.01])
def test_random_is_unstructured(density):
    """A 95%-sparse random weight satisfies 8:16, but n:m would store 10x its non-zeros."""
    w = torch.randn(512, 512, generator=gen(6))
    w[torch.rand(512, 512, generator=gen(7)) >= density] = 0
    p = sf.detect_pattern(w)
    assert p == "unstructured" and p.kind == "unstructured"
    assert p.density == pytest.approx(int((w != 0).sum()) / w.numel())
    assert (p.n, p.m, p.block) == (None, None, None)


def test_all_zero_and_negative_zero():
    assert sf.detect_pattern(torch.zeros(16, 16)) == "unstructured"
    assert sf.detect_pattern(torch.zeros(16, 16)).density == 0.0
    assert sf.detect_pattern(torch.full((16, 16), -0.0)) == "unstructured"
    w = nm_exact(16, 16, 2, 4)
    assert sf.detect_pattern(torch.where(w == 0, torch.tensor(-0.0), w)) == "2:4"  # -0.0 counts as zero


def test_nan_and_inf_count_as_non_zeros():
    w = torch.randn(8, 8)
    w[0, 0], w[1, 1] = float("nan"), float("inf")
    assert sf.detect_pattern(w) == "dense"


def test_small_and_thin_weights():
    assert sf.detect_pattern(torch.tensor([[1.0, 0.0, 0.0]])) == "unstructured"  # shorter than any group
    assert sf.detect_pattern(torch.tensor([[1.0, 0.0, 0.0, 0.0, 2.0]])) == "1:4"
    assert sf.detect_pattern(torch.ones(1, 1)) == "dense"


@pytest.mark.parametrize("dtype", DTYPES)
def test_dtypes_and_non_contiguous(dtype):
    w = nm_exact(64, 96, 2, 4, dtype=dtype)
    assert sf.detect_pattern(w) == "2:4"
    assert sf.detect_pattern(w[:, 4:68]) == "2:4"
    assert sf.detect_pattern(w[::3]) == "2:4"
    t = blocky(96, 64, (16, 8), dtype=dtype).t()
    assert sf.detect_pattern(t) == "block(8,16)"


def test_repr_str_copy_and_pickle():
    p = sf.detect_pattern(nm_exact(8, 16, 2, 4))
    assert repr(p) == "Pattern('2:4', density=0.5000)"
    assert {p: 1}["2:4"] == 1 and p.startswith("2:") and json.dumps({"pattern": p}) == '{"pattern": "2:4"}'
    b = sf.detect_pattern(blocky(64, 64, (16, 8)))
    for q in (copy.copy(p), copy.deepcopy(p), pickle.loads(pickle.dumps(p)), pickle.loads(pickle.dumps(b))):
        original = b if q == b else p
        assert type(q) is sf.Pattern and q == original
        assert (q.kind, q.density, q.n, q.m, q.block) == (original.kind, original.density, original.n,
                                                          original.m, original.block)


@pytest.mark.parametrize("bad,error", [
    (torch.ones(4, 4, dtype=torch.int32), TypeError), (torch.ones(4, 4, dtype=torch.bool), TypeError),
    (torch.ones(16), ValueError), (torch.ones(2, 4, 4), ValueError), (torch.ones(0, 3), ValueError),
    ([[1.0]], TypeError),
])
def test_bad_inputs(bad, error):
    with pytest.raises(error):
        sf.detect_pattern(bad)


# ------------------------------------------------------------------------------------ property tests


@st.composite
def weights(draw):
    rows, cols = draw(st.integers(1, 300)), draw(st.integers(1, 300))
    kind = draw(st.sampled_from(["random", "nm", "block", "zero rows"]))
    seed = draw(st.integers(0, 2**31 - 1))
    if kind == "nm":
        m = draw(st.sampled_from([4, 8, 16]))
        w = nm_exact(rows, cols, draw(st.integers(1, m - 1)), m, seed)
    elif kind == "block":
        side = st.sampled_from(BLOCK_SIDES)
        w = blocky(rows, cols, (draw(side), draw(side)), draw(st.sampled_from([0.1, 0.5, 0.9])), seed)
    else:
        w = torch.randn(rows, cols, generator=gen(seed))
        w[torch.rand(rows, cols, generator=gen(seed + 1)) >= draw(st.floats(0, 1))] = 0
        if kind == "zero rows":
            w[torch.rand(rows, generator=gen(seed + 2)) < 0.5] = 0
    holes = draw(st.sampled_from([0.0, 0.0, 0.02, 0.2]))
    w[torch.rand(rows, cols, generator=gen(seed + 3)) < holes] = 0
    return w.to(draw(st.sampled_from(DTYPES)))


@settings(FAST, max_examples=25)
@given(w=weights())
def test_detect_matches_brute_force_and_converts(w):
    p = sf.detect_pattern(w)
    assert p == brute_force(w)
    assert p.density == pytest.approx(int((w != 0).sum()) / w.numel())
    if p.kind == "n:m":
        x = sf.NM.from_dense(w, n=p.n, m=p.m)  # must not raise
        assert torch.equal(x.to_dense(), w)
    elif p.kind == "block":
        b = sf.BSR.from_dense(w, block=p.block)
        assert b.nblocks < (-(-w.shape[0] // p.block[0])) * (-(-w.shape[1] // p.block[1]))
        assert torch.equal(b.to_dense(), w)
    elif p.kind == "dense":
        assert bool((w != 0).all())
