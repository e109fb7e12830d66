"""The Triton kernels (top-level kernels/) on the CPU in Triton's interpreter, through the functions
the backend table's CUDA rows call (sparseflow.ops.gpu.triton_*): float64 reference with the
2x-of-torch-dense idiom, poisoned outputs, odd shapes (K = 33, N = 17), bias, M in {1, 3} (decode
paths: GEMV and 16-row tiles) and M = 33 (prefill paths), fp32 / fp16 / bf16, NaN and inf in x.

Run with the interpreter chosen for the whole process, before Triton is imported:

    TRITON_INTERPRET=1 pytest tests/test_triton_kernels.py

Without TRITON_INTERPRET=1 this file skips instead of switching Triton's mode under the other test
files (on a GPU machine, tests/test_cuda.py runs the same kernels compiled)."""

import zlib

import pytest
import torch
import torch.nn.functional as F

import sparseflow as sf
from sparseflow.kernels import interpreter_active, triton_available

if not triton_available():
    pytest.skip("Triton is not installed (pip install 'sparseflow[triton]')", allow_module_level=True)
if not interpreter_active():
    pytest.skip(
        "Triton interpreter tests need TRITON_INTERPRET=1 set before Triton is imported: "
        "TRITON_INTERPRET=1 pytest tests/test_triton_kernels.py",
        allow_module_level=True,
    )

from conftest import assert_close_2x  # noqa: E402

from sparseflow.kernels import act_sparse, bitmask, bsr, nm  # noqa: E402
from sparseflow.ops import gpu  # noqa: E402
from sparseflow.ops.reference import act_sparse_mask  # noqa: E402

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
N, K = 17, 33


@pytest.fixture(autouse=True)
def poison_gpu_outputs(monkeypatch):
    """Outputs start as NaN, so an element a kernel forgets to write fails the test."""
    monkeypatch.setattr(gpu, "POISON_OUTPUTS", True)


def gen_for(*key) -> torch.Generator:
    # crc32, not hash(): str hashes change per process (PYTHONHASHSEED), which made inputs differ run to run
    return torch.Generator().manual_seed(zlib.crc32(repr(tuple(str(k) for k in key)).encode()))


def randn(*shape, dtype, gen):
    return torch.randn(*shape, generator=gen).to(dtype)


def check_linear(y, x, w_dense, bias):
    ref64 = F.linear(x.double(), w_dense.double(), None if bias is None else bias.double())
    assert_close_2x(y, ref64, F.linear(x, w_dense, bias))


def check_nonfinite(y, ref64):
    """NaN exactly where float64 dense has NaN, the same infinities, the finite rest close."""
    assert torch.equal(torch.isnan(y), torch.isnan(ref64)), "NaN pattern differs from dense F.linear"
    inf = torch.isinf(ref64)
    assert torch.equal(torch.isinf(y), inf) and torch.equal(y[inf].double(), ref64[inf])
    fin = torch.isfinite(ref64)
    torch.testing.assert_close(y[fin].double(), ref64[fin], rtol=1e-4, atol=1e-4)


def with_nonfinite(x: torch.Tensor, cols) -> torch.Tensor:
    """Row 0 gets a NaN, row 1 a +inf and a -inf, at the given columns."""
    x = x.clone()
    x[0, cols[0]] = float("nan")
    x[1, cols[1]] = float("inf")
    x[1, cols[2]] = -float("inf")
    return x


# ---- N:M -------------------------------------------------------------------------------------
NM_PATTERNS = [(2, 4), (1, 4), (4, 8), (3, 8), (8, 16)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n,m", NM_PATTERNS, ids=lambda v: str(v))
@pytest.mark.parametrize("M", [1, 3, 33])
def test_nm(dtype, n, m, M):
    gen = gen_for("nm", dtype, n, m, M)
    w = sf.NM.from_dense(randn(N, K, dtype=dtype, gen=gen), n, m, prune=True)
    x = randn(M, K, dtype=dtype, gen=gen)
    bias = None if M == 3 else randn(N, dtype=dtype, gen=gen)
    check_linear(gpu.triton_nm_linear(x, w, bias), x, w.to_dense(), bias)


# ---- bitmask ---------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("M", [1, 3, 16])
@pytest.mark.parametrize("density", [0.5, 0.1])
def test_bitmask(dtype, M, density):
    gen = gen_for("bitmask", dtype, M, density)
    w_dense = randn(N, K, dtype=dtype, gen=gen) * (torch.rand(N, K, generator=gen) < density)
    w = sf.Bitmask.from_dense(w_dense)
    x = randn(M, K, dtype=dtype, gen=gen)
    bias = None if M == 3 else randn(N, dtype=dtype, gen=gen)
    check_linear(gpu.triton_bitmask_linear(x, w, bias), x, w.to_dense(), bias)


def test_bitmask_is_decode_only():
    w = sf.Bitmask.from_dense(torch.randn(4, 8))
    with pytest.raises(ValueError, match="M must be <= 16"):
        bitmask.bitmask_linear(torch.randn(17, 8), w)


# ---- BSR -------------------------------------------------------------------------------------
BLOCKS = [(16, 16), (32, 16), (4, 8), (1, 16), (16, 2)]


def block_sparse(n, k, block, dtype, gen, density=0.5):
    bm, bk = block
    keep = torch.rand(-(-n // bm), -(-k // bk), generator=gen) < density
    keep[0, 0] = True  # at least one stored block
    keep = keep.repeat_interleave(bm, 0).repeat_interleave(bk, 1)[:n, :k]
    return randn(n, k, dtype=dtype, gen=gen) * keep


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("block", BLOCKS, ids=lambda b: f"{b[0]}x{b[1]}")
@pytest.mark.parametrize("M", [1, 3, 33])
def test_bsr(dtype, block, M):
    gen = gen_for("bsr", dtype, block, M)
    w = sf.BSR.from_dense(block_sparse(N, K, block, dtype, gen), block)
    x = randn(M, K, dtype=dtype, gen=gen)
    bias = None if M == 3 else randn(N, dtype=dtype, gen=gen)
    check_linear(gpu.triton_bsr_linear(x, w, bias), x, w.to_dense(), bias)


def test_bsr_empty_block_rows():
    """A block row with no stored block writes bias only (and is still written: outputs are poisoned)."""
    w_dense = torch.zeros(N, K)
    w_dense[:16, :16] = torch.randn(16, 16)
    w = sf.BSR.from_dense(w_dense, (16, 16))
    x, bias = torch.randn(3, K), torch.randn(N)
    check_linear(gpu.triton_bsr_linear(x, w, bias), x, w.to_dense(), bias)


# ---- activation-sparse -----------------------------------------------------------------------
def act_inputs(M, dtype, gen, threshold=0.6):
    """x with about half its entries at or below the threshold, some exactly at it (inactive)."""
    x = randn(M, K, dtype=dtype, gen=gen)
    x[:, ::5] = torch.tensor(threshold, dtype=dtype)  # |x| == threshold (rounded to dtype): inactive
    x[:, 1::7] = -torch.tensor(threshold, dtype=dtype)
    return x


def check_act_sparse(y, x, w_t, threshold, bias):
    xs = torch.where(act_sparse_mask(x, threshold), x, torch.zeros((), dtype=x.dtype))
    ref64 = xs.double() @ w_t.double() + (0 if bias is None else bias.double())
    dense = F.linear(xs, w_t.t(), bias)
    assert_close_2x(y, ref64, dense)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("M,split_k", [(1, None), (1, 1), (1, 3), (3, None), (3, 1), (3, 3), (33, None)])
def test_act_sparse(dtype, M, split_k):
    """split_k None: the launcher's choice (split in the interpreter too); 1: direct store; 3: the
    fp32 workspace and last-program epilogue. Prefill (M = 33) does not split."""
    gen = gen_for("act", dtype, M, split_k)
    x = act_inputs(M, dtype, gen)
    w_t = randn(K, N, dtype=dtype, gen=gen)
    bias = None if M == 3 else randn(N, dtype=dtype, gen=gen)
    y = act_sparse.act_sparse_dense(
        x, w_t, 0.6, bias, out=torch.full((M, N), float("nan"), dtype=dtype), split_k=split_k
    )
    check_act_sparse(y, x, w_t, 0.6, bias)
    # with the mask computed in x's dtype: about half the inputs are skipped
    assert 0.15 < act_sparse_mask(x, 0.6).float().mean() < 0.85


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_act_sparse_table_function(dtype):
    gen = gen_for("act-table", dtype)
    x, w_t, bias = (
        act_inputs(3, dtype, gen),
        randn(K, N, dtype=dtype, gen=gen),
        randn(N, dtype=dtype, gen=gen),
    )
    check_act_sparse(gpu.triton_act_sparse_dense(x, w_t, 0.6, bias), x, w_t, 0.6, bias)


def test_act_sparse_zero_threshold_and_all_inactive():
    gen = gen_for("act-edge")
    x, w_t = randn(3, K, dtype=torch.float32, gen=gen), randn(K, N, dtype=torch.float32, gen=gen)
    check_act_sparse(gpu.triton_act_sparse_dense(x, w_t, 0.0, None), x, w_t, 0.0, None)
    bias = randn(N, dtype=torch.float32, gen=gen)
    y = gpu.triton_act_sparse_dense(x, w_t, 100.0, bias)
    torch.testing.assert_close(y, bias.expand(3, N))


# ---- NaN / inf in x propagate as in dense F.linear --------------------------------------------
@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_nonfinite_nm():
    w = sf.NM.from_dense(torch.randn(N, K), 2, 4, prune=True)
    # column 1 is pruned in some rows and kept in others
    for M in (3, 33):
        x = with_nonfinite(torch.randn(M, K), (1, 6, 30))
        check_nonfinite(gpu.triton_nm_linear(x, w, None), F.linear(x.double(), w.to_dense().double()))


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_nonfinite_bitmask():
    w_dense = torch.randn(N, K) * (torch.rand(N, K) < 0.5)
    w = sf.Bitmask.from_dense(w_dense)
    for M in (1, 3):
        x = with_nonfinite(torch.randn(max(M, 2), K), (1, 6, 30))[:M]
        check_nonfinite(gpu.triton_bitmask_linear(x, w, None), F.linear(x.double(), w_dense.double()))


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.parametrize("M", [1, 3, 33])
def test_nonfinite_bsr(M):
    """NaN/inf in a pruned block makes dense give NaN over that block row; in a stored block, the
    products as dense computes them."""
    w_dense = torch.randn(N, K)
    w_dense[:16, 16:32] = 0  # block (0, 1) pruned, (1, 1) stored
    w = sf.BSR.from_dense(w_dense, (16, 16))
    x = with_nonfinite(torch.randn(max(M, 2), K), (20, 17, 3))[:M]
    bias = torch.randn(N)
    check_nonfinite(gpu.triton_bsr_linear(x, w, bias), F.linear(x.double(), w_dense.double(), bias.double()))


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_nonfinite_act_sparse():
    w_t = torch.randn(K, N)
    for M in (1, 3, 33):
        x = with_nonfinite(torch.randn(max(M, 2), K), (1, 6, 30))[:M]
        ref64 = torch.where(act_sparse_mask(x, 0.5), x, 0).double() @ w_t.double()
        check_nonfinite(gpu.triton_act_sparse_dense(x, w_t, 0.5, None), ref64)


# ---- strides, empty batches, checks ----------------------------------------------------------
def test_non_contiguous_x():
    gen = gen_for("strided")
    big = torch.randn(6, 2 * K, generator=gen)
    x = big[::2, ::2]  # row stride 4K, column stride 2
    assert not x.is_contiguous()
    w_nm = sf.NM.from_dense(torch.randn(N, K, generator=gen), 2, 4, prune=True)
    check_linear(gpu.triton_nm_linear(x, w_nm, None), x, w_nm.to_dense(), None)
    w_bm = sf.Bitmask.from_dense(torch.randn(N, K, generator=gen) * (torch.rand(N, K, generator=gen) < 0.5))
    check_linear(gpu.triton_bitmask_linear(x, w_bm, None), x, w_bm.to_dense(), None)
    w_bsr = sf.BSR.from_dense(block_sparse(N, K, (16, 16), torch.float32, gen), (16, 16))
    check_linear(gpu.triton_bsr_linear(x, w_bsr, None), x, w_bsr.to_dense(), None)
    w_t = torch.randn(2 * K, N, generator=gen)[::2]  # row stride 2N
    check_act_sparse(gpu.triton_act_sparse_dense(x, w_t, 0.5, None), x, w_t, 0.5, None)


def test_empty_batch():
    w = sf.NM.from_dense(torch.randn(N, K), 2, 4, prune=True)
    assert nm.nm_linear(torch.randn(0, K), w).shape == (0, N)
    assert act_sparse.act_sparse_dense(torch.randn(0, K), torch.randn(K, N), 0.1).shape == (0, N)


def test_wrappers_check_arguments():
    w = sf.BSR.from_dense(torch.randn(N, K), (16, 16))
    with pytest.raises(ValueError, match="x must be"):
        bsr.bsr_linear(torch.randn(2, K + 1), w)
    with pytest.raises(TypeError, match="weight is"):
        bsr.bsr_linear(torch.randn(2, K, dtype=torch.float16), w)
    with pytest.raises(ValueError, match="out must be"):
        bsr.bsr_linear(torch.randn(2, K), w, out=torch.empty(2, N + 1))


def test_act_sparse_leaves_workspace_zeroed():
    """Split-K sums and tickets live in one cached buffer per stream; the last program of each tile
    zeroes what it used, so the next call (any shape) starts from zeros without a memset."""
    from sparseflow.kernels import _common

    gen = gen_for("workspace")
    w_t = randn(K, N, dtype=torch.float32, gen=gen)
    first = None
    for m, split_k in [(1, 3), (3, 2), (1, None), (2, 3), (1, 3)]:
        x = randn(m, K, dtype=torch.float32, gen=gen) if m != 1 or first is None else first[0]
        y = gpu.triton_act_sparse_dense(x, w_t, 0.5, None) if split_k is None else \
            act_sparse.act_sparse_dense(x, w_t, 0.5, None, split_k=split_k)
        check_act_sparse(y, x, w_t, 0.5, None)
        assert not _common.zeroed_workspace(torch.device("cpu"), 4).any(), "workspace not left at zero"
        if m == 1 and split_k == 3:
            if first is None:
                first = (x, y)
            else:
                assert torch.equal(y, first[1])  # same input, reused buffer: same result


def test_nm_decode_leaves_workspace_zeroed():
    """The N:M decode kernel splits K the same way (K = 33 gives two slices here): each call, any
    pattern, equals the reference and leaves the workspace at zero."""
    from sparseflow.kernels import _common

    gen = gen_for("nm-workspace")
    for (n, m), rows in [((2, 4), 1), ((4, 8), 3), ((2, 4), 16), ((2, 4), 1)]:
        w = sf.NM.from_dense(randn(N, K, dtype=torch.float32, gen=gen), n, m, prune=True)
        x = randn(rows, K, dtype=torch.float32, gen=gen)
        check_linear(nm.nm_linear(x, w), x, w.to_dense(), None)
        assert not _common.zeroed_workspace(torch.device("cpu"), 4).any(), "workspace not left at zero"


def test_act_sparse_refuses_a_split_k_below_one_and_stays_clean():
    """split_k=0 returned unwritten output and left tickets in the shared workspace, which broke the
    next (correct) calls of every split-K kernel."""
    from sparseflow.kernels import _common

    gen = gen_for("split0")
    x, w_t = randn(1, K, dtype=torch.float32, gen=gen), randn(K, N, dtype=torch.float32, gen=gen)
    for bad in (0, -2, 1.5, True):
        with pytest.raises(ValueError, match="split_k must be an int >= 1"):
            act_sparse.act_sparse_dense(x, w_t, 0.5, split_k=bad)
    assert not _common.zeroed_workspace(torch.device("cpu"), 4).any()
    check_act_sparse(act_sparse.act_sparse_dense(x, w_t, 0.5), x, w_t, 0.5, None)


@pytest.mark.parametrize("M", [1, 2])
def test_act_sparse_negative_threshold_reads_no_row_past_k(M):
    """With a negative threshold every lane is active, the ones past K too: the GEMV read w_t's
    rows past K (NaN here, in the same storage)."""
    gen = gen_for("negthr", M)
    big = torch.full((K + 16, N), float("nan"))
    big[:K] = randn(K, N, dtype=torch.float32, gen=gen)
    w_t = big[:K]
    x = randn(M, K, dtype=torch.float32, gen=gen)
    y = act_sparse.act_sparse_dense(x, w_t, -1.0)
    check_linear(y, x, w_t.t().contiguous(), None)


def test_act_sparse_empty_k_or_n_and_long_inputs_in_several_launches(monkeypatch):
    from sparseflow.kernels import _common

    bias = torch.randn(8)
    torch.testing.assert_close(gpu.triton_act_sparse_dense(torch.randn(2, 0), torch.zeros(0, 8), 0.1, bias),
                               bias.expand(2, 8))
    assert gpu.triton_act_sparse_dense(torch.randn(2, 8), torch.zeros(8, 0), 0.1, None).shape == (2, 0)
    monkeypatch.setattr(_common, "LAUNCH_ROWS", 20)  # grid axes past 0 hold 65535 blocks of rows
    gen = gen_for("launches")
    x = act_inputs(45, torch.float32, gen)
    w_t = randn(K, N, dtype=torch.float32, gen=gen)
    check_act_sparse(act_sparse.act_sparse_dense(x, w_t, 0.6, bias[:1].expand(N).contiguous()), x, w_t, 0.6,
                     bias[:1].expand(N).contiguous())
    w = sf.BSR.from_dense(randn(32, K, dtype=torch.float32, gen=gen), (16, 16))
    check_linear(bsr.bsr_linear(x, w), x, w.to_dense(), None)
