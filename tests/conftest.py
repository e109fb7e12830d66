import contextlib
import os
import threading

import pytest
import torch

import sparseflow as sf
from sparseflow.ops import cpu


@pytest.fixture(autouse=True)
def poison_outputs(monkeypatch):
    """Every kernel output starts as NaN, so an element a kernel forgets to write fails the test."""
    monkeypatch.setattr(cpu, "POISON_OUTPUTS", True)


# SPARSEFLOW_ISA set in the environment narrows the run to that one level.
ISA_LEVELS = [os.environ["SPARSEFLOW_ISA"]] if os.environ.get("SPARSEFLOW_ISA") else sf.available_isas()


@pytest.fixture(params=ISA_LEVELS)
def isa(request):
    """Runs a test once per ISA level this CPU has (what SPARSEFLOW_ISA forces)."""
    with sf.isa(request.param):
        yield request.param


def max_err(y: torch.Tensor, ref64: torch.Tensor) -> float:
    return (y.double() - ref64).abs().max().item() if y.numel() else 0.0


ATOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}


def assert_close_2x(y: torch.Tensor, ref64: torch.Tensor, torch_dense: torch.Tensor) -> None:
    """The flash-attention idiom: our error against a float64 reference is at most twice the error
    of torch's own dense op in the same dtype, plus a small atol (scaled by the output size)."""
    assert y.shape == ref64.shape, (y.shape, ref64.shape)
    assert y.dtype == torch_dense.dtype
    assert not torch.isnan(y).any(), "NaN in the output: an element was not written (outputs are poisoned)"
    scale = max(1.0, ref64.abs().max().item()) if ref64.numel() else 1.0
    err, base = max_err(y, ref64), max_err(torch_dense, ref64)
    assert err <= 2 * base + ATOL[y.dtype] * scale, f"error {err:.3g} vs torch dense {base:.3g} ({y.dtype})"


def run_in_threads(fn, threads: int = 4) -> None:
    """Calls fn() in several threads at once; a failure in any of them fails the caller's test."""
    errors = []

    def worker():
        try:
            fn()
        except Exception as e:  # surfaced in the main thread
            errors.append(e)

    pool = [threading.Thread(target=worker) for _ in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    assert not errors, errors


@contextlib.contextmanager
def torch_threads(n: int):
    """torch.set_num_threads(n) for a block (the kernels take torch's thread count), then back."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def pruned_linear(k: int = 64, n: int = 32, keep: float = 0.5, seed: int = 0) -> torch.nn.Linear:
    """A Linear(k, n) whose weight keeps about `keep` of its entries (magnitude-free, seeded)."""
    torch.manual_seed(seed)
    lin = torch.nn.Linear(k, n)
    with torch.no_grad():
        lin.weight.mul_(torch.rand(n, k) < keep)
    return lin


class Mask(torch.nn.Module):
    """A parametrization with a persistent mask buffer (unlike torch.ao's FakeSparsity)."""

    def __init__(self, mask):
        super().__init__()
        self.register_buffer("mask", mask)

    def forward(self, w):
        return w * self.mask
