"""What `prune` and `shrink` return: one row per layer, printable as a table, exportable as JSON."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field


@dataclass
class LayerPruneReport:
    name: str
    shape: tuple[int, int]
    sparsity: float  # achieved: fraction of exact zeros in the weight after pruning
    pattern: str
    method: str
    target: float | None = None  # the sparsity this layer was asked for (allocation), None for n:m
    note: str = ""  # e.g. "18/1536 neurons removed", "not called during calibration: left dense"

    @property
    def numel(self) -> int:
        return self.shape[0] * self.shape[1]


class PruneReport(list):
    """A list of LayerPruneReport, plus the overall (parameter-weighted) sparsity."""

    def __init__(self, rows=(), method: str = "", pattern: str = "", allocation: str = ""):
        super().__init__(rows)
        self.method, self.pattern, self.allocation = method, pattern, allocation

    @property
    def sparsity(self) -> float:
        total = sum(r.numel for r in self)
        return sum(r.sparsity * r.numel for r in self) / total if total else 0.0

    def __getitem__(self, key):
        if isinstance(key, str):
            for row in self:
                if row.name == key:
                    return row
            raise KeyError(key)
        return super().__getitem__(key)

    def to_dict(self) -> dict:
        return {"method": self.method, "pattern": self.pattern, "allocation": self.allocation,
                "sparsity": self.sparsity, "layers": [{**asdict(r), "shape": list(r.shape)} for r in self]}

    def to_markdown(self) -> str:
        lines = ["| layer | shape | target | sparsity | pattern | method | note |", "|---|---|---|---|---|---|---|"]
        for r in self:
            target = "-" if r.target is None else f"{r.target:.3f}"
            lines.append(f"| {r.name} | {r.shape[0]}x{r.shape[1]} | {target} | {r.sparsity:.3f} | {r.pattern} | "
                         f"{r.method} | {r.note} |")
        lines.append(f"| **all** | | | **{self.sparsity:.3f}** | | | |")
        return "\n".join(lines)

    def __str__(self) -> str:
        width = max([len(r.name) for r in self] + [5])
        out = [f"{'layer':<{width}}  {'shape':>11}  {'sparsity':>8}  pattern       method     note"]
        for r in self:
            shape = f"{r.shape[0]}x{r.shape[1]}"
            out.append(f"{r.name:<{width}}  {shape:>11}  {r.sparsity:8.3f}  {r.pattern:<12}  {r.method:<9}  {r.note}")
        out.append(f"{'all':<{width}}  {'':>11}  {self.sparsity:8.3f}")
        return "\n".join(out)

    def __repr__(self) -> str:
        return f"PruneReport({len(self)} layers, method={self.method!r}, pattern={self.pattern!r}, " \
               f"sparsity={self.sparsity:.3f})"


@dataclass
class ShrinkEntry:
    name: str  # the MLP or attention module
    kind: str  # "neurons" | "heads"
    before: int  # neurons / heads before
    after: int
    layers: list[str] = field(default_factory=list)  # the Linears that were resized
    params_removed: int = 0


class ShrinkReport(list):
    """A list of ShrinkEntry, plus totals."""

    @property
    def params_removed(self) -> int:
        return sum(e.params_removed for e in self)

    def to_dict(self) -> dict:
        return {"params_removed": self.params_removed, "entries": [asdict(e) for e in self]}

    def to_markdown(self) -> str:
        lines = ["| module | kind | before | after | params removed |", "|---|---|---|---|---|"]
        lines += [f"| {e.name} | {e.kind} | {e.before} | {e.after} | {e.params_removed} |" for e in self]
        lines.append(f"| **all** | | | | **{self.params_removed}** |")
        return "\n".join(lines)

    def __str__(self) -> str:
        width = max([len(e.name) for e in self] + [6])
        out = [f"{'module':<{width}}  kind     before  after  params removed"]
        out += [f"{e.name:<{width}}  {e.kind:<7}  {e.before:>6}  {e.after:>5}  {e.params_removed:>14}" for e in self]
        out.append(f"{'all':<{width}}  {'':<7}  {'':>6}  {'':>5}  {self.params_removed:>14}")
        return "\n".join(out)

    def __repr__(self) -> str:
        return f"ShrinkReport({len(self)} modules, params_removed={self.params_removed})"
