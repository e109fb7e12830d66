"""GPU backends: the table's CUDA rows (Triton kernels, CUDA C++ kernels in _C, torch's 2:4) on a
GPU (marker `cuda`, deselected by default: `pytest -m cuda`), plus compile checks that need no GPU:

- test_nvcc_compiles: every csrc/cuda/*.cu with nvcc for sm_80 and sm_90a, and the pybind glue
  (csrc/cuda/binding_cuda.cpp, with and without SPARSEFLOW_WITH_CUDA). Skips without nvcc.
- test_triton_kernels_compile (marker `slow`): every Triton kernel variant the wrappers launch,
  compiled ahead of time for sm_80 and sm_90 with Triton's bundled ptxas. Skips without Triton or
  in a TRITON_INTERPRET=1 process.

GPU tests follow tests/test_kernels.py: float64 reference, the 2x-of-torch-dense idiom, poisoned
outputs, odd shapes, bias, NaN/inf propagation as in dense F.linear."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_close_2x

import sparseflow as sf
from sparseflow.formats import FORMATS
from sparseflow.ops import gpu, table
from sparseflow.ops.reference import act_sparse_mask

ROOT = Path(__file__).resolve().parents[1]
CUDA_DIR = ROOT / "csrc" / "cuda"
HAS_GPU = torch.cuda.is_available()
gpu_test = [pytest.mark.cuda, pytest.mark.skipif(not HAS_GPU, reason="needs a CUDA GPU")]


# ---- compile checks (no GPU needed) ----------------------------------------------------------
def find_nvcc() -> str | None:
    for candidate in (
        shutil.which("nvcc"),
        os.environ.get("CUDA_HOME", "") + "/bin/nvcc",
        "/usr/local/cuda/bin/nvcc",
    ):
        if candidate and os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return candidate
    return None


def pybind_includes() -> list[str]:
    out = subprocess.run(
        [sys.executable, "-m", "pybind11", "--includes"], capture_output=True, text=True, check=True
    )
    return out.stdout.split()


@pytest.fixture(scope="module")
def nvcc() -> str:
    path = find_nvcc()
    if path is None:
        pytest.skip("nvcc not found (PATH, $CUDA_HOME/bin, /usr/local/cuda/bin): CUDA compile check skipped")
    return path


def nvcc_command(nvcc: str, source: Path, obj: Path, *flags: str) -> list[str]:
    """The one nvcc command line every compile check uses: C++17, compile only, FLAGS in between."""
    return [nvcc, "-std=c++17", *flags, "-c", str(source), "-o", str(obj)]


def test_nvcc_compiles(nvcc, tmp_path):
    """nvcc -c of each .cu for sm_80 and sm_90a, and the binding glue through nvcc's host compiler
    (as CMake builds it with -DSPARSEFLOW_CUDA=ON), all in parallel."""
    sources = sorted(CUDA_DIR.glob("*.cu"))
    assert sources, "no .cu files in csrc/cuda"
    csrc = f"-I{ROOT / 'csrc'}"
    includes = [csrc, *pybind_includes()]
    jobs = {}
    for cu in sources:
        for arch in ("80", "90a"):  # one -gencode each: no extra PTX pass
            gencode = f"arch=compute_{arch},code=sm_{arch}"
            jobs[f"{cu.name} sm_{arch}"] = nvcc_command(nvcc, cu, tmp_path / f"{cu.stem}{arch}.o", "-O2",
                                                        "-gencode", gencode, csrc)
    jobs["binding_cuda.cpp"] = nvcc_command(nvcc, CUDA_DIR / "binding_cuda.cpp", tmp_path / "binding_cuda.o",
                                            "-DSPARSEFLOW_WITH_CUDA=1", *includes)
    # The CPU build: register.h alone must give a no-op register_cuda.
    probe = tmp_path / "cpu_probe.cpp"
    probe.write_text('#include "cuda/register.h"\nPYBIND11_MODULE(probe, m) { register_cuda(m); }\n')
    jobs["register.h (CPU build)"] = nvcc_command(nvcc, probe, tmp_path / "probe.o", *includes)
    running = [(name, subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
               for name, cmd in jobs.items()]
    failures = []
    for name, proc in running:
        output, _ = proc.communicate()
        if proc.returncode != 0:
            failures.append(f"{name}:\n{output}")
    assert not failures, "nvcc failed:\n" + "\n".join(failures)


def triton_variants():
    """(name, jit function, signature, constexprs, config) of the kernel variants the wrappers can
    launch: each dtype, autotune config, decode/prefill mode and N:M / block shape family."""
    import triton

    from sparseflow.kernels import act_sparse, bitmask, bsr, nm

    for dt in ("fp32", "fp16", "bf16"):
        p = f"*{dt}"
        prec = "ieee" if dt == "fp32" else "tf32"
        common = dict(HAS_BIAS=True, UPCAST_DOT=False, DOT_PRECISION=prec)
        sig = dict(
            x_ptr=p,
            w_ptr=p,
            bias_ptr=p,
            y_ptr=p,
            ws_ptr="*fp32",
            cnt_ptr="*i32",
            M="i32",
            N="i32",
            K="i32",
            stride_xm="i32",
            stride_xk="i32",
            stride_wk="i32",
            stride_wn="i32",
            stride_ym="i32",
            threshold="fp32",
            split_k="i32",
            m_bucket="i32",
        )
        for block_m in (1, 16):
            for c in act_sparse._decode_configs():
                yield (
                    "act_sparse",
                    act_sparse.act_sparse_dense_kernel,
                    sig,
                    dict(common, BLOCK_M=block_m, USE_DOT=block_m > 1, **c.kwargs),
                    c,
                )
        for c in act_sparse._prefill_configs():
            yield (
                "act_sparse",
                act_sparse.act_sparse_dense_kernel,
                sig,
                dict(common, USE_DOT=True, **c.kwargs),
                c,
            )

        sig = dict(
            x_ptr=p,
            v_ptr=p,
            idx_ptr="*u8",
            bias_ptr=p,
            y_ptr=p,
            ws_ptr="*fp32",
            cnt_ptr="*i32",
            M="i32",
            N="i32",
            K="i32",
            G="i32",
            stride_xm="i32",
            stride_xk="i32",
            stride_vn="i32",
            stride_in="i32",
            stride_ym="i32",
            split_k="i32",
            m_bucket="i32",
        )
        for n, m in ((2, 4), (4, 8), (8, 16)):
            for even_k in (True, False):
                pattern = dict(common, NN=n, MM=m, BITS=2 if m == 4 else 4, EVEN_K=even_k)
                for block_m in (1, 16):
                    for c in nm._decode_configs():
                        yield (
                            "nm",
                            nm.nm_matmul_kernel,
                            sig,
                            dict(pattern, BLOCK_M=block_m, GROUP_M=1, USE_DOT=block_m > 1, **c.kwargs),
                            c,
                        )
                for c in nm._prefill_configs():
                    yield "nm", nm.nm_matmul_kernel, sig, dict(pattern, GROUP_M=8, USE_DOT=True, **c.kwargs), c

        sig = dict(
            x_ptr=p,
            v_ptr=p,
            mask_ptr="*u8",
            off_ptr="*i64",
            bias_ptr=p,
            y_ptr=p,
            M="i32",
            N="i32",
            K="i32",
            stride_xm="i32",
            stride_xk="i32",
            stride_mask="i32",
            stride_ym="i32",
            m_bucket="i32",
        )
        for block_m in (1, 16):
            for c in bitmask._configs(use_dot=block_m > 1):
                yield (
                    "bitmask",
                    bitmask.bitmask_gemv_kernel,
                    sig,
                    dict(common, BLOCK_M=block_m, USE_DOT=block_m > 1, **c.kwargs),
                    c,
                )

        sig = dict(
            x_ptr=p,
            v_ptr=p,
            col_ptr="*i32",
            rowptr_ptr="*i64",
            flags_ptr="*i8",
            total_ptr="*i32",
            bias_ptr=p,
            y_ptr=p,
            M="i32",
            N="i32",
            K="i32",
            C="i32",
            stride_xm="i32",
            stride_xk="i32",
            stride_ym="i32",
            m_bucket="i32",
        )
        for bm, bk in ((64, 64), (16, 16), (128, 128), (4, 8), (128, 1), (1, 128), (8, 128)):
            big = bm >= 16 and bk >= 16
            modes = [(1, False, "decode"), (16, big, "decode")] + ([(None, True, "prefill")] if big else [])
            for block_m, dot, kind in modes:
                for c in bsr._configs(kind):
                    const = dict(
                        common,
                        BM_W=bm,
                        BK_W=bk,
                        SUB_N=min(bm, c.kwargs["SUB_N_MAX"]),
                        USE_DOT=dot,
                        **c.kwargs,
                    )
                    if block_m is not None:
                        const["BLOCK_M"] = block_m
                    yield "bsr", bsr.bsr_matmul_kernel, sig, const, c
        sig = dict(x_ptr=p, flags_ptr="*i8", total_ptr="*i32", K="i32", C="i32", stride_xm="i32", stride_xk="i32")
        for chunk in (1, 16, 128):
            yield (
                "nonfinite_chunks",
                bsr.nonfinite_chunks_kernel,
                sig,
                dict(CHUNK=chunk, BLOCK_C=max(1, 2048 // chunk)),
                triton.Config({}, num_warps=4),
            )


@pytest.mark.slow
@pytest.mark.parametrize("arch", [80, 90])
def test_triton_kernels_compile(arch):
    """Triton -> cubin for sm_80 / sm_90 without a GPU (bundled ptxas): catches shape, layout and
    type errors the interpreter does not."""
    pytest.importorskip("triton")
    from sparseflow.kernels import interpreter_active

    if interpreter_active():
        pytest.skip("Triton is in interpreter mode in this process (TRITON_INTERPRET=1)")
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    # By default the first autotune config of each (kernel, dtype, mode, shape family): about 100
    # variants, ~2-4 min per arch on 2 cores. SPARSEFLOW_TRITON_COMPILE_ALL=1 compiles every config
    # (~290 per arch; all passed for sm_80 and sm_90 with Triton 3.6 when this test was written).
    every_config = os.environ.get("SPARSEFLOW_TRITON_COMPILE_ALL") == "1"
    seen, failures = set(), []
    for name, fn, sig, const, cfg in triton_variants():
        tuned = set(cfg.kwargs) if not every_config else set()
        key = (
            name,
            tuple(sorted(sig.items())),
            tuple(sorted((k, str(v)) for k, v in const.items() if k not in tuned and k != "SUB_N")),
        )
        if every_config:
            key += (cfg.num_warps, cfg.num_stages)
        if key in seen:
            continue
        seen.add(key)
        signature = {**sig, **{k: "constexpr" for k in const}}
        try:
            triton.compile(
                ASTSource(fn, signature, const),
                target=GPUTarget("cuda", arch, 32),
                options={"num_warps": cfg.num_warps, "num_stages": cfg.num_stages},
            )
        except Exception as e:  # noqa: BLE001 - report every failing variant at once
            failures.append(f"{name} {const} warps={cfg.num_warps}: {type(e).__name__}: {str(e)[:400]}")
    assert not failures, f"{len(failures)} of {len(seen)} variants failed:\n" + "\n".join(failures)


# ---- GPU tests -------------------------------------------------------------------------------
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
GPU_ROWS = [b for b in table.BACKENDS if b.device == "cuda" and b.name != "reference"]


def test_gpu_rows_of_the_table():
    """Every GPU kernel is a row before the CUDA reference rows; rows only claim availability with a
    GPU (and Triton / the CUDA build). Runs without a GPU."""
    keys = {r.key for r in GPU_ROWS}
    assert keys == {
        "linear/nm/cuda/torch", "linear/nm/cuda/cuda", "linear/nm/cuda/triton", "linear/bsr/cuda/triton",
        "linear/bitmask/cuda/triton", "act_sparse_linear/dense/cuda/cuda",
        "act_sparse_linear/dense/cuda/triton",
        *(f"linear/{f}/cuda/batched" for f in ("bitmask", "csr", "bsr", "nm")),
        *(f"act_sparse_linear/{f}/cuda/batched" for f in ("dense", "bitmask"))}
    order = [r.key for r in table.BACKENDS]
    first_reference = min(i for i, r in enumerate(table.BACKENDS)
                          if r.device == "cuda" and r.name == "reference")
    assert all(order.index(k) < first_reference for k in keys)
    if not HAS_GPU:
        assert not any(r.available() for r in GPU_ROWS)
    w24 = sf.NM.from_dense(torch.randn(128, 256), 2, 4, prune=True)
    rows = {r.key: r for r in GPU_ROWS}
    assert rows["linear/nm/cuda/cuda"].applies(w24, 16) and not rows["linear/nm/cuda/cuda"].applies(w24, 17)
    assert rows["linear/nm/cuda/torch"].applies(w24, 64) and not rows["linear/nm/cuda/torch"].applies(w24, 1)
    assert not rows["linear/nm/cuda/cuda"].applies(sf.NM.from_dense(torch.randn(8, 16), 4, 8, prune=True), 1)


@pytest.fixture(autouse=True)
def poison_gpu_outputs(monkeypatch):
    monkeypatch.setattr(gpu, "POISON_OUTPUTS", True)


def weight_for(fmt: str, n: int, k: int, dtype, gen, pattern=None):
    """(format object on the GPU, its dense weight) for a table row's format."""
    w = torch.randn(n, k, generator=gen).to(dtype)
    if fmt == "nm":
        nn, mm = pattern or (2, 4)
        sparse = sf.NM.from_dense(w, nn, mm, prune=True)
    elif fmt == "bsr":
        bm, bk = pattern or (16, 16)
        keep = torch.rand(-(-n // bm), -(-k // bk), generator=gen) < 0.4
        keep[0, 0] = True
        w = w * keep.repeat_interleave(bm, 0).repeat_interleave(bk, 1)[:n, :k]
        sparse = sf.BSR.from_dense(w, (bm, bk))
    elif fmt in ("bitmask", "csr"):
        sparse = FORMATS[fmt].from_dense(w * (torch.rand(n, k, generator=gen) < 0.5))
    else:
        raise ValueError(fmt)
    sparse = sparse.to("cuda")
    return sparse, sparse.to_dense()


# Each format's first pattern runs every dtype, shape and M; the others fp16 on the odd shape only
# (every distinct dtype / pattern / divisibility is a separate Triton compile; this keeps the GPU
# run to a few minutes). (1000, 4096) makes the CUDA kernels split K (workspace + last-block path).
PATTERNS = {
    "nm": [(2, 4), (4, 8), (1, 4), (8, 16)],
    "bsr": [(16, 16), (64, 64), (4, 8), (32, 1)],
    "bitmask": [None],
    "csr": [None],
}
SHAPES = [(17, 33), (256, 512), (1000, 4096)]


def linear_cases():
    for row in GPU_ROWS:
        if row.op != "linear":
            continue
        for i, pattern in enumerate(PATTERNS[row.format]):
            for n, k in SHAPES if i == 0 else SHAPES[:1]:
                for m in (1, 3, 16, 40) if i == 0 else (1, 40):
                    for dtype in DTYPES if i == 0 else [torch.float16]:
                        yield pytest.param(
                            row,
                            pattern,
                            n,
                            k,
                            m,
                            dtype,
                            marks=gpu_test,
                            id=f"{row.name}-{row.format}-{pattern}-{n}x{k}-m{m}-{str(dtype)[6:]}",
                        )


@pytest.mark.parametrize("row,pattern,n,k,m,dtype", list(linear_cases()))
def test_linear_row(row, pattern, n, k, m, dtype):
    if not row.available():
        pytest.skip(f"{row.key} is not available here")
    if dtype not in row.dtypes:
        pytest.skip(f"{row.key} does not take {dtype}")
    gen = torch.Generator().manual_seed(n * 31 + k + m)
    sparse, w_dense = weight_for(row.format, n, k, dtype, gen, pattern)
    if not row.applies(sparse, m):
        pytest.skip(f"{row.key} does not apply to {pattern} {n}x{k} at m={m}")
    x = torch.randn(m, k, generator=gen).to(dtype).cuda()
    bias = torch.randn(n, generator=gen).to(dtype).cuda()
    for b in (bias, None):
        y = row.fn(x, sparse, b)
        ref64 = F.linear(x.double(), w_dense.double(), None if b is None else b.double())
        assert_close_2x(y, ref64, F.linear(x, w_dense, b))


def act_sparse_cases():
    for row in GPU_ROWS:
        if row.op == "act_sparse_linear":
            for n, k in SHAPES:
                for m in (1, 2, 3, 16, 40):
                    yield pytest.param(row, n, k, m, marks=gpu_test, id=f"{row.name}-{n}x{k}-m{m}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("row,n,k,m", list(act_sparse_cases()))
def test_act_sparse_row(row, n, k, m, dtype):
    if not row.available() or dtype not in row.dtypes:
        pytest.skip(f"{row.key} is not available for {dtype}")
    gen = torch.Generator().manual_seed(n + k * 7 + m)
    w_t = torch.randn(k, n, generator=gen).to(dtype).cuda()
    if not row.applies(w_t, m):
        pytest.skip(f"{row.key} does not apply at m={m}")
    w_arg = w_t
    if row.format == "bitmask":
        w_t = w_t * (torch.rand(k, n, generator=gen) < 0.5).cuda()
        w_arg = sf.Bitmask.from_dense(w_t)
    x = torch.randn(m, k, generator=gen).to(dtype).cuda()
    x[:, ::7] = torch.tensor(0.5, dtype=dtype)  # exactly at the threshold: inactive
    bias = torch.randn(n, generator=gen).to(dtype).cuda()
    xs = torch.where(act_sparse_mask(x, 0.5), x, torch.zeros((), dtype=dtype, device="cuda"))
    for b in (bias, None):
        y = row.fn(x, w_arg, 0.5, b)
        ref64 = xs.double() @ w_t.double() + (0 if b is None else b.double())
        assert_close_2x(y, ref64, F.linear(xs, w_t.t(), b))


def check_nonfinite(y, ref64):
    assert torch.equal(torch.isnan(y), torch.isnan(ref64)), "NaN pattern differs from dense F.linear"
    inf = torch.isinf(ref64)
    assert torch.equal(torch.isinf(y), inf) and torch.equal(y[inf].double(), ref64[inf])
    fin = torch.isfinite(ref64)
    tol = 1e-4 if y.dtype == torch.float32 else 2e-2
    scale = ref64[fin].abs().max().item() if fin.any() else 1.0
    torch.testing.assert_close(y[fin].double(), ref64[fin], rtol=tol, atol=tol * scale)


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_GPU, reason="needs a CUDA GPU")
@pytest.mark.parametrize("row", [r for r in GPU_ROWS], ids=lambda r: r.key)
@pytest.mark.parametrize("m", [1, 3, 40])
def test_nonfinite_inputs_match_dense(row, m):
    if not row.available():
        pytest.skip(f"{row.key} is not available here")
    n, k = 128, 256
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(max(m, 2), k, generator=gen)
    x[0, 3], x[1, 70], x[1, 200] = float("nan"), float("inf"), -float("inf")
    x = x[:m].cuda()
    if row.op == "linear":
        sparse, w_dense = weight_for(
            row.format, n, k, torch.float16 if torch.float32 not in row.dtypes else torch.float32, gen
        )
        x = x.to(w_dense.dtype)
        if not row.applies(sparse, m):
            pytest.skip(f"{row.key} does not apply at m={m}")
        y = row.fn(x, sparse, None)
        ref64 = F.linear(x.double(), w_dense.double())
    else:
        w_t = torch.randn(k, n, generator=gen).cuda()
        if not row.applies(w_t, m):
            pytest.skip(f"{row.key} does not apply at m={m}")
        if row.format == "bitmask":
            w_t = w_t * (torch.rand(k, n, generator=gen) < 0.5).cuda()
        y = row.fn(x, w_t if row.format == "dense" else sf.Bitmask.from_dense(w_t), 0.5, None)
        ref64 = torch.where(act_sparse_mask(x, 0.5), x, 0).double() @ w_t.double()
    check_nonfinite(y, ref64)


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_GPU, reason="needs a CUDA GPU")
@pytest.mark.parametrize("split_k", [1, 2, 5])
@pytest.mark.parametrize("m", [1, 4])
def test_triton_act_sparse_split_k(split_k, m):
    pytest.importorskip("triton")
    from sparseflow.kernels import act_sparse

    w_t = torch.randn(1000, 300, device="cuda", dtype=torch.bfloat16)
    x = torch.randn(m, 1000, device="cuda", dtype=torch.bfloat16)
    y = act_sparse.act_sparse_dense(x, w_t, 0.3, split_k=split_k)
    xs = torch.where(act_sparse_mask(x, 0.3), x, torch.zeros((), dtype=x.dtype, device="cuda"))
    assert_close_2x(y, xs.double() @ w_t.double(), xs @ w_t)


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_GPU, reason="needs a CUDA GPU")
@pytest.mark.parametrize("row", [r for r in GPU_ROWS if r.name in ("cuda", "triton") and
                                 (r.op == "act_sparse_linear" or r.format == "nm")], ids=lambda r: r.key)
def test_split_k_workspace_left_zeroed(row):
    """The split-K kernels keep one workspace per stream and must leave it zeroed after each call
    (no memset per call): repeated calls of different shapes give the reference each time."""
    from sparseflow.kernels import _common

    if not row.available():
        pytest.skip(f"{row.key} is not available here")
    gen = torch.Generator().manual_seed(3)
    for m, n, k in [(1, 1000, 4096), (5, 300, 3000), (16, 64, 9000), (1, 1000, 4096)]:
        x = torch.randn(m, k, generator=gen).half().cuda()
        if row.op == "linear":
            sparse, w_dense = weight_for("nm", n, k, torch.float16, gen)
            y = row.fn(x, sparse, None)
            ref64, dense = F.linear(x.double(), w_dense.double()), F.linear(x, w_dense)
        else:
            w_t = torch.randn(k, n, generator=gen).half().cuda()
            y = row.fn(x, w_t, 0.5, None)
            xs = torch.where(act_sparse_mask(x, 0.5), x, torch.zeros((), dtype=x.dtype, device="cuda"))
            ref64, dense = xs.double() @ w_t.double(), xs @ w_t
        assert_close_2x(y, ref64, dense)
        assert not _common.zeroed_workspace(x.device, 4).any(), "workspace not left at zero"


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_GPU, reason="needs a CUDA GPU")
def test_dispatch_picks_gpu_rows():
    """sf.ops on CUDA tensors runs a GPU row (not the reference) wherever one is available."""
    gen = torch.Generator().manual_seed(0)
    for fmt in ("nm", "bsr", "bitmask"):
        sparse, w_dense = weight_for(fmt, 256, 512, torch.float16, gen)
        for m in (1, 8):
            x = torch.randn(m, 512, generator=gen).half().cuda()
            row = table.select("linear", fmt, x, sparse, m)
            has_gpu_row = any(
                r.available() and r.applies(sparse, m)
                for r in table.backends("linear", fmt, "cuda")
                if r.name != "reference"
            )
            assert (row.name != "reference") == has_gpu_row
            assert_close_2x(
                sf.ops.linear(x, sparse), F.linear(x.double(), w_dense.double()), F.linear(x, w_dense)
            )


# Bitmask, CSR and BSR decompression reads sizes on the host (row offsets, row lengths), so their
# batched rows cannot be captured; sparsify(cuda_graphs=True) screens such paths out.
CAPTURABLE_ROWS = [r for r in GPU_ROWS if not (r.name == "batched" and r.format in ("bitmask", "csr", "bsr"))]


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_GPU, reason="needs a CUDA GPU")
@pytest.mark.parametrize("row", CAPTURABLE_ROWS, ids=lambda r: r.key)
def test_cuda_graph_capture(row):
    """Decode kernels launch on the current stream without syncs or host reads, so they can be
    captured in a CUDA graph and replayed (what serving stacks and the benchmarks do)."""
    if not row.available():
        pytest.skip(f"{row.key} is not available here")
    gen = torch.Generator().manual_seed(1)
    m, n, k = 1, 256, 512
    if row.op == "linear":
        sparse, w_dense = weight_for(row.format, n, k, torch.float16, gen)
        m = 1 if row.applies(sparse, 1) else 64
        x = torch.randn(m, k, generator=gen).half().cuda()
        call = lambda: row.fn(x, sparse, None)
        expect = lambda: F.linear(x.double(), w_dense.double())
    else:
        w_t = torch.randn(k, n, generator=gen).half().cuda()
        m = 1 if row.applies(w_t, 1) else 64
        x = torch.randn(m, k, generator=gen).half().cuda()
        call = lambda: row.fn(x, w_t, 0.5, None)
        expect = lambda: (
            torch.where(act_sparse_mask(x, 0.5), x, torch.zeros((), dtype=x.dtype, device="cuda")).double()
            @ w_t.double()
        )
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        call()  # warm up: autotuning and compilation happen outside the capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = call()
    x.copy_(torch.randn(x.shape, generator=gen).to(x.dtype))
    graph.replay()
    torch.cuda.synchronize()
    ref = expect()
    assert torch.allclose(y.double(), ref, rtol=2e-2, atol=2e-2 * max(1.0, ref.abs().max().item()))


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_GPU, reason="needs a CUDA GPU")
def test_side_stream_and_compile():
    """Kernels follow torch's current stream; sf.ops stays traceable under torch.compile(fullgraph)."""
    gen = torch.Generator().manual_seed(2)
    sparse, w_dense = weight_for("nm", 256, 512, torch.float16, gen)
    x = torch.randn(4, 512, generator=gen).half().cuda()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        y = sf.ops.linear(x, sparse)
    torch.cuda.current_stream().wait_stream(side)
    ref64 = F.linear(x.double(), w_dense.double())
    assert_close_2x(y, ref64, F.linear(x, w_dense))
    compiled = torch.compile(lambda t: sf.ops.linear(t, sparse), fullgraph=True)
    assert_close_2x(compiled(x), ref64, F.linear(x, w_dense))


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_GPU, reason="needs a CUDA GPU")
def test_cuda_extension_checks_arguments():
    from sparseflow._ext import _C

    if not hasattr(_C, "cuda_nm24_gemv"):
        pytest.skip("_C was built without SPARSEFLOW_CUDA")
    x = torch.randn(17, 64, device="cuda", dtype=torch.float16)
    w = sf.NM.from_dense(torch.randn(32, 64), 2, 4, prune=True).to("cuda", torch.float16)
    with pytest.raises(ValueError, match="M must be in"):
        gpu.cuda_nm24_linear(x, w, None)
    with pytest.raises(ValueError, match="workspace too small"):
        _C.cuda_act_sparse_gemv(
            dtype=2,
            x=x.data_ptr(),
            M=1,
            K=64,
            ldx=64,
            w_t=x.data_ptr(),
            N=16,
            ldw=64,
            threshold=0.1,
            bias=0,
            y=x.data_ptr(),
            ldy=16,
            workspace=0,
            workspace_bytes=0,
            stream=torch.cuda.current_stream().cuda_stream,
        )


# ---- what users call, on the GPU (also run on the CPU, where the same checks hold) -------------
DEVICES = [pytest.param("cpu", id="cpu"), pytest.param("cuda", marks=gpu_test, id="cuda")]


def pruned_model(device, dtype):
    """Three layers, one per pattern (2:4, 50% unstructured, 16x16 blocks)."""
    from torch import nn

    gen = torch.Generator().manual_seed(11)
    model = nn.Sequential(nn.Linear(256, 512), nn.GELU(), nn.Linear(512, 384), nn.GELU(), nn.Linear(384, 200))
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) / p.shape[-1] ** 0.5)
        model[0].weight.copy_(sf.NM.from_dense(model[0].weight, 2, 4, prune=True).to_dense())
        model[2].weight.mul_(torch.rand(384, 512, generator=gen) < 0.5)
        keep = (torch.rand(13, 24, generator=gen) < 0.3).repeat_interleave(16, 0).repeat_interleave(16, 1)
        model[4].weight.mul_(keep[:200, :384])
    return model.to(device, dtype).eval()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_sparsify_compile_save_load(device, dtype, tmp_path, monkeypatch):
    """sparsify measures on the model's device (timings keyed by it), the sparse model matches the
    masked dense one eagerly and under torch.compile(fullgraph=True), and sf.save / sf.load bring
    it back (then .to(device)) with identical buffers and outputs."""
    import copy
    import json

    from sparseflow.dispatch import device_key

    if device == "cpu" and dtype == torch.float16:
        pytest.skip("the CPU kernels' fp16 is covered by tests/test_modules.py")
    monkeypatch.setenv("SPARSEFLOW_CACHE_DIR", str(tmp_path / "cache"))
    model = pruned_model(device, dtype)
    ref_model = copy.deepcopy(model).double()
    x = torch.randn(2, 3, 256, generator=torch.Generator().manual_seed(1)).to(device, dtype)
    with torch.no_grad():
        dense, ref64 = model(x), ref_model(x.double())
    report = sf.sparsify(model, format="auto", m_range=(1, 16))
    assert [layer.pattern for layer in report.layers][0] == "2:4"
    assert all(set(layer.speedup) == {1, 16} for layer in report.layers)
    kernels = {b.name for b in table.backends("linear", device=device)}  # a report names the device's row
    assert all(layer.backend.split("+")[0] in kernels for layer in report.layers if layer.choice != "dense")
    entries = json.loads((tmp_path / "cache" / "dispatch.json").read_text())["entries"]
    assert entries and all(f"|{device_key(x.device)}|" in key for key in entries)
    monkeypatch.setenv("SPARSEFLOW_CACHE_DIR", str(tmp_path / "graphs"))  # timed as CUDA graphs replay it
    graphed = pruned_model(device, dtype)
    report = sf.sparsify(graphed, format="auto", m_range=(1, 16, 128), cuda_graphs=True)
    assert all(s > 0 for layer in report.layers for s in layer.speedup.values())  # every kept path runs
    entries = json.loads((tmp_path / "graphs" / "dispatch.json").read_text())["entries"]
    assert entries and all(f"|{device_key(x.device, graphs=True)}|" in key for key in entries)
    assert (device == "cuda") == all("+graphs|" in key for key in entries)
    with torch.no_grad():
        assert_close_2x(graphed(x), ref64, dense)
    named = pruned_model(device, dtype)
    for index, fmt in (("0", "2:4"), ("2", "bitmask"), ("4", "bsr")):
        sf.sparsify(named, format=fmt, include=[index], measure=False)
        assert isinstance(named[int(index)], sf.SparseLinear) and named[int(index)].format_name != "dense"
    with torch.no_grad():
        for m in (model, named):
            for rows in (x[:1, :1], x):  # decode and a batch
                assert_close_2x(m(rows), ref_model(rows.double()), dense[: rows.shape[0], : rows.shape[1]])
        compiled = torch.compile(named, fullgraph=True)
        assert_close_2x(compiled(x), ref64, dense)
    sf.save(named, tmp_path / "saved")
    loaded = sf.load(tmp_path / "saved").to(device)
    saved, back = named.state_dict(), loaded.state_dict()
    assert list(saved) == list(back)
    for key in saved:
        assert back[key].device == x.device and torch.equal(saved[key], back[key]), key
    with torch.no_grad():
        assert_close_2x(loaded(x), ref64, dense)


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_GPU, reason="needs a CUDA GPU")
def test_timing_as_cuda_graphs():
    """dispatch times GPU calls as CUDA-graph replays when asked: the same work measures as dense
    does, and a call that reads the host inside (which a serving engine's graph cannot hold) gets
    0 (never chosen), found before any capture is tried."""
    from sparseflow import dispatch

    w = torch.randn(512, 1024, device="cuda", dtype=torch.float16)
    x = torch.randn(1, 1024, device="cuda", dtype=torch.float16)

    def same(t):
        return F.linear(t, w)

    def reads_host(t):
        return F.linear(t, w) * float(t[0, 0].item() != 7.0)

    cases = {"same": ([same], 4.0), "reads host": ([reads_host], 4.0)}
    ratios = dispatch._against_dense([w], x, cases, 5, graphs=True)
    assert ratios["reads host"] == 0.0
    assert 0.7 < ratios["same"] < 1.4, ratios
    eager = dispatch._against_dense([w], x, cases, 5)  # eagerly, the host read only costs time
    assert eager["reads host"] > 0.0
    assert torch.randn(4, device="cuda").isfinite().all()  # no failed capture left the CUDA generator broken


@pytest.mark.parametrize("device", DEVICES)
def test_activation_sparsity(device, tmp_path, monkeypatch):
    """Calibration and measured dispatch of activation-sparse layers on the model's device, and
    ActSparseLinear with either weight format there: the thresholded product at every row count."""
    from torch import nn

    monkeypatch.setenv("SPARSEFLOW_CACHE_DIR", str(tmp_path / "cache"))
    dtype = torch.float16 if device == "cuda" else torch.bfloat16
    gen = torch.Generator().manual_seed(12)
    model = nn.Sequential(nn.Linear(512, 1024), nn.SiLU(), nn.Linear(1024, 300)).to(device, dtype).eval()
    weight = model[0].weight.detach().clone()
    calibration = [torch.randn(8, 512, generator=gen).to(device, dtype) for _ in range(4)]
    report = sf.sparsify(model, activation_sparsity=0.5, calibration=calibration, m_range=(1, 16))
    kernels = {b.name for b in table.backends("act_sparse_linear", device=device)}
    for r, layer in zip(report.layers, (model[0], model[2]), strict=True):
        assert isinstance(layer, sf.ActSparseLinear) == r.choice.startswith("act-sparse"), r
        assert r.choice == "dense" or r.backend.split("+")[0] in kernels, r
        if isinstance(layer, sf.ActSparseLinear):  # (left dense where measured slower)
            assert layer.threshold > 0 and layer.w_t().device == torch.device(device)
    for weight_format in ("dense", "bitmask"):
        layer = sf.ActSparseLinear(weight, threshold=0.4, weight_format=weight_format).to(device)
        for rows in (1, 3, 40):
            x = torch.randn(rows, 512, generator=gen).to(device, dtype)
            xs = torch.where(act_sparse_mask(x, 0.4), x, torch.zeros((), dtype=dtype, device=device))
            with torch.no_grad():
                assert_close_2x(layer(x), F.linear(xs.double(), weight.double()), F.linear(xs, weight))
                y = model(x)
            assert y.shape == (rows, 300) and torch.isfinite(y).all()


# ---- the GPU benchmark suite's pure-Python parts (no GPU) ------------------------------------
def load_gpu_suite():
    import importlib.util

    spec = importlib.util.spec_from_file_location("gpu_suite", ROOT / "benchmarks" / "gpu_suite.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the file executes
    spec.loader.exec_module(module)
    return module


def test_gpu_suite_dry_run(tmp_path):
    suite = load_gpu_suite()
    assert suite.main(["--dry-run", "--out", str(tmp_path)]) == 0
    md = (tmp_path / "gpu_suite.md").read_text()
    assert "## Targets" in md and "act-sparse 50% GEMV" in md
    import json

    data = json.loads((tmp_path / "gpu_suite.json").read_text())
    cases = suite.plan(suite.DEFAULT_SHAPES, suite.DEFAULT_MS, suite.DEFAULT_DTYPES)
    assert len(data["results"]) == len(cases) == 78
    assert {(r["family"], r["kernel"]) for r in data["results"]} >= {
        ("act_sparse", "triton"),
        ("act_sparse", "cuda"),
        ("2:4", "triton"),
        ("2:4", "cuda"),
        ("2:4", "torch 2:4"),
        ("bsr64", "triton"),
        ("bsr64", "torch bsr"),
        ("bitmask", "triton"),
    }


def test_gpu_suite_targets():
    suite = load_gpu_suite()
    R = suite.Result
    results = [
        R("act_sparse", "triton", 4096, 4096, 1, "fp16", us=10.0, speedup=1.5),
        R("act_sparse", "cuda", 4096, 4096, 1, "fp16", us=8.0, speedup=1.9),
        R("bsr64", "triton", 4096, 4096, 1, "fp16", us=5.0),
        R("bsr64", "torch bsr", 4096, 4096, 1, "fp16", us=50.0),
        R("2:4", "torch 2:4", 4096, 4096, 2048, "fp16", us=90.0, speedup=1.1),
        R("2:4", "triton", 4096, 4096, 2048, "fp16", status="error"),
    ]
    targets = {t["target"]: t for t in suite.evaluate_targets(results)}
    act = targets["act-sparse 50% GEMV >= 1.7x dense (M=1)"]
    assert (act["met"], act["cases"], act["detail"][0]["kernel"]) == (1, 1, "cuda")
    bsr = targets["BSR 64x64 at 90% faster than torch BSR (M=1)"]
    assert bsr["met"] == 1 and bsr["worst"] == pytest.approx(10.0)
    prefill = targets["2:4 prefill >= 1.2x dense (M=2048)"]
    assert (prefill["met"], prefill["worst"]) == (0, 1.1)
    assert "1.90x" in suite.render_markdown(
        suite.Report(results=results, targets=list(targets.values())), "x"
    )
