"""Structured pruning: whole MLP neurons and whole attention heads.

A neuron is one row of each "up" Linear (up, gate; BERT's intermediate.dense) and the matching
column of the "down" Linear (down; BERT's output.dense). A head is head_dim rows of q, k and v and
the matching columns of o (with grouped-query attention, a unit is one k/v head together with all
the query heads that share it, so the group structure survives). Pruning zeroes those rows and
columns (and the up biases), which makes the model compute exactly what the physically smaller
model computes; `shrink` (shrink.py) then removes them.

Criteria, all per MLP / attention module (units are only compared within a module):
- "magnitude": ||up rows|| * ||down column|| (neurons); ||v rows|| * ||o columns|| (heads);
- "wanda": sum over the unit's down/o input columns of ||W[:, c]|| * ||x_c||, the Wanda score
  |W| * ||x|| aggregated over a column (Wanda-sp / FLAP-style);
- "variance" (Variance-Based Pruning; FLAP's fluctuation): sum of Var(x_c) * ||W[:, c]||^2, the
  variance the unit adds to the output; the removed units' mean output W[:, R] @ mean(x_R) is
  folded into the down/o bias, so only their fluctuation is lost;
- "sparsegpt": units chosen as for "wanda", then the kept down/o columns and the bias are refitted
  by least squares on the calibration inputs (the OBS update for removing whole columns):
  [W_K', db] = W [H_:K, s] [[H_KK, s_K], [s_K^T, N]]^-1, with H = X^T X, s = sum x, dampened.
Each module loses round(sparsity * units) units (at least one unit is kept)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .capture import ColumnMoments, Hessian
from .patterns import round_units

STRUCTURED_METHODS = ("magnitude", "wanda", "variance", "sparsegpt")


@dataclass
class MLPUnit:
    """Coupled Linears of one MLP: `ups` produce the neurons (rows), `down` consumes them (columns)."""

    name: str
    ups: list[str]
    down: str

    def size(self, modules) -> int:
        return modules[self.down].in_features


@dataclass
class AttentionUnit:
    """One attention module: q/k/v/o Linears, the module holding the head attributes, head layout."""

    name: str  # the module holding num_heads / head_dim attributes
    q: str
    k: str
    v: str
    o: str
    head_dim: int
    num_heads: int
    num_kv_heads: int

    @property
    def group(self) -> int:
        return self.num_heads // self.num_kv_heads

    @property
    def units(self) -> int:
        return self.num_kv_heads

    def q_rows(self, u: int) -> slice:
        w = self.group * self.head_dim
        return slice(u * w, (u + 1) * w)

    def kv_rows(self, u: int) -> slice:
        return slice(u * self.head_dim, (u + 1) * self.head_dim)


_GATED = (("gate_proj", "up_proj", "down_proj"), ("w1", "w3", "w2"), ("wi_0", "wi_1", "wo"))
_PAIRS = (("up_proj", "down_proj"), ("fc1", "fc2"), ("dense_h_to_4h", "dense_4h_to_h"), ("c_fc", "c_proj"),
          ("wi", "wo"), ("lin1", "lin2"), ("fc_in", "fc_out"))
_QKVO = (("q_proj", "k_proj", "v_proj", "o_proj"), ("q_proj", "k_proj", "v_proj", "out_proj"),
         ("q_lin", "k_lin", "v_lin", "out_lin"))
_ELEMENTWISE = (nn.ReLU, nn.ReLU6, nn.GELU, nn.SiLU, nn.Tanh, nn.Sigmoid, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU,
                nn.Mish, nn.Hardswish, nn.Hardsigmoid, nn.Hardtanh, nn.Softplus, nn.Softsign, nn.Tanhshrink,
                nn.Dropout, nn.Identity)


def _is_elementwise(module: nn.Module) -> bool:
    if any(True for _ in module.parameters()):
        return False
    if isinstance(module, _ELEMENTWISE):
        return True
    # transformers' activation modules (GELUActivation, SiLUActivation, ...) are parameter-free and elementwise
    return type(module).__module__.startswith("transformers.activations")


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


_SOFTMAXES = (nn.Softmax, nn.Softmin, nn.LogSoftmax)
_NORMS = (nn.LayerNorm, nn.GroupNorm, nn.modules.batchnorm._BatchNorm)  # and any class named *norm*


def _mixes_neurons(module: nn.Module, skip: set[str], width: int) -> bool:
    """Whether a module whose MLP was found by attribute names may mix its neurons between the up
    and down projections (its forward cannot be seen): a child other than the projections that is a
    softmax or a norm over `width` features, or holds a tensor `width` long. Removing a neuron whose
    down column is zero is exact only if each neuron stays on its own up to the down projection."""
    for name, child in module.named_children():
        if name in skip:
            continue
        if isinstance(child, _SOFTMAXES):
            return True
        if isinstance(child, _NORMS) or "norm" in type(child).__name__.lower():
            if any(width in t.shape for t in [*child.parameters(recurse=False), *child.buffers(recurse=False)]) or \
                    getattr(child, "normalized_shape", None) in ((width,), [width]):
                return True
    return False


def find_mlps(model: nn.Module) -> list[MLPUnit]:
    """Every MLP whose neurons can be removed: known attribute names (gate/up/down, fc1/fc2, BERT's
    intermediate/output) and Linear -> elementwise... -> Linear runs inside an nn.Sequential."""
    found: list[MLPUnit] = []
    used: set[str] = set()

    def add(name, ups, down, modules_):
        if not all(isinstance(modules_[u], nn.Linear) for u in ups) or not isinstance(modules_[down], nn.Linear):
            return
        if any(modules_[u].out_features != modules_[down].in_features for u in ups) or down in used:
            return
        used.add(down)
        found.append(MLPUnit(name, list(ups), down))

    modules = dict(model.named_modules())
    for name, module in modules.items():
        for names in _GATED + _PAIRS:
            if all(isinstance(getattr(module, a, None), nn.Linear) for a in names):
                if not _mixes_neurons(module, set(names), getattr(module, names[-1]).in_features):
                    add(name, [_join(name, a) for a in names[:-1]], _join(name, names[-1]), modules)
                break
        inter, out = getattr(module, "intermediate", None), getattr(module, "output", None)
        if isinstance(getattr(inter, "dense", None), nn.Linear) and isinstance(getattr(out, "dense", None), nn.Linear):
            add(name, [_join(name, "intermediate.dense")], _join(name, "output.dense"), modules)
        if isinstance(module, nn.Sequential):
            children = list(module.named_children())
            for i, (child_name, child) in enumerate(children):
                if not isinstance(child, nn.Linear):
                    continue
                j = i + 1
                while j < len(children) and _is_elementwise(children[j][1]):
                    j += 1
                if j < len(children) and isinstance(children[j][1], nn.Linear):
                    add(_join(name, child_name), [_join(name, child_name)], _join(name, children[j][0]), modules)
    return found


def _attr_int(module, *names) -> int | None:
    for n in names:
        v = getattr(module, n, None)
        if isinstance(v, int) and v > 0:
            return v
    return None


def find_attention(model: nn.Module) -> list[AttentionUnit]:
    """Every attention module whose heads can be removed: BERT-style (query/key/value in `self`,
    output.dense beside it) and q/k/v/o projections in one module (Llama, Mistral, OPT...)."""
    found: list[AttentionUnit] = []
    modules = dict(model.named_modules())
    for name, module in modules.items():
        holder = getattr(module, "self", None)
        out = getattr(getattr(module, "output", None), "dense", None)
        if holder is not None and isinstance(out, nn.Linear) and all(
                isinstance(getattr(holder, a, None), nn.Linear) for a in ("query", "key", "value")):
            head_dim = _attr_int(holder, "attention_head_size", "head_dim", "head_size")
            if head_dim and holder.query.out_features % head_dim == 0 and out.in_features == holder.query.out_features:
                heads = holder.query.out_features // head_dim
                kv = holder.key.out_features // head_dim
                if kv and heads % kv == 0:
                    p = _join(name, "self")
                    found.append(AttentionUnit(p, _join(p, "query"), _join(p, "key"), _join(p, "value"),
                                               _join(name, "output.dense"), head_dim, heads, kv))
            continue
        for names in _QKVO:
            if not all(isinstance(getattr(module, a, None), nn.Linear) for a in names):
                continue
            q, k = getattr(module, names[0]), getattr(module, names[1])
            config = getattr(module, "config", None)
            head_dim = _attr_int(module, "head_dim", "attention_head_size", "head_size") or \
                _attr_int(config, "head_dim")
            if head_dim is None:
                heads_attr = _attr_int(module, "num_heads", "num_attention_heads", "n_heads")
                head_dim = q.out_features // heads_attr if heads_attr else None
            if not head_dim or q.out_features % head_dim or k.out_features % head_dim:
                break
            heads, kv = q.out_features // head_dim, k.out_features // head_dim
            if kv and heads % kv == 0 and getattr(module, names[3]).in_features == q.out_features:
                found.append(AttentionUnit(name, *(_join(name, a) for a in names), head_dim, heads, kv))
            break
    return found


# ---------------------------------------------------------------------------------------------
# Scores


def _col_norms(w: torch.Tensor) -> torch.Tensor:
    return w.detach().float().norm(dim=0)


def neuron_scores(unit: MLPUnit, modules, method: str, stats) -> torch.Tensor:
    down = modules[unit.down].weight.detach().float()
    if method == "magnitude":
        up = sum(modules[u].weight.detach().float().square().sum(1) for u in unit.ups).sqrt()
        return up * down.norm(dim=0)
    sum_sq = stats.sum_sq.float().to(down.device)
    if method in ("wanda", "sparsegpt"):
        return down.norm(dim=0) * sum_sq.sqrt()
    if method == "variance":
        return stats.var.float().to(down.device) * down.square().sum(0)
    raise ValueError(f"unknown structured method {method!r}")


def head_scores(unit: AttentionUnit, modules, method: str, stats) -> torch.Tensor:
    o = modules[unit.o].weight.detach().float()
    if method == "magnitude":
        v = modules[unit.v].weight.detach().float()
        return torch.stack([v[unit.kv_rows(u)].norm() * o[:, unit.q_rows(u)].norm() for u in range(unit.units)])
    if method in ("wanda", "sparsegpt"):
        col = o.norm(dim=0) * stats.sum_sq.float().to(o.device).sqrt()
    elif method == "variance":
        col = stats.var.float().to(o.device) * o.square().sum(0)
    else:
        raise ValueError(f"unknown structured method {method!r}")
    return col.view(unit.units, -1).sum(1)


# ---------------------------------------------------------------------------------------------
# Zeroing and compensation


def _ensure_bias(linear: nn.Linear) -> torch.Tensor:
    if linear.bias is None:
        linear.bias = nn.Parameter(torch.zeros(linear.out_features, dtype=linear.weight.dtype,
                                               device=linear.weight.device))
        linear._sparseflow_bias_added = True
    return linear.bias


@torch.no_grad()
def _fold_mean(linear: nn.Linear, columns: torch.Tensor, mean: torch.Tensor) -> bool:
    """bias += W[:, R] @ mean(x_R): the removed inputs' average contribution stays in the output."""
    if columns.numel() == 0:
        return False
    w = linear.weight.detach().float()
    shift = w[:, columns] @ mean.float().to(w.device)[columns]
    bias = _ensure_bias(linear)
    bias.add_(shift.to(bias.dtype))
    return True


@torch.no_grad()
def _refit(linear: nn.Linear, kept: torch.Tensor, hess: Hessian, moments: ColumnMoments, dampening: float) -> bool:
    """Least-squares refit of the kept input columns and the bias to the dense output."""
    w = linear.weight.detach().float()
    dev = w.device
    H = hess.H.to(dev)
    s = moments.sum.float().to(dev)
    n = float(moments.count)
    k = kept.to(dev)
    size = k.numel() + 1
    A = torch.empty(size, size, dtype=torch.float32, device=dev)
    A[:-1, :-1] = H[k][:, k]
    A[:-1, -1] = s[k]
    A[-1, :-1] = s[k]
    A[-1, -1] = n
    # Ridge towards the current weights (not towards 0): + lam * ||W_K' - W_K||^2.
    lam = dampening * float(A.diagonal()[:-1].mean()) if k.numel() else dampening
    A.diagonal()[:-1].add_(lam)
    rhs = w @ torch.cat([H[:, k], s[:, None]], dim=1)  # [N, |k| + 1]
    rhs[:, :-1] += lam * w[:, k]
    try:
        solution = torch.linalg.solve(A, rhs.T).T  # [N, |k| + 1]
    except RuntimeError:
        return False
    new_w = torch.zeros_like(w)
    new_w[:, k] = solution[:, :-1]
    linear.weight.copy_(new_w.to(linear.weight.dtype))
    bias = _ensure_bias(linear)
    bias.add_(solution[:, -1].to(bias.dtype))
    return True


@torch.no_grad()
def zero_neurons(unit: MLPUnit, modules, removed: torch.Tensor) -> None:
    for u in unit.ups:
        lin = modules[u]
        lin.weight[removed.to(lin.weight.device)] = 0
        if lin.bias is not None:
            lin.bias[removed.to(lin.weight.device)] = 0
    down = modules[unit.down]
    down.weight[:, removed.to(down.weight.device)] = 0


def head_columns(unit: AttentionUnit, heads: list[int]) -> torch.Tensor:
    cols = [torch.arange(unit.q_rows(u).start, unit.q_rows(u).stop) for u in heads]
    return torch.cat(cols) if cols else torch.zeros(0, dtype=torch.long)


def kv_rows(unit: AttentionUnit, heads: list[int]) -> torch.Tensor:
    rows = [torch.arange(unit.kv_rows(u).start, unit.kv_rows(u).stop) for u in heads]
    return torch.cat(rows) if rows else torch.zeros(0, dtype=torch.long)


@torch.no_grad()
def zero_heads(unit: AttentionUnit, modules, removed: list[int]) -> None:
    q_rows, kv = head_columns(unit, removed), kv_rows(unit, removed)
    for name, rows in ((unit.q, q_rows), (unit.k, kv), (unit.v, kv)):
        lin = modules[name]
        lin.weight[rows.to(lin.weight.device)] = 0
        if lin.bias is not None:
            lin.bias[rows.to(lin.weight.device)] = 0
    o = modules[unit.o]
    o.weight[:, q_rows.to(o.weight.device)] = 0


def lowest(scores: torch.Tensor, count: int) -> torch.Tensor:
    if count <= 0:
        return torch.zeros(0, dtype=torch.long)
    s = scores.float().nan_to_num(nan=float("inf")).cpu()
    return s.topk(count, largest=False).indices.sort().values


class StructuredStats:
    """What the calibrated criteria need from the down / o input: moments, plus X^T X for sparsegpt."""

    def __init__(self, features: int, device, hessian: bool):
        self.moments = ColumnMoments(features, device)
        self.hessian = Hessian(features, device) if hessian else None

    def add(self, rows: torch.Tensor) -> None:
        self.moments.add(rows)
        if self.hessian is not None:
            self.hessian.add(rows)

    @property
    def count(self) -> int:
        return self.moments.count


def prune_mlp(unit: MLPUnit, modules, method: str, sparsity: float, stats: StructuredStats | None,
              dampening: float = 0.01) -> tuple[int, int, str]:
    """Zero round(sparsity * neurons) neurons of one MLP; returns (removed, total, note)."""
    total = unit.size(modules)
    count = round_units(total, sparsity)
    scores = neuron_scores(unit, modules, method, stats.moments if stats is not None else None)
    removed = lowest(scores, count)
    note = ""
    down = modules[unit.down]
    if method == "variance" and removed.numel():
        _fold_mean(down, removed.to(down.weight.device), stats.moments.mean)
        note = "mean folded into bias"
    if method == "sparsegpt" and removed.numel():
        keep = torch.ones(total, dtype=torch.bool)
        keep[removed] = False
        ok = _refit(down, keep.nonzero().flatten(), stats.hessian, stats.moments, dampening)
        note = "down refitted" if ok else "refit failed (singular): zeroed only"
    zero_neurons(unit, modules, removed)
    return int(removed.numel()), total, note


def prune_heads(unit: AttentionUnit, modules, method: str, sparsity: float, stats: StructuredStats | None,
                dampening: float = 0.01) -> tuple[int, int, str]:
    """Zero round(sparsity * units) heads (k/v groups) of one attention module."""
    count = round_units(unit.units, sparsity)
    scores = head_scores(unit, modules, method, stats.moments if stats is not None else None)
    removed = [int(i) for i in lowest(scores, count)]
    note = ""
    o = modules[unit.o]
    cols = head_columns(unit, removed)
    if method == "variance" and removed:
        _fold_mean(o, cols.to(o.weight.device), stats.moments.mean)
        note = "mean folded into bias"
    if method == "sparsegpt" and removed:
        keep = torch.ones(o.in_features, dtype=torch.bool)
        keep[cols] = False
        ok = _refit(o, keep.nonzero().flatten(), stats.hessian, stats.moments, dampening)
        note = "o refitted" if ok else "refit failed (singular): zeroed only"
    zero_heads(unit, modules, removed)
    return len(removed) * unit.group, unit.num_heads, note
