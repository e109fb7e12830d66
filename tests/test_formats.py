"""The weight formats (Bitmask, CSR, BSR, NM): exact round trips (hypothesis over shapes, dtypes,
sparsity, every block size and every n:m), storage layout and size bounds, immutability, device and
dtype moves, clear errors for bad inputs, and validation of tampered buffers in from_tensors.

Round trips are compared bit for bit. The one documented exception: a -0.0 counts as zero, so it
comes back as +0.0 (NaN, inf and -inf are stored and come back exactly)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import ATOL, assert_close_2x
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import sparseflow as sf

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
SIDES = [1, 2, 4, 8, 16, 32, 64, 128]
NM_PAIRS = [(n, m) for m in (4, 8, 16) for n in range(1, m)]
INT_VIEW = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}
FAST = settings(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


# ---------------------------------------------------------------------------------------------- helpers


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(INT_VIEW[t.dtype])


def canonical(w: torch.Tensor) -> torch.Tensor:
    """What to_dense must return for w: w itself with -0.0 as +0.0 (NaN payloads kept)."""
    return torch.where(w == 0, torch.zeros((), dtype=w.dtype), w).contiguous()


def assert_bitwise(got: torch.Tensor, w: torch.Tensor) -> None:
    assert got.dtype == w.dtype, (got.dtype, w.dtype)
    assert tuple(got.shape) == tuple(w.shape), (got.shape, w.shape)
    assert got.device == w.device
    expected = canonical(w)
    same = bits(got) == bits(expected)
    if not bool(same.all()):
        r, c = (int(i) for i in (~same).nonzero()[0])
        got_bits, want_bits = int(bits(got)[r, c]), int(bits(expected)[r, c])
        raise AssertionError(f"element ({r}, {c}): got {got[r, c].item()!r} (bits {got_bits:#x}), "
                             f"expected {expected[r, c].item()!r} (bits {want_bits:#x})")


def sprinkle_specials(w: torch.Tensor, where: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """NaN, inf and -inf at a few random positions where `where` is True, -0.0 at a few others."""
    pick = (torch.rand(w.shape, generator=g) < 0.02) & where
    kind = torch.randint(0, 3, w.shape, generator=g)
    w = w.clone()
    w[pick & (kind == 0)] = float("nan")
    w[pick & (kind == 1)] = float("inf")
    w[pick & (kind == 2)] = float("-inf")
    w[(torch.rand(w.shape, generator=g) < 0.02) & ~pick] = -0.0
    return w


def random_weight(rows, cols, dtype, density, seed, zero_rows=0.0, specials=False) -> torch.Tensor:
    """Unstructured: each element non-zero with probability `density`; some rows all zero."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g)
    w[torch.rand(rows, cols, generator=g) >= density] = 0
    w[torch.rand(rows, generator=g) < zero_rows] = 0
    w = w.to(dtype)
    return sprinkle_specials(w, w != 0, g) if specials else w


def nm_weight(rows, cols, n, m, dtype, density, seed, specials=False) -> torch.Tensor:
    """At most n non-zeros in every group of m (exactly n where density is 1)."""
    g = torch.Generator().manual_seed(seed)
    groups = -(-cols // m)
    slots = torch.rand(rows, groups, m, generator=g).argsort(-1).argsort(-1) < n
    keep = slots.view(rows, -1)[:, :cols] & (torch.rand(rows, cols, generator=g) < density)
    w = torch.randn(rows, cols, generator=g).to(dtype)
    w = sprinkle_specials(w, keep, g) if specials else w
    return torch.where(keep, w, torch.zeros((), dtype=dtype))


def block_weight(rows, cols, block, dtype, block_density, density, seed, specials=False) -> torch.Tensor:
    """Blocks kept with probability block_density; inside kept blocks, elements with `density`."""
    bm, bk = block
    g = torch.Generator().manual_seed(seed)
    keep = torch.rand(-(-rows // bm), -(-cols // bk), generator=g) < block_density
    keep = keep.repeat_interleave(bm, 0).repeat_interleave(bk, 1)[:rows, :cols]
    keep &= torch.rand(rows, cols, generator=g) < density
    w = torch.randn(rows, cols, generator=g).to(dtype)
    w = sprinkle_specials(w, keep, g) if specials else w
    return torch.where(keep, w, torch.zeros((), dtype=dtype))


def build(fmt: str, w: torch.Tensor, **kw):
    if fmt == "bitmask":
        return sf.Bitmask.from_dense(w)
    if fmt == "csr":
        return sf.CSR.from_dense(w)
    if fmt == "bsr":
        return sf.BSR.from_dense(w, block=kw.get("block", (4, 8)))
    return sf.NM.from_dense(w, n=kw.get("n", 2), m=kw.get("m", 4), prune=kw.get("prune", True))


FORMATS = ["bitmask", "csr", "bsr", "nm"]


def check_round_trip(obj, w: torch.Tensor) -> None:
    """to_dense is w bit for bit, the buffers have their documented types, and from_tensors with
    validation accepts exactly what from_dense produced."""
    assert tuple(obj.shape) == tuple(w.shape) and obj.dtype == w.dtype and obj.device == w.device
    dense = obj.to_dense()
    assert_bitwise(dense, w)
    assert dense.is_contiguous()
    assert obj.values.dtype == w.dtype and obj.values.is_contiguous()
    assert list(obj.tensors()) == list(type(obj).tensor_names)
    again = type(obj).from_tensors(tuple(obj.shape), obj.tensors(), **obj.params())
    assert_bitwise(again.to_dense(), w)
    assert obj.nbytes == sum(t.numel() * t.element_size() for t in obj.tensors().values())


dtypes = st.sampled_from(DTYPES)
sides = st.integers(1, 300)
densities = st.one_of(st.sampled_from([0.0, 1.0]), st.floats(0.0, 1.0))
seeds = st.integers(0, 2**31 - 1)


# ------------------------------------------------------------------------------- round trips (hypothesis)


@settings(FAST, max_examples=40)
@given(rows=sides, cols=sides, dtype=dtypes, density=densities, seed=seeds,
       zero_rows=st.sampled_from([0.0, 0.3, 1.0]), specials=st.booleans())
def test_bitmask_round_trip(rows, cols, dtype, density, seed, zero_rows, specials):
    w = random_weight(rows, cols, dtype, density, seed, zero_rows, specials)
    b = sf.Bitmask.from_dense(w)
    check_round_trip(b, w)
    nonzero = (w != 0).numpy()
    assert b.nnz == int(nonzero.sum()) and b.density == pytest.approx(nonzero.mean())
    assert b.mask.dtype == torch.uint8 and b.row_offsets.dtype == torch.int64
    # Layout: one bit per element in little bit order, rows padded to whole bytes.
    assert np.array_equal(b.mask.numpy(), np.packbits(nonzero, axis=1, bitorder="little"))
    assert b.row_offsets.tolist() == [0, *np.cumsum(nonzero.sum(1)).tolist()]


@settings(FAST, max_examples=40)
@given(rows=sides, cols=sides, dtype=dtypes, density=densities, seed=seeds,
       zero_rows=st.sampled_from([0.0, 0.3, 1.0]), specials=st.booleans())
def test_csr_round_trip(rows, cols, dtype, density, seed, zero_rows, specials):
    w = random_weight(rows, cols, dtype, density, seed, zero_rows, specials)
    c = sf.CSR.from_dense(w)
    check_round_trip(c, w)
    assert c.col_indices.dtype == torch.int16 and c.row_ptr.dtype == torch.int64
    nonzero = w != 0
    assert c.nnz == int(nonzero.sum())
    assert torch.equal(c.column_indices(), nonzero.nonzero()[:, 1])


@settings(FAST, max_examples=40)
@given(rows=sides, cols=sides, dtype=dtypes, bm=st.sampled_from(SIDES), bk=st.sampled_from(SIDES),
       block_density=st.sampled_from([0.0, 0.1, 0.5, 1.0]), density=st.sampled_from([0.0, 0.3, 1.0]),
       seed=seeds, specials=st.booleans())
# blocks one column wide, where reshape returned a non-contiguous view (found by hypothesis)
@example(rows=4, cols=2, dtype=torch.float32, bm=4, bk=1, block_density=0.0, density=0.0, seed=0, specials=False)
def test_bsr_round_trip(rows, cols, dtype, bm, bk, block_density, density, seed, specials):
    w = block_weight(rows, cols, (bm, bk), dtype, block_density, density, seed, specials)
    b = sf.BSR.from_dense(w, block=(bm, bk))
    check_round_trip(b, w)
    assert b.block == (bm, bk) and b.col_indices.dtype == torch.int32 and b.row_ptr.dtype == torch.int64
    # Kept blocks are exactly those with a non-zero; the edge blocks' padding is zero.
    kept = sf.BSR.blocked(w != 0, (bm, bk)).any(-1).any(-1)
    assert b.nblocks == int(kept.sum()) and tuple(b.values.shape) == (b.nblocks, bm, bk)
    assert torch.equal(b.col_indices.long(), kept.nonzero()[:, 1])
    assert int(b.values.count_nonzero()) == int((w != 0).sum())


@settings(FAST, max_examples=50)
@given(rows=sides, cols=sides, dtype=dtypes, nm=st.sampled_from(NM_PAIRS),
       density=st.sampled_from([0.0, 0.5, 1.0]), seed=seeds, specials=st.booleans())
def test_nm_round_trip(rows, cols, dtype, nm, density, seed, specials):
    n, m = nm
    w = nm_weight(rows, cols, n, m, dtype, density, seed, specials)
    x = sf.NM.from_dense(w, n=n, m=m)
    check_round_trip(x, w)
    groups = -(-cols // m)
    bits_per = 2 if m == 4 else 4
    assert (x.n, x.m) == (n, m) and tuple(x.values.shape) == (rows, groups * n)
    assert x.index.dtype == torch.uint8 and tuple(x.index.shape) == (rows, -(-groups * n * bits_per // 8))
    pos = x.positions().view(rows, groups, n).long()
    assert bool((pos.diff(dim=-1) > 0).all()) and bool((pos < m).all())
    assert x.density == n / m


@settings(FAST, max_examples=30)
@given(rows=sides, cols=sides, dtype=dtypes, nm=st.sampled_from(NM_PAIRS), seed=seeds,
       density=st.sampled_from([0.3, 1.0]), specials=st.booleans())
def test_nm_prune_keeps_largest(rows, cols, dtype, nm, seed, density, specials):
    n, m = nm
    w = random_weight(rows, cols, dtype, density, seed, specials=specials)
    x = sf.NM.from_dense(w, n=n, m=m, prune=True)
    got = x.to_dense()
    pad = (-cols) % m
    kept = F.pad(got != 0, (0, pad)).view(rows, -1, m)
    nonzero = F.pad(w != 0, (0, pad)).view(rows, -1, m)
    # Each group keeps min(n, its non-zeros) values, unchanged, and drops only values no larger than it keeps.
    assert torch.equal(kept.sum(-1), nonzero.sum(-1).clamp(max=n))
    assert_bitwise(torch.where(got != 0, got, torch.zeros((), dtype=dtype)),
                   torch.where(got != 0, w, torch.zeros((), dtype=dtype)))
    mag = F.pad(w.float().abs().nan_to_num(nan=float("inf")), (0, pad)).view(rows, -1, m)
    smallest_kept = torch.where(kept, mag, torch.full((), float("inf"))).amin(-1)
    largest_dropped = torch.where(nonzero & ~kept, mag, torch.full((), -1.0)).amax(-1)
    assert bool((largest_dropped <= smallest_kept).all())
    # A weight that is already n:m comes back unchanged.
    assert_bitwise(sf.NM.from_dense(got, n=n, m=m).to_dense(), got)


# ------------------------------------------------------------------- every block size and every n:m


@pytest.mark.parametrize("bm", SIDES)
@pytest.mark.parametrize("bk", SIDES)
def test_bsr_every_block_size(bm, bk):
    w = block_weight(131, 133, (bm, bk), torch.bfloat16, 0.4, 0.8, seed=bm * 1000 + bk, specials=True)
    check_round_trip(sf.BSR.from_dense(w, block=(bm, bk)), w)


@pytest.mark.parametrize("n,m", NM_PAIRS)
def test_nm_every_pair(n, m):
    cols = 3 * m + 1  # a partial last group
    w = nm_weight(37, cols, n, m, torch.float16, 0.9, seed=n * 100 + m, specials=True)
    check_round_trip(sf.NM.from_dense(w, n=n, m=m), w)


def test_nm_index_layout():
    """2-bit positions for m=4, 4-bit otherwise, packed low bits first across groups."""
    w = torch.tensor([[0, 1, 0, 2, 3, 0, 0, 4]], dtype=torch.float32)  # positions (1, 3), (0, 3)
    x = sf.NM.from_dense(w, n=2, m=4)
    assert x.index.tolist() == [[1 | 3 << 2 | 0 << 4 | 3 << 6]]
    assert x.values.tolist() == [[1, 2, 3, 4]]
    y = sf.NM.from_dense(torch.cat([w, w], 1), n=4, m=8)
    assert y.index.tolist() == [[1 | 3 << 4, 4 | 7 << 4] * 2]
    # A group with fewer than n non-zeros fills up with its earliest zeros.
    z = sf.NM.from_dense(torch.tensor([[0.0, 0, 5, 0]]), n=2, m=4)
    assert z.positions().tolist() == [[0, 2]] and z.values.tolist() == [[0, 5]]


def test_csr_index_width():
    """int16 column indices (read as unsigned) up to K = 65536, int32 beyond."""
    for cols, dtype in [(65536, torch.int16), (65537, torch.int32)]:
        w = torch.zeros(2, cols)
        w[0, [0, 32767, 32768, cols - 1]] = torch.tensor([1.0, 2.0, 3.0, 4.0])
        w[1, cols - 2] = 5.0
        c = sf.CSR.from_dense(w)
        assert c.col_indices.dtype == dtype
        assert c.column_indices().tolist() == [0, 32767, 32768, cols - 1, cols - 2]
        check_round_trip(c, w)


@pytest.mark.parametrize("fmt", FORMATS)
def test_many_row_chunks(fmt, monkeypatch):
    """Conversions walk big weights in chunks of about CHUNK_ELEMENTS elements: a small chunk size
    puts chunk edges everywhere, and rows longer than a chunk make one-row (one-block-row) chunks."""
    monkeypatch.setattr(sf.formats._bits, "CHUNK_ELEMENTS", 2000)
    for rows, cols in [(203, 260), (9, 2500), (40, 999)]:
        w = nm_weight(rows, cols, 2, 4, torch.bfloat16, 0.8, seed=rows + cols, specials=True)
        w[30:37] = 0
        for block in [(16, 8), (1, 128), (128, 2)] if fmt == "bsr" else [None]:
            check_round_trip(build(fmt, w, block=block, prune=False), w)
    w = nm_weight(203, 260, 2, 4, torch.float32, 1.0, seed=0)
    w[150, 12:16] = 1.0
    w[190, 0:4] = 1.0
    with pytest.raises(ValueError, match="row 150, group 3 "):
        sf.NM.from_dense(w, n=2, m=4)


def test_chunks_are_larger_on_a_gpu():
    """A GPU runs each chunk's torch ops as launches of their own: its chunks are larger (the CPU's
    stay cache-sized); both cover every row once, starting at multiples of `multiple`."""
    from sparseflow.formats._bits import CHUNK_ELEMENTS, GPU_CHUNK_ELEMENTS, row_chunks

    assert GPU_CHUNK_ELEMENTS >= 8 * CHUNK_ELEMENTS
    for device, elements in ((None, CHUNK_ELEMENTS), (torch.device("cpu"), CHUNK_ELEMENTS),
                             (torch.device("cuda"), GPU_CHUNK_ELEMENTS), (torch.device("meta"), GPU_CHUNK_ELEMENTS)):
        chunks = list(row_chunks(14336, 4096, multiple=4, device=device))
        assert chunks[0] == slice(0, elements // 4096) and all(c.start % 4 == 0 for c in chunks)
        assert [r for c in chunks for r in range(c.start, c.stop)] == list(range(14336))


# -------------------------------------------------------------------------- special values and zeros


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("fmt", FORMATS)
def test_nan_inf_and_negative_zero(fmt, dtype):
    w = torch.zeros(6, 20, dtype=dtype)
    w[0, :4] = torch.tensor([float("nan"), 0.0, float("inf"), 0.0])
    w[1, 4:8] = torch.tensor([-0.0, float("-inf"), 0.0, -0.0])
    w[2, 8:12] = torch.tensor([1.5, -0.0, -2.0, 0.0])
    w[3] = -0.0  # a row of negative zeros is an all-zero row
    w[5, 16:20] = torch.tensor([0.0, 7.0, 0.0, float("nan")])
    obj = build(fmt, w, block=(2, 4), prune=False)
    check_round_trip(obj, w)
    dense = obj.to_dense()
    assert torch.isnan(dense[0, 0]) and torch.isinf(dense[0, 2]) and dense[1, 5] == float("-inf")
    negative_zero = (dense == 0) & torch.signbit(dense)
    assert not bool(negative_zero.any()), "-0.0 comes back as +0.0"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("fmt", FORMATS)
def test_all_zero_and_all_dense(fmt, dtype):
    zeros = torch.zeros(5, 33, dtype=dtype)
    obj = build(fmt, zeros, block=(4, 16), prune=False)
    check_round_trip(obj, zeros)
    assert obj.nnz == 0
    if fmt in ("bitmask", "csr", "bsr"):
        assert obj.values.numel() == 0 and obj.density == 0.0
    full = torch.rand(5, 33).add(0.5).to(dtype)
    if fmt != "nm":
        check_round_trip(build(fmt, full, block=(4, 16)), full)


@pytest.mark.parametrize("fmt", FORMATS)
def test_non_contiguous_inputs(fmt):
    base = nm_weight(96, 80, 2, 4, torch.float32, 0.9, seed=3)
    views = {
        "transposed": nm_weight(80, 96, 2, 4, torch.float32, 0.9, seed=4).t(),
        "column slice": base[:, 8:72],
        "strided": base[::2, ::1],
        "strided columns": torch.cat([base, base], 1)[:, ::2],
        "row slice": base[5:50],
        "expanded": base[:1].expand(7, -1),
    }
    for name, w in views.items():
        if fmt == "nm" and name in ("transposed", "strided columns"):
            obj = sf.NM.from_dense(w, prune=True)
            check_round_trip(obj, sf.NM.from_dense(w.contiguous(), prune=True).to_dense())
            continue
        obj = build(fmt, w, block=(8, 4), prune=False)
        check_round_trip(obj, w)


@pytest.mark.parametrize("fmt", FORMATS)
def test_parameter_input(fmt):
    """An nn.Linear weight (a Parameter that requires grad) converts; the format holds plain data."""
    linear = torch.nn.Linear(64, 24)
    with torch.no_grad():
        linear.weight.copy_(nm_weight(24, 64, 2, 4, torch.float32, 1.0, seed=16))
    obj = build(fmt, linear.weight, block=(8, 8), prune=False)
    assert not obj.values.requires_grad and obj.values.grad_fn is None
    check_round_trip(obj, linear.weight.detach())
    assert_bitwise(sf.NM.from_dense(linear.weight, prune=True).to_dense(), linear.weight.detach())


# ----------------------------------------------------------------------------- dtypes, devices, sizes


@pytest.mark.parametrize("fmt", FORMATS)
def test_to_device_and_dtype(fmt):
    w = nm_weight(40, 64, 2, 4, torch.float32, 0.7, seed=5)
    obj = build(fmt, w, block=(8, 8), prune=False)
    meta = {k: v for k, v in obj.tensors().items() if k != "values"}
    for moved in (obj.to("cpu"), obj.to(torch.device("cpu")), obj.to(device="cpu")):
        assert type(moved) is type(obj) and moved is not obj and moved.device.type == "cpu"
        check_round_trip(moved, w)
    for dtype in DTYPES:
        for converted in (obj.to(dtype=dtype), obj.to(dtype), obj.to("cpu", dtype)):
            assert converted.dtype == dtype and converted.params() == obj.params()
            check_round_trip(converted, w.to(dtype))
            for name, t in meta.items():  # metadata keeps its type and content
                assert torch.equal(converted.tensors()[name], t), name
    with pytest.raises(TypeError, match="int8"):
        obj.to(dtype=torch.int8)
    with pytest.raises(TypeError, match="float64"):
        obj.to(torch.float64)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("fmt", FORMATS)
def test_to_cuda_and_back(fmt):
    w = nm_weight(40, 64, 2, 4, torch.bfloat16, 0.7, seed=6)
    obj = build(fmt, w, block=(8, 8), prune=False).to("cuda")
    assert obj.device.type == "cuda" and all(t.is_cuda for t in obj.tensors().values())
    assert_bitwise(obj.to_dense(), w.cuda())
    check_round_trip(build(fmt, w.cuda(), block=(8, 8), prune=False), w.cuda())
    assert_bitwise(obj.to("cpu").to_dense(), w)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("fmt", FORMATS)
def test_many_row_chunks_on_cuda(fmt, monkeypatch):
    """The GPU's conversions chunk by GPU_CHUNK_ELEMENTS: chunk edges everywhere, as on the CPU."""
    monkeypatch.setattr(sf.formats._bits, "GPU_CHUNK_ELEMENTS", 2000)
    for rows, cols in [(203, 260), (9, 2500)]:
        w = nm_weight(rows, cols, 2, 4, torch.bfloat16, 0.8, seed=rows + cols, specials=True).cuda()
        for block in [(16, 8), (1, 128)] if fmt == "bsr" else [None]:
            check_round_trip(build(fmt, w, block=block, prune=False), w)


@pytest.mark.parametrize("fmt", FORMATS)
def test_immutable(fmt):
    obj = build(fmt, random_weight(8, 16, torch.float32, 0.5, seed=7), block=(4, 4))
    for name in (*obj.tensor_names, "shape", "new_attribute"):
        with pytest.raises(AttributeError, match="immutable"):
            setattr(obj, name, None)
        with pytest.raises(AttributeError):
            delattr(obj, name)
    for name in ("dtype", "device", "nbytes", "density"):
        with pytest.raises(AttributeError):
            setattr(obj, name, None)


@pytest.mark.parametrize("rows,cols", [(64, 128), (37, 101), (1, 1), (300, 8)])
def test_nbytes_and_metadata_bounds(rows, cols):
    w = random_weight(rows, cols, torch.bfloat16, 0.5, seed=rows * cols)

    b = sf.Bitmask.from_dense(w)
    assert b.nbytes == b.values.numel() * 2 + b.mask.numel() + b.row_offsets.numel() * 8
    assert b.values.numel() == b.nnz
    # Metadata: one bit per element (each row rounded up to whole bytes) + 8 bytes per row, + one end offset.
    meta = b.mask.numel() + b.row_offsets.numel() * 8
    assert meta == rows * -(-cols // 8) + 8 * (rows + 1)
    if cols % 8 == 0:
        assert meta == rows * cols // 8 + 8 * rows + 8

    c = sf.CSR.from_dense(w)
    assert c.nbytes == c.nnz * (2 + 2) + (rows + 1) * 8  # bf16 values + int16 columns + row pointers

    blocked = block_weight(rows, cols, (16, 8), torch.bfloat16, 0.3, 1.0, seed=9)
    s = sf.BSR.from_dense(blocked, block=(16, 8))
    block_rows = -(-rows // 16)
    assert s.nbytes == s.nblocks * 16 * 8 * 2 + s.nblocks * 4 + (block_rows + 1) * 8
    # Metadata: one int32 per block + the block-row pointers.
    assert s.col_indices.numel() * s.col_indices.element_size() == 4 * s.nblocks

    x = sf.NM.from_dense(nm_weight(rows, cols, 2, 4, torch.bfloat16, 1.0, seed=10), n=2, m=4)
    stored = x.values.numel()
    assert x.nbytes == stored * 2 + x.index.numel()
    # 2:4 metadata: 2 bits per stored value, each row rounded up to a whole byte (exact when K % 8 == 0).
    assert x.index.numel() * 8 <= 2 * stored + 7 * rows
    if cols % 8 == 0:
        assert x.index.numel() * 8 == 2 * stored
    assert stored == rows * -(-cols // 4) * 2


def test_compression_ratios_at_typical_sparsity():
    w50 = random_weight(256, 512, torch.bfloat16, 0.5, seed=11)
    dense_bytes = w50.numel() * 2
    assert sf.Bitmask.from_dense(w50).nbytes < 0.6 * dense_bytes
    w24 = nm_weight(256, 512, 2, 4, torch.bfloat16, 1.0, seed=12)
    assert sf.NM.from_dense(w24).nbytes == dense_bytes // 2 + dense_bytes // 16  # 0.5625
    w5 = random_weight(256, 512, torch.bfloat16, 0.05, seed=13)
    assert sf.CSR.from_dense(w5).nbytes < 0.12 * dense_bytes


# ----------------------------------------------------------------------------------------- bad inputs


BAD_WEIGHTS = [
    (torch.ones(4, 4, dtype=torch.int32), TypeError, "int32"),
    (torch.ones(4, 4, dtype=torch.int8), TypeError, "int8"),
    (torch.ones(4, 4, dtype=torch.int64), TypeError, "int64"),
    (torch.ones(4, 4, dtype=torch.uint8), TypeError, "uint8"),
    (torch.ones(4, 4, dtype=torch.bool), TypeError, "bool"),
    (torch.ones(4, 4, dtype=torch.float64), TypeError, "float64"),
    (torch.ones(4, 4, dtype=torch.complex64), TypeError, "complex64"),
    (torch.ones(16), ValueError, "2-D"),
    (torch.ones(2, 4, 4), ValueError, "2-D"),
    (torch.ones(()), ValueError, "2-D"),
    (torch.ones(0, 4), ValueError, "empty"),
    (torch.ones(4, 0), ValueError, "empty"),
    (np.ones((4, 4), dtype=np.float32), TypeError, "torch.Tensor"),
    ([[1.0, 0.0]], TypeError, "torch.Tensor"),
]


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("bad,error,message", BAD_WEIGHTS, ids=[str(i) for i in range(len(BAD_WEIGHTS))])
def test_bad_weights_raise_clear_errors(fmt, bad, error, message):
    with pytest.raises(error, match=message):
        build(fmt, bad)


BAD_BLOCKS = [(3, 4), (0, 32), (32, 256), (-4, 4), (48, 16), 32, (32,), (32, 32, 32), "32", (32.0, 32), None]


@pytest.mark.parametrize("block", BAD_BLOCKS)
def test_bad_block_sizes(block):
    with pytest.raises(ValueError, match="block"):
        sf.BSR.from_dense(torch.ones(64, 64), block=block)


BAD_NM = [(0, 4), (4, 4), (5, 4), (-1, 8), (2, 6), (2, 32), (1, 2), (2.0, 4), ("2", 4), (None, 4)]


@pytest.mark.parametrize("n,m", BAD_NM)
def test_bad_nm(n, m):
    with pytest.raises(ValueError, match="n:m|n and m"):
        sf.NM.from_dense(torch.zeros(8, 16), n=n, m=m)
    with pytest.raises(ValueError, match="n:m|n and m"):
        sf.NM.from_dense(torch.zeros(8, 16), n=n, m=m, prune=True)


def test_nm_violation_names_first_row_and_group():
    w = nm_weight(600, 4096, 2, 4, torch.float32, 1.0, seed=14)
    w[300, 8:12] = torch.tensor([1.0, 2.0, 3.0, 0.0])  # group 2 of row 300: three non-zeros
    w[300, 40:44] = 1.0
    w[512, 0:4] = 1.0
    message = r"not 2:4 sparse: row 300, group 2 \(columns 8\.\.11\) has 3 non-zeros"
    with pytest.raises(ValueError, match=message):
        sf.NM.from_dense(w, n=2, m=4)
    w2 = torch.zeros(3, 21)
    w2[2, 16:21] = 1.0  # the partial last group (columns 16..20) of 5:8 is fine; 4:8 is not
    sf.NM.from_dense(w2, n=5, m=8)
    with pytest.raises(ValueError, match=r"row 2, group 2 \(columns 16\.\.20\) has 5 non-zeros.*prune=True"):
        sf.NM.from_dense(w2, n=4, m=8)


# ---------------------------------------------------------------------------------- tampered buffers


def tampered(obj, **changes):
    tensors = {k: v.clone() for k, v in obj.tensors().items()}
    for name, change in changes.items():
        tensors[name] = change(tensors[name])
    return tensors


def setitem(index, value):
    def change(t):
        t[index] = value
        return t
    return change


W_TAMPER = torch.tensor([
    [1.0, 0.0, 2.0, 0.0, 0.0, 3.0, 0.0, 0.0, 0.0, 4.0, 0.0, 0.0],
    [0.0, 5.0, 0.0, 6.0, 0.0, 0.0, 0.0, 7.0, 8.0, 0.0, 0.0, 0.0],
    [0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0],
    [0.0, 0.0, 9.0, 1.0, 0.0, 0.0, 2.0, 0.0, 3.0, 0.0, 0.0, 4.0],
])  # 2:4 as well

BITMASK_TAMPER = {
    "offset start": (dict(row_offsets=setitem(0, 1)), "row_offsets\\[0\\] is 1"),
    "offsets inconsistent": (dict(row_offsets=setitem(1, 3)), "row 0 has 4 mask bits set but .* gives 3"),
    "offsets decreasing": (dict(row_offsets=setitem(2, 2)), "row 1 has 4 mask bits set"),
    "too few values": (dict(values=lambda v: v[:-1]), "row_offsets\\[-1\\] is 13 but there are 12 values"),
    "extra mask bit": (dict(mask=setitem((2, 0), 1)), "row 2 has 1 mask bits set"),
    "bit past last column": (dict(mask=setitem((2, 1), 0x10)), "row 2 sets mask bits past column 12"),
    "mask dtype": (dict(mask=lambda t: t.to(torch.int16)), "mask must be uint8"),
    "mask shape": (dict(mask=lambda t: t[:3]), "mask must be uint8"),
    "offsets dtype": (dict(row_offsets=lambda t: t.to(torch.int32)), "row_offsets must be int64"),
    "offsets shape": (dict(row_offsets=lambda t: t[:-1]), "row_offsets must be int64"),
    "values dtype": (dict(values=lambda t: t.to(torch.float64)), "values must be a 1-D float"),
    "values shape": (dict(values=lambda t: t.view(1, -1)), "values must be a 1-D float"),
}

CSR_TAMPER = {
    "pointer start": (dict(row_ptr=setitem(0, 1)), "row_ptr\\[0\\] is 1"),
    "pointer decreasing": (dict(row_ptr=setitem(1, 9)), "row_ptr decreases at row 1"),
    "pointer end": (dict(row_ptr=setitem(4, 11)), "row_ptr\\[-1\\] is 11 but there are 13 stored entries"),
    "column out of range": (dict(col_indices=setitem(0, 12)), "index 12 in row 0 is outside \\[0, 12\\)"),
    "int16 read as unsigned": (dict(col_indices=setitem(3, -1)), "column index 65535 in row 0"),
    "columns not increasing": (dict(col_indices=setitem(1, 0)), "row 0 are not strictly increasing"),
    "duplicate column": (dict(col_indices=setitem(5, 1)), "row 1 are not strictly increasing"),
    "negative int32 column": (dict(col_indices=lambda t: setitem(6, -3)(t.int())), "column index -3"),
    "column dtype": (dict(col_indices=lambda t: t.to(torch.int64)), "col_indices must be int16/int32"),
    "column count": (dict(col_indices=lambda t: t[:-1]), "col_indices must be int16/int32"),
    "pointer dtype": (dict(row_ptr=lambda t: t.to(torch.int32)), "row_ptr must be int64"),
    "pointer shape": (dict(row_ptr=lambda t: t[:-1]), "row_ptr must be int64"),
    "values dtype": (dict(values=lambda t: t.to(torch.int32)), "values must be a 1-D float"),
}

BSR_TAMPER = {  # block (2, 4): 2 block rows x 3 block columns
    "pointer start": (dict(row_ptr=setitem(0, 1)), "row_ptr\\[0\\] is 1"),
    "pointer decreasing": (dict(row_ptr=setitem(1, 7)), "row_ptr decreases at row 1 \\(7 -> 6\\)"),
    "pointer end": (dict(row_ptr=setitem(2, 4)), "row_ptr\\[-1\\] is 4 but there are 6"),
    "column out of range": (dict(col_indices=setitem(0, 3)), "column 3 in block row 0 is outside \\[0, 3\\)"),
    "negative column": (dict(col_indices=setitem(0, -1)), "block column -1"),
    "columns not increasing": (dict(col_indices=setitem(1, 0)), "block row 0 are not strictly increasing"),
    "column dtype": (dict(col_indices=lambda t: t.to(torch.int64)), "col_indices must be int32"),
    "column count": (dict(col_indices=lambda t: t[:-1]), "col_indices must be int32"),
    "pointer dtype": (dict(row_ptr=lambda t: t.to(torch.int32)), "row_ptr must be int64"),
    "pointer shape": (dict(row_ptr=lambda t: torch.cat([t, t[-1:]])), "row_ptr must be int64"),
    "block shape": (dict(values=lambda t: t.reshape(-1, 4, 2)), "values must be float \\[nblocks, 2, 4\\]"),
    "values 2-D": (dict(values=lambda t: t.reshape(t.shape[0], -1)), "values must be float"),
}

NM_TAMPER = {  # 2:4; each row: 3 groups x 2 positions x 2 bits = 12 bits -> 2 bytes
    "positions equal": (dict(index=setitem((0, 0), 0b0101)), "in row 0 group 0 are not strictly increasing"),
    "positions decreasing": (dict(index=setitem((1, 0), 0b0111)), "row 1 group 0 are not strictly"),
    "index dtype": (dict(index=lambda t: t.to(torch.int8)), "index must be uint8"),
    "index shape": (dict(index=lambda t: t[:, :1]), "index must be uint8"),
    "values shape": (dict(values=lambda t: t[:, :5]), "values must be float"),
    "values dtype": (dict(values=lambda t: t.to(torch.float64)), "values must be float"),
}


@pytest.mark.parametrize("case", list(BITMASK_TAMPER))
def test_tampered_bitmask(case):
    changes, message = BITMASK_TAMPER[case]
    ok = sf.Bitmask.from_dense(W_TAMPER)
    with pytest.raises(ValueError, match=message):
        sf.Bitmask.from_tensors((4, 12), tampered(ok, **changes))


@pytest.mark.parametrize("case", list(CSR_TAMPER))
def test_tampered_csr(case):
    changes, message = CSR_TAMPER[case]
    ok = sf.CSR.from_dense(W_TAMPER)
    with pytest.raises(ValueError, match=message):
        sf.CSR.from_tensors((4, 12), tampered(ok, **changes))


@pytest.mark.parametrize("case", list(BSR_TAMPER))
def test_tampered_bsr(case):
    changes, message = BSR_TAMPER[case]
    ok = sf.BSR.from_dense(W_TAMPER, block=(2, 4))
    assert ok.nblocks == 6
    with pytest.raises(ValueError, match=message):
        sf.BSR.from_tensors((4, 12), tampered(ok, **changes), block=(2, 4))


@pytest.mark.parametrize("case", list(NM_TAMPER))
def test_tampered_nm(case):
    changes, message = NM_TAMPER[case]
    ok = sf.NM.from_dense(W_TAMPER, n=2, m=4)
    with pytest.raises(ValueError, match=message):
        sf.NM.from_tensors((4, 12), tampered(ok, **changes), n=2, m=4)


def test_tampered_nm_position_past_group():
    """m = 8 stores 4-bit positions, which can hold 8..15."""
    ok = sf.NM.from_dense(nm_weight(4, 16, 3, 8, torch.float32, 1.0, seed=15), n=3, m=8)
    # Row 1, group 0: positions 0 and 1 in byte 0, position 2 in the low half of byte 1.
    t = tampered(ok, index=setitem((1, 1), int(ok.index[1, 1]) & 0xF0 | 9))
    with pytest.raises(ValueError, match=r"row 1 group 0\b.*\b(9|8)\b"):  # position 9, m = 8
        sf.NM.from_tensors((4, 16), t, n=3, m=8)


def test_from_tensors_other_checks():
    ok = sf.CSR.from_dense(W_TAMPER)
    with pytest.raises(ValueError, match="missing buffers \\['row_ptr'\\]"):
        sf.CSR.from_tensors((4, 12), {k: v for k, v in ok.tensors().items() if k != "row_ptr"})
    with pytest.raises(TypeError, match="values must be a torch.Tensor"):
        sf.CSR.from_tensors((4, 12), {**ok.tensors(), "values": [1.0]})
    for shape in [(0, 12), (4, 12, 1), (4,)]:
        with pytest.raises(ValueError, match="shape"):
            sf.CSR.from_tensors(shape, ok.tensors())
    # The shape must agree with the buffers: 4 rows need 5 row pointers.
    with pytest.raises(ValueError, match="row_ptr must be int64 \\(4,\\)"):
        sf.CSR.from_tensors((3, 12), ok.tensors())
    # int16 columns cannot address K > 65536.
    big = sf.CSR.from_dense(torch.eye(4, 70000))
    with pytest.raises(ValueError, match="K <= 65536"):
        sf.CSR.from_tensors((4, 70000), {**big.tensors(), "col_indices": big.col_indices.to(torch.int16)})
    bsr = sf.BSR.from_dense(W_TAMPER, block=(2, 4))
    with pytest.raises(ValueError, match="powers of two"):
        sf.BSR.from_tensors((4, 12), bsr.tensors(), block=(2, 3))
    nm = sf.NM.from_dense(W_TAMPER, n=2, m=4)
    with pytest.raises(ValueError, match="n:m"):
        sf.NM.from_tensors((4, 12), nm.tensors(), n=2, m=5)
    # n:m read with other (n, m) than written: the buffers' shapes no longer fit.
    with pytest.raises(ValueError, match="values must be float"):
        sf.NM.from_tensors((4, 12), nm.tensors(), n=1, m=4)


# ------------------------------------------------------------------------- ops.linear on each format


@pytest.mark.parametrize("fmt", FORMATS)
@settings(FAST, max_examples=4)
@given(rows=st.integers(1, 70), cols=st.integers(1, 140), batch=st.integers(1, 5), dtype=dtypes, seed=seeds,
       bm=st.sampled_from(SIDES), bk=st.sampled_from(SIDES), nm=st.sampled_from(NM_PAIRS))
def test_linear_matches_reference(fmt, rows, cols, batch, dtype, seed, bm, bk, nm):
    n, m = nm
    if fmt == "bsr":
        w = block_weight(rows, cols, (bm, bk), dtype, 0.5, 0.9, seed)
    elif fmt == "nm":
        w = nm_weight(rows, cols, n, m, dtype, 0.9, seed)
    else:
        w = random_weight(rows, cols, dtype, 0.3, seed)
    obj = build(fmt, w, block=(bm, bk), n=n, m=m, prune=False)
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(batch, cols, generator=g).to(dtype)
    bias = torch.randn(rows, generator=g).to(dtype)
    y = sf.ops.linear(x, obj, bias)
    y_ref = sf.ops.linear(x, obj, bias, backend="reference")
    ref64 = F.linear(x.double(), w.double(), bias.double())
    assert_close_2x(y, ref64, F.linear(x, w, bias))
    assert_close_2x(y_ref, ref64, F.linear(x, w, bias))
    scale = max(1.0, y_ref.abs().max().item())
    torch.testing.assert_close(y, y_ref, rtol=0, atol=4 * ATOL[dtype] * scale)
