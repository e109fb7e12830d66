"""What every compressed weight format shares: immutability, device/dtype moves, sizes, and the
name -> tensor view that checkpoints use."""

from __future__ import annotations

import inspect
from typing import Any, ClassVar

import torch

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def densified(w):
    """A torch sparse tensor (COO, CSR, BSR, semi-structured...) as a dense one; anything else as it is."""
    if isinstance(w, torch.Tensor) and (w.layout != torch.strided or w.is_sparse):
        return w.to_dense()
    return w


def check_weight(w: torch.Tensor, what: str = "weight") -> torch.Tensor:
    """A 2-D, non-empty, floating weight (any strides), detached; raises a ValueError/TypeError naming
    the problem."""
    if not isinstance(w, torch.Tensor):
        raise TypeError(f"{what} must be a torch.Tensor, got {type(w).__name__}")
    if w.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{what} must be float32, bfloat16 or float16, got {w.dtype}")
    if w.dim() != 2:
        raise ValueError(f"{what} must be 2-D [out_features, in_features], got shape {tuple(w.shape)}")
    if w.numel() == 0:
        raise ValueError(f"{what} is empty (shape {tuple(w.shape)})")
    if w.is_meta:
        raise ValueError(f"{what} is on the meta device (no data): load or materialize the weights first")
    return w.detach()  # formats store data; a Parameter's autograd history is not part of it


def check_shape(fmt) -> None:
    """A format's logical shape must be two positive ints [out_features, in_features]."""
    if len(fmt.shape) != 2 or min(fmt.shape) < 1:
        raise ValueError(f"{fmt.format_name}: shape must be 2-D and non-empty, got {tuple(fmt.shape)}")


def take_tensors(cls, tensors, validate: bool = True) -> tuple[torch.Tensor, ...]:
    """The buffers `cls.tensor_names` from a name -> tensor mapping (a checkpoint's view); with
    `validate`, a missing name or a non-tensor raises a ValueError/TypeError naming it."""
    if validate:
        missing = [name for name in cls.tensor_names if name not in tensors]
        if missing:
            expected = list(cls.tensor_names)
            raise ValueError(f"{cls.format_name}: missing buffers {missing}; expected {expected}")
        for name in cls.tensor_names:
            if not isinstance(tensors[name], torch.Tensor):
                got = type(tensors[name]).__name__
                raise TypeError(f"{cls.format_name}: {name} must be a torch.Tensor, got {got}")
    return tuple(tensors[name] for name in cls.tensor_names)


class SparseFormat:
    """Base of Bitmask, CSR, BSR and NM. Instances are immutable: methods return new objects."""

    format_name: ClassVar[str]
    tensor_names: ClassVar[tuple[str, ...]]  # the buffers, in checkpoint order

    shape: torch.Size
    values: torch.Tensor

    def __setattr__(self, name: str, value: Any) -> None:
        if getattr(self, "_frozen", False):
            raise AttributeError(f"{type(self).__name__} is immutable")
        object.__setattr__(self, name, value)

    def __delattr__(self, name: str) -> None:
        raise AttributeError(f"{type(self).__name__} is immutable")

    def _freeze(self) -> None:
        object.__setattr__(self, "_frozen", True)

    # ---- what subclasses provide ----
    def params(self) -> dict[str, Any]:
        """JSON-serialisable parameters besides shape and dtype (block, n, m, ...)."""
        return {}

    @classmethod
    def from_tensors(cls, shape: tuple[int, int], tensors: dict[str, torch.Tensor], **params: Any):
        raise NotImplementedError

    def to_dense(self) -> torch.Tensor:
        raise NotImplementedError

    @property
    def nnz(self) -> int:
        raise NotImplementedError

    # ---- shared ----
    def tensors(self) -> dict[str, torch.Tensor]:
        return {name: getattr(self, name) for name in self.tensor_names}

    @property
    def dtype(self) -> torch.dtype:
        return self.values.dtype

    @property
    def device(self) -> torch.device:
        return self.values.device

    @property
    def nbytes(self) -> int:
        """Bytes of all buffers: values and metadata."""
        return sum(t.numel() * t.element_size() for t in self.tensors().values())

    @property
    def density(self) -> float:
        """Fraction of the logical weight's elements that are stored as non-zeros."""
        rows, cols = self.shape
        return self.nnz / (rows * cols)

    def clone(self):
        """The same weight in new memory (every buffer copied)."""
        tensors = {name: t.clone() for name, t in self.tensors().items()}
        return type(self).from_tensors(tuple(self.shape), tensors, validate=False, **self.params())

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None):
        """Moves every buffer to `device`; `dtype` converts the values only (metadata keeps its type).
        Like Tensor.to, a dtype may come first: w.to(torch.bfloat16)."""
        if isinstance(device, torch.dtype):
            if dtype is not None:
                raise TypeError("to() got two dtypes")
            device, dtype = None, device
        if dtype is not None and dtype not in FLOAT_DTYPES:
            raise TypeError(f"values must be float32, bfloat16 or float16, got {dtype}")
        tensors = {}
        for name, t in self.tensors().items():
            t = t.to(device) if device is not None else t
            if dtype is not None and t is not None and t.is_floating_point():
                t = t.to(dtype)
            tensors[name] = t
        return type(self).from_tensors(tuple(self.shape), tensors, validate=False, **self.params())

    def __repr__(self) -> str:
        extra = "".join(f", {k}={v}" for k, v in self.params().items())
        return (
            f"{type(self).__name__}(shape={tuple(self.shape)}, dtype={self.dtype}, device={self.device}, "
            f"density={self.density:.3f}, nbytes={self.nbytes}{extra})"
        )


def param_names(cls: type) -> set[str]:
    """The keyword parameters of cls.from_tensors besides shape, tensors and validate (block, n, m)."""
    names = inspect.signature(cls.from_tensors).parameters
    return {n for n in names if n not in ("shape", "tensors", "validate")}
