"""The C++ decompression kernels (bit for bit what each format's to_dense gives, on every ISA level
of this CPU) and the batched backend built on them (chunks of decompressed rows + torch's GEMM),
which SparseLinear runs above its measured crossover."""

import zlib

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_close_2x, run_in_threads

import sparseflow as sf
from sparseflow._ext import _C
from sparseflow.ops import cpu, table

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
SIDES = [1, 3, 17, 33, 1000]
# every kernel path: bitmask, CSR, BSR (square, flat, tall blocks) and each way n:m builds its mask
# (whole groups per index byte: 2:4 1:4 2:8 1:16; groups over whole bytes: 4:8 6:8 8:16; others)
FORMATS = {
    "bitmask": lambda w: sf.Bitmask.from_dense(w),
    "csr": lambda w: sf.CSR.from_dense(w),
    "bsr32": lambda w: sf.BSR.from_dense(w, (32, 32)),
    "bsr4x16": lambda w: sf.BSR.from_dense(w, (4, 16)),
    "bsr128x1": lambda w: sf.BSR.from_dense(w, (128, 1)),
    "bsr1x128": lambda w: sf.BSR.from_dense(w, (1, 128)),
    **{f"{n}:{m}": (lambda w, n=n, m=m: sf.NM.from_dense(w, n, m, prune=True))
       for n, m in [(2, 4), (1, 4), (3, 4), (2, 8), (4, 8), (6, 8), (3, 8), (7, 8), (1, 16), (8, 16), (5, 16),
                    (15, 16)]},
}
INT_VIEW = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}


def weight(n, k, dtype, density, gen, specials=True):
    """Random weight with zeros and, when asked, a NaN, an inf and a -inf among the non-zeros."""
    w = torch.randn(n, k, generator=gen).to(dtype) * (torch.rand(n, k, generator=gen) < density)
    if specials and n * k >= 8 and density > 0:
        flat = w.view(-1)
        for i, v in zip(torch.randperm(n * k, generator=gen)[:3].tolist(), [float("nan"), float("inf"), -float("inf")],
                        strict=True):
            flat[i] = v
    return w


def assert_bits_equal(a: torch.Tensor, b: torch.Tensor) -> None:
    assert a.shape == b.shape and a.dtype == b.dtype, (a.shape, b.shape, a.dtype, b.dtype)
    ia, ib = a.view(INT_VIEW[a.dtype]), b.view(INT_VIEW[b.dtype])
    bad = (ia != ib).nonzero()
    assert bad.numel() == 0, f"{bad.shape[0]} elements differ, first at {bad[0].tolist()}"


# ---- decompression, bit for bit -----------------------------------------------------------------
@pytest.mark.parametrize("fmt", list(FORMATS))
def test_decompress_equals_to_dense(isa, fmt):
    gen = torch.Generator().manual_seed(zlib.crc32(fmt.encode()))
    for dtype in DTYPES:
        for n in SIDES:
            for k in SIDES:
                w = FORMATS[fmt](weight(n, k, dtype, 0.5, gen))
                assert_bits_equal(cpu.decompress(w), w.to_dense())


@pytest.fixture(params=["torch-openmp", "own-pool"])
def threads_of(request):
    """Decompression on torch's OpenMP threads (where built so) and on the kernels' own pool."""
    was = _C.shares_torch_threads()
    _C.set_shares_torch_threads(request.param == "torch-openmp")
    yield request.param
    _C.set_shares_torch_threads(was)


@pytest.mark.parametrize("fmt", ["bitmask", "csr", "bsr32", "2:4", "3:8"])
def test_decompress_in_parallel_on_either_thread_set(threads_of, fmt):
    gen = torch.Generator().manual_seed(9)
    w = FORMATS[fmt](weight(1500, 1000, torch.bfloat16, 0.5, gen))  # enough work for every thread
    assert_bits_equal(cpu.decompress(w), w.to_dense())
    x = torch.randn(600, 1000, generator=gen).to(torch.bfloat16)
    assert_bits_equal(cpu.zero_inactive(x, 0.5), torch.where(x.abs() <= 0.5, torch.zeros((), dtype=x.dtype), x))


@pytest.mark.parametrize("fmt", list(FORMATS))
@pytest.mark.parametrize("density", [0.0, 1.0])
def test_decompress_empty_and_full_weights(isa, fmt, density):
    gen = torch.Generator().manual_seed(1)
    for dtype in (torch.float32, torch.bfloat16):
        w = FORMATS[fmt](weight(70, 300, dtype, density, gen, specials=False))
        assert_bits_equal(cpu.decompress(w), w.to_dense())


@pytest.mark.parametrize("fmt", ["bitmask", "csr", "bsr32", "bsr4x16", "2:4", "3:8", "5:16"])
def test_decompress_row_ranges_into_strided_buffers(isa, fmt):
    gen = torch.Generator().manual_seed(2)
    n, k = 131, 77
    for dtype in (torch.float32, torch.float16):
        w = FORMATS[fmt](weight(n, k, dtype, 0.4, gen))
        dense = w.to_dense()
        for r0, r1 in [(0, n), (0, 0), (5, 5), (0, 1), (130, 131), (3, 37), (33, 98), (64, 131)]:
            assert_bits_equal(cpu.decompress(w, r0, r1), dense[r0:r1])
            big = torch.full((r1 - r0, k + 9), 7.0, dtype=dtype)  # row stride k + 9: columns past k stay
            cpu.decompress(w, r0, r1, out=big[:, :k])
            assert_bits_equal(big[:, :k], dense[r0:r1])
            assert bool((big[:, k:] == 7).all())


def test_bitmask_column_ranges(isa):
    gen = torch.Generator().manual_seed(6)
    for dtype in (torch.float32, torch.bfloat16):
        for n, k in [(5, 8), (33, 1000), (200, 77)]:
            w = sf.Bitmask.from_dense(weight(n, k, dtype, 0.5, gen))
            dense = w.to_dense()
            for c0, c1 in [(0, k), (0, 8), (8, k), (k // 16 * 8, k), (0, k // 16 * 8), (64, 64), (16, 40)]:
                if c1 > k:
                    continue
                for r0, r1 in [(0, n), (1, n // 2 + 1)]:
                    assert_bits_equal(cpu.decompress(w, r0, r1, col0=c0, col1=c1), dense[r0:r1, c0:c1])


def test_decompress_rejects_bad_ranges_and_buffers():
    w = sf.Bitmask.from_dense(torch.randn(8, 16) * (torch.rand(8, 16) < 0.5))
    for r0, r1 in [(-1, 4), (5, 4), (0, 9)]:
        with pytest.raises(ValueError, match="rows"):
            cpu.decompress(w, r0, r1)
    with pytest.raises(ValueError, match="out must be"):
        cpu.decompress(w, out=torch.empty(8, 15))
    with pytest.raises(ValueError, match="out must be"):
        cpu.decompress(w, out=torch.empty(8, 16, dtype=torch.float16))
    for c0, c1 in [(3, 16), (0, 12), (8, 17), (9, 8)]:  # column ranges: multiples of 8, or up to K
        with pytest.raises(ValueError, match="columns"):
            cpu.decompress(w, col0=c0, col1=c1)
    with pytest.raises(ValueError, match="Bitmask"):
        cpu.decompress(sf.CSR.from_dense(w.to_dense()), col0=8)
    v, mask, offs = w.values, w.mask, w.row_offsets
    with pytest.raises(ValueError, match="stride"):  # the raw entry point checks the row stride too
        _C.bitmask_decompress(v.data_ptr(), mask.data_ptr(), offs.data_ptr(), 8, 16, 2, v.numel(), dtype=0, row0=0,
                              row1=8, out=torch.empty(8, 16).data_ptr(), ld=15, threads=1)


def crafted(fmt):
    """A weight's buffers with one index pointing outside the weight, and the format's class."""
    w = torch.randn(16, 40) * (torch.rand(16, 40, generator=torch.Generator().manual_seed(3)) < 0.5)
    if fmt == "bitmask":
        t = sf.Bitmask.from_dense(w).tensors()
        t["mask"] = t["mask"].clone()
        t["mask"][2, -1] |= 0x80  # a bit past column 40 (the row count no longer matches either)
        return sf.Bitmask, t, {}
    if fmt == "csr":
        t = sf.CSR.from_dense(w).tensors()
        t["col_indices"] = t["col_indices"].clone()
        t["col_indices"][-1] = 40
        return sf.CSR, t, {}
    if fmt == "bsr":
        t = sf.BSR.from_dense(w, (8, 8)).tensors()
        t["col_indices"] = t["col_indices"].clone()
        t["col_indices"][0] = 5  # 40 columns are 5 block columns: 0..4
        return sf.BSR, t, {"block": (8, 8)}
    t = sf.NM.from_dense(w, 4, 8, prune=True).tensors()
    t["index"] = t["index"].clone()
    t["index"][1, 0] = 0xF9  # positions 9 and 15 in a group of 8
    return sf.NM, t, {"n": 4, "m": 8}


@pytest.mark.parametrize("fmt", ["bitmask", "csr", "bsr", "nm"])
def test_crafted_indices_raise_before_any_decompression(fmt):
    cls, tensors, params = crafted(fmt)
    with pytest.raises(ValueError):
        cls.from_tensors((16, 40), tensors, **params)
    module = sf.SparseLinear.empty(cls.format_name, params, (16, 40), bias=False, dense_above=1)
    with pytest.raises(ValueError):
        module.load_state_dict({f"weight_{k}": v for k, v in tensors.items()})


# ---- the batched backend ------------------------------------------------------------------------
def test_batched_backend_names():
    assert table.batched_backend("cpu", 2) == "batched"
    assert table.batched_backend("cpu", 1) == "reference"  # no batched row for one row of x
    assert table.batched_backend("cuda", 128) == "batched"
    assert table.batched_backend("cuda", 1) == "reference"
    for device in ("cpu", "cuda"):
        rows = {b.format for b in table.backends("linear", device=device) if b.name == "batched"}
        assert rows == {"bitmask", "csr", "bsr", "nm"}
        rows = {b.format for b in table.backends("act_sparse_linear", device=device) if b.name == "batched"}
        assert rows == {"dense", "bitmask"}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("fmt", ["bitmask", "csr", "bsr4x16", "2:4"])
def test_gpu_batched_rows_arithmetic(fmt, dtype):
    """The GPU batched rows are torch code that runs on any device: checked here on the CPU (the GPU
    suite runs them on a GPU), against float64 with the 2x idiom, NaN/inf spread as in dense."""
    from sparseflow.ops import gpu
    from sparseflow.ops.reference import act_sparse_mask

    gen = torch.Generator().manual_seed(11)
    w = FORMATS[fmt](weight(70, 45, dtype, 0.5, gen, specials=False))
    w_dense = w.to_dense()
    x = torch.randn(9, 45, generator=gen).to(dtype)
    bias = torch.randn(70, generator=gen).to(dtype)
    for b in (None, bias):
        ref64 = F.linear(x.double(), w_dense.double(), None if b is None else b.double())
        assert_close_2x(gpu.decompress_linear(x, w, b), ref64, F.linear(x, w_dense, b))
        w_t = w_dense.t().contiguous()
        x[:, ::5] = torch.tensor(0.25, dtype=dtype)  # at the threshold: inactive
        xs = torch.where(act_sparse_mask(x, 0.25), x, torch.zeros((), dtype=dtype))
        ref64 = xs.double() @ w_t.double() + (0 if b is None else b.double())
        for w_arg in (w_t, sf.Bitmask.from_dense(w_t)):
            assert_close_2x(gpu.act_sparse_batched(x, w_arg, 0.25, b), ref64, F.linear(xs, w_dense, b))
    x[0, 3], x[1, 7], x[2, 9] = float("nan"), float("inf"), -float("inf")
    dense = F.linear(x, w_dense)  # (act-sparse rows zero x's small inputs: only NaN and inf must match)
    for y in (gpu.decompress_linear(x, w, None), gpu.act_sparse_batched(x, w_dense.t(), 0.25, None),
              gpu.act_sparse_batched(x, sf.Bitmask.from_dense(w_dense.t().contiguous()), 0.25, None)):
        assert torch.equal(torch.isnan(y), torch.isnan(dense))  # NaN/inf spread as in dense
        inf = torch.isinf(dense)
        assert torch.equal(torch.isinf(y), inf) and torch.equal(y[inf], dense[inf])


@pytest.fixture
def small_chunks(monkeypatch):
    """Chunks of 64 weight rows, so every shape here takes several chunks and a partial last one."""
    monkeypatch.setattr(cpu, "CHUNK_BYTES", 1)
    monkeypatch.setattr(cpu, "MAX_CHUNK_BYTES", 1)
    monkeypatch.setattr(cpu, "MIN_CHUNK_ROWS", 64)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("fmt", ["bitmask", "csr", "bsr4x16", "2:4", "3:8"])
@pytest.mark.parametrize("M,N,K", [(2, 3, 17), (17, 200, 33), (129, 1000, 65), (5, 64, 1000)])
def test_batched_path_matches_reference(isa, small_chunks, fmt, dtype, M, N, K):
    gen = torch.Generator().manual_seed(M * N + K)
    w = FORMATS[fmt](weight(N, K, dtype, 0.5, gen, specials=False))
    w_dense = w.to_dense()
    x = torch.randn(M, K, generator=gen).to(dtype)
    bias = torch.randn(N, generator=gen).to(dtype)
    for b in (None, bias):
        y = sf.ops.linear(x, w, b, backend="batched")
        ref64 = F.linear(x.double(), w_dense.double(), None if b is None else b.double())
        assert_close_2x(y, ref64, F.linear(x, w_dense, b))


def test_batched_path_batch_dims_noncontiguous_x_and_nonfinite(small_chunks):
    gen = torch.Generator().manual_seed(4)
    w = sf.Bitmask.from_dense(weight(150, 40, torch.float32, 0.5, gen, specials=False))
    w_dense = w.to_dense()
    x = torch.randn(3, 40, 7, generator=gen).transpose(1, 2)  # [3, 7, 40], non-contiguous
    x[1, 2, 5] = float("nan")
    x[2, 0, 0] = float("inf")
    y = sf.ops.linear(x, w, backend="batched")
    dense = F.linear(x, w_dense)
    assert y.shape == (3, 7, 150)
    assert torch.equal(torch.isnan(y), torch.isnan(dense))  # NaN/inf spread as in dense
    fin = ~torch.isnan(dense)
    assert torch.allclose(y[fin], dense[fin], atol=1e-4)
    assert cpu.decompress_linear(torch.empty(0, 40), w, None).shape == (0, 150)


def test_batched_path_in_several_threads_at_once(small_chunks):
    gen = torch.Generator().manual_seed(5)
    cases = []
    for fmt in ("bitmask", "2:4", "bsr4x16"):
        w = FORMATS[fmt](weight(300, 96, torch.bfloat16, 0.5, gen, specials=False))
        x = torch.randn(9, 96, generator=gen).to(torch.bfloat16)
        cases.append((x, w, sf.ops.linear(x, w, backend="batched")))

    def worker():
        for _ in range(20):
            for x, w, expect in cases:
                assert torch.equal(sf.ops.linear(x, w, backend="batched"), expect)

    run_in_threads(worker)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_zero_inactive_matches_the_reference_mask(isa, dtype):
    gen = torch.Generator().manual_seed(8)
    x = torch.randn(37, 1001, generator=gen).to(dtype)
    x[0, :5] = torch.tensor([float("nan"), float("inf"), -float("inf"), -0.0, 0.3])
    x[1, :400] = torch.linspace(-0.31, 0.31, 400).to(dtype)  # values around a threshold the dtype rounds
    for thr in (0.0, 0.3, 0.5, 1e-30, 1e6, float("inf")):
        expect = torch.where(~(x.abs() <= thr), x, torch.zeros((), dtype=dtype))  # the reference's rule
        got = cpu.zero_inactive(x[:, :1000], thr)  # a row stride longer than the row
        assert_bits_equal(got, expect[:, :1000])


def act_case(M, N, K, dtype, gen, weight_format):
    """x with about half its inputs under the threshold 0.5, w_t [K, N] (dense or a Bitmask of it)."""
    x = torch.randn(M, K, generator=gen).to(dtype)
    w_t = weight(K, N, dtype, 0.5, gen, specials=False)
    return x, w_t, (sf.Bitmask.from_dense(w_t) if weight_format == "bitmask" else w_t)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("weight_format", ["dense", "bitmask"])
@pytest.mark.parametrize("M,N,K", [(2, 3, 17), (17, 200, 33), (129, 1000, 65), (5, 64, 1000)])
def test_act_sparse_batched_path_matches_reference(isa, small_chunks, weight_format, dtype, M, N, K):
    gen = torch.Generator().manual_seed(M * N + K)
    x, w_t, w_arg = act_case(M, N, K, dtype, gen, weight_format)
    bias = torch.randn(N, generator=gen).to(dtype)
    xs = torch.where(x.abs() <= 0.5, torch.zeros((), dtype=dtype), x)
    for b in (None, bias):
        y = sf.ops.act_sparse_linear(x, w_arg, 0.5, b, backend="batched")
        ref64 = xs.double() @ w_t.double() + (0 if b is None else b.double())
        assert_close_2x(y, ref64, F.linear(xs, w_t.t(), b))


def test_act_sparse_batched_path_nonfinite_inputs_are_active(small_chunks):
    gen = torch.Generator().manual_seed(7)
    for weight_format in ("dense", "bitmask"):
        x, w_t, w_arg = act_case(6, 130, 40, torch.float32, gen, weight_format)
        x[1, 3], x[4, 0] = float("nan"), -float("inf")
        y = sf.ops.act_sparse_linear(x, w_arg, 0.5, backend="batched")
        ref = sf.ops.act_sparse_linear_reference(x, w_t, 0.5, None)
        assert torch.equal(torch.isnan(y), torch.isnan(ref))
        fin = ~torch.isnan(ref)
        assert torch.allclose(y[fin], ref[fin], atol=1e-4)


@pytest.fixture
def backend_calls(monkeypatch):
    """Counts the calls of each CPU backend (by name) that dispatch selects."""
    calls = {}

    def counting(b):
        def count(fn):
            def counted(*args):
                calls[b.name] = calls.get(b.name, 0) + 1
                return fn(*args)
            return counted
        bind = None if b.bind is None else (lambda w: count(b.bind(w)))  # modules' bound kernels count too
        return table.Backend(b.op, b.format, b.device, b.name, count(b.fn), b.dtypes, b.applies, b.available, bind)

    rows = [counting(b) if b.device == "cpu" else b for b in table.BACKENDS]
    monkeypatch.setattr(table, "BACKENDS", rows)
    return calls


def test_sparse_linear_runs_the_batched_path_above_its_crossover(backend_calls):
    lin = torch.nn.Linear(64, 96)
    with torch.no_grad():
        lin.weight.mul_(torch.rand(96, 64) < 0.5)
    sl = sf.SparseLinear.from_linear(lin, "bitmask", dense_above=4)
    for rows, expect in [(1, "cpp"), (4, "cpp"), (5, "batched"), (64, "batched")]:
        backend_calls.clear()
        x = torch.randn(rows, 64)
        ref64 = F.linear(x.double(), lin.weight.double(), lin.bias.double())
        assert_close_2x(sl(x), ref64, lin(x))
        assert backend_calls == {expect: 1}, (rows, backend_calls)


def test_compile_fullgraph_above_and_below_the_crossover(backend_calls):
    m = torch.nn.Sequential(torch.nn.Linear(48, 80), torch.nn.ReLU(), torch.nn.Linear(80, 32))
    with torch.no_grad():
        for layer in (m[0], m[2]):
            layer.weight.mul_(torch.rand(layer.weight.shape) < 0.5)
    for i in (0, 2):
        m[i] = sf.SparseLinear.from_linear(m[i], "bitmask" if i == 0 else "csr", dense_above=8)
    compiled = torch.compile(m, fullgraph=True)
    with torch.no_grad():
        for rows in (3, 40):
            x = torch.randn(rows, 48)
            backend_calls.clear()
            assert torch.allclose(compiled(x), m(x), atol=1e-5)
            assert set(backend_calls) == {"cpp" if rows <= 8 else "batched"}


@pytest.mark.parametrize("weight_format", ["dense", "bitmask"])
def test_act_sparse_linear_runs_the_batched_path_above_its_crossover(backend_calls, weight_format):
    lin = torch.nn.Linear(64, 96)
    with torch.no_grad():
        lin.weight.mul_(torch.rand(96, 64) < 0.5)
    a = sf.ActSparseLinear.from_linear(lin, threshold=0.3, weight_format=weight_format)
    assert a.dense_above == 16
    compiled = torch.compile(a, fullgraph=True)
    with torch.no_grad():
        for rows, expect in [(1, "cpp"), (16, "cpp"), (17, "batched"), (100, "batched")]:
            x = torch.randn(rows, 64)
            backend_calls.clear()
            y = a(x)
            assert backend_calls == {expect: 1}, (rows, backend_calls)
            xs = torch.where(x.abs() <= 0.3, 0.0, x)
            ref64 = F.linear(xs.double(), lin.weight.double(), lin.bias.double())
            assert_close_2x(y, ref64, F.linear(xs, lin.weight, lin.bias))
            assert torch.allclose(compiled(x), y, atol=1e-5)
