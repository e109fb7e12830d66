"""Rendering of a kernel benchmark report (the dict `kernels.run` returns): rich tables for the
terminal, Markdown for benchmarks/RESULTS.md, JSON, and a matplotlib plot of speedup vs sparsity."""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from pathlib import Path

from ..io._atomic import save_figure, write_result
from .kernels import DTYPES, KernelSpec, analytic_limit


def _ms(s: float | None) -> str:
    return "-" if s is None else f"{s * 1e3:.3f}"


def _x(v: float | None, digits: int = 2) -> str:
    return "-" if v is None else f"{v:.{digits}f}x"


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{v:.0f}%"


def _backend(key: str) -> str:
    return key.rsplit("/", 1)[-1]


def _status(r: dict) -> str:
    if r["status"] != "ok":
        return f"{r['status'].upper()}: {r['message']}"
    flags = []
    if r["meets_target"] is not None:
        flags.append("meets target" if r["meets_target"] else "BELOW target")
    if r["above_limit"]:
        flags.append("above limit?")
    if r.get("noisy"):
        flags.append("noisy")
    return ", ".join(flags) or "-"


def header_lines(report: dict) -> list[str]:
    meta, band = report["meta"], report["bandwidth"]
    load = ""
    if meta.get("loadavg_start") is not None:
        load = f"; load avg {meta['loadavg_start']:.2f} -> {meta['loadavg_end']:.2f}"
    busy = ""
    others = meta.get("other_cores")
    if others is None:  # no /proc/stat: the load average at the end, which this benchmark's own threads raise
        end = meta.get("loadavg_end")  # to about `threads` (the start reading came before they ran)
        others = end - meta["threads"] if end is not None else None
    else:
        load += f"; other processes used {others:.2f} cores on average"
    if others is not None and others > 0.1 * meta["threads"] and meta.get("clock") == "thread":
        busy = (
            f"note: other processes used {others:.2f} cores; thread CPU time is not inflated by "
            "preemption, but they still share the caches and the memory bandwidth"
        )
    elif others is not None and others > 0.1 * meta["threads"]:
        busy = (
            f"WARNING: other processes used {others:.2f} cores on average while this ran on {meta['threads']} "
            "threads: they took cores from timed calls, and dense F.linear suffers more than the kernels "
            "(its OpenMP threads wait for each other at a barrier), so speedups come out too high; rerun on an "
            "idle machine, or with --threads 1"
        )
    clock = "" if meta.get("clock", "wall") == "wall" else "; clock: CPU time of the calling thread"
    stat = (
        "speedup = median over rounds of dense/sparse timed in the same round"
        if meta.get("stat") != "min"
        else "speedup = best dense / best sparse time (--stat min)"
    )
    lines = [
        f"CPU {meta['cpu']}, {meta['threads']} threads, ISA {meta['isa']}, torch {meta['torch']}, "
        f"sparseflow {meta['sparseflow']}, {meta['date']}",
        f"copy bandwidth {band['copy_gbps']:.1f} GB/s (read+write), read {band['read_gbps']:.1f} GB/s; "
        f"{_cold(meta['flush'])}; median of <= {meta['reps']} interleaved rounds "
        f"(<= {meta['max_seconds_per_case']} s per case){load}; {meta['elapsed_s']:.0f} s in all",
        f"{stat}; times shown are {'medians' if meta.get('stat') != 'min' else 'best of the rounds'}{clock}",
        f"command: {meta['command']}",
    ]
    return lines + ([busy] if busy else [])


def _cold(flush: str) -> str:
    if flush == "layers":
        return ("weights kept cold as a model's layers are: each timed round calls a block of copies of the "
                "weight (2x the LLC or more in all), code and x left warm; times are per call")
    return f"cache flush '{flush}' before every call"


MAIN_COLUMNS = (
    "kernel",
    "N x K",
    "backend",
    "density",
    "dense ms",
    "sparse ms",
    "speedup",
    "p10-p90",
    "best",
    "target",
    "limit",
    "% of limit",
    "GB/s",
    "% copy BW",
    "op overhead us",
    "status",
)


def main_rows(report: dict, dtype: str, m: int) -> list[tuple[str, ...]]:
    rows = []
    for r in report["results"]:
        if r["dtype"] != dtype or r["m"] != m:
            continue
        ok = r["status"] == "ok"
        rows.append(
            (
                r["kernel"],
                f"{r['n']}x{r['k']}",
                _backend(r["backend"]),
                f"{r['density']:.3f}",
                _ms(r["dense_s"]),
                _ms(r["sparse_s"]),
                _x(r["ratio"]),
                f"{r['ratio_p10']:.2f}-{r['ratio_p90']:.2f}" if ok else "-",
                _x(r["ratio_min"]),
                "-" if r["target"] is None else f">= {r['target']:g}x",
                _x(r["limit"]),
                _pct(None if r["frac_limit"] is None else 100 * r["frac_limit"]),
                "-" if r["gbps"] is None else f"{r['gbps']:.1f}",
                _pct(r["pct_copy_bw"]),
                "-" if r["overhead_s"] is None else f"{r['overhead_s'] * 1e6:.0f}",
                _status(r),
            )
        )
    return rows


TORCH_CSR_COLUMNS = (
    "kernel (50%)",
    "N x K",
    "dtype",
    "ours ms",
    "torch CSR ms",
    "torch dtype",
    "speedup vs torch",
    ">= 3x",
    "dense vs torch CSR",
)


def torch_csr_rows(report: dict) -> list[tuple[str, ...]]:
    return [
        (
            t["kernel"],
            f"{t['n']}x{t['k']}",
            t["dtype"],
            _ms(t["sparse_s"]),
            _ms(t["torch_s"]),
            t["torch_dtype"],
            _x(t["speedup"], 1),
            "yes" if t["meets_target"] else "NO",
            _x(t["dense_over_torch"], 1),
        )
        for t in report["torch_csr"]
    ]


def crossover_table(report: dict) -> tuple[list[str], list[tuple[str, ...]]]:
    ms = sorted({int(m) for c in report["crossover"] for m in c["ratios"]})
    cols = ["kernel", "backend", "N x K", "dtype", *(f"M={m}" for m in ms), "crossover (speedup falls below 1)"]
    rows = []
    for c in report["crossover"]:
        rows.append(
            (
                c["kernel"],
                (c.get("backend") or "-").rsplit("/", 1)[-1],  # the table row key: its name
                f"{c['n']}x{c['k']}",
                c["dtype"],
                *(_x(c["ratios"].get(str(m))) for m in ms),
                c["note"],
            )
        )
    return cols, rows


def _groups(report: dict) -> Iterable[tuple[str, int]]:
    seen = []
    wanted = set(report["meta"].get("ms") or [1])
    for r in report["results"]:
        key = (r["dtype"], r["m"])
        if r["m"] in wanted and key not in seen:
            seen.append(key)
    return seen


def summary(report: dict) -> str:
    judged = [r for r in report["results"] if r["target"] is not None and r["m"] == 1]
    met = sum(1 for r in judged if r["meets_target"])
    wrong = sum(1 for r in report["results"] if r["status"] in ("wrong", "error"))
    csr = report["torch_csr"]
    text = f"targets met at M=1: {met}/{len(judged)}"
    if csr:
        text += f"; >= 3x over torch CSR: {sum(t['meets_target'] for t in csr)}/{len(csr)}"
    if wrong:
        text += f"; WRONG or failing kernels: {wrong}"
    return text


def print_report(report: dict, console=None) -> None:
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    for line in header_lines(report):
        console.print(line, highlight=False)

    def table(title, columns, rows):
        t = Table(title=title, title_justify="left", show_lines=False, pad_edge=False)
        for i, c in enumerate(columns):
            t.add_column(c, justify="left" if i < 3 or c in ("status", "note") else "right", overflow="fold")
        for row in rows:
            style = "red" if any(str(v).startswith(("WRONG", "ERROR", "NO BACKEND")) for v in row) else None
            t.add_row(*row, style=style)
        console.print(t)

    for dtype, m in _groups(report):
        table(f"Speedup over dense F.linear, {dtype}, M={m}", MAIN_COLUMNS, main_rows(report, dtype, m))
    if report["torch_csr"]:
        table(
            "Against torch's CSR matmul (torch.sparse.mm(W_csr, x.T)), same 50%-sparse weight, M=1",
            TORCH_CSR_COLUMNS,
            torch_csr_rows(report),
        )
    if report["crossover"]:
        cols, rows = crossover_table(report)
        table("Speedup over dense by M (the crossover, for the dispatcher)", cols, rows)
    console.print(summary(report), highlight=False)


def _md_table(columns, rows) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(str(v).replace("|", "/") for v in row) + " |" for row in rows]
    return "\n".join(lines)


def markdown(report: dict) -> str:
    parts = ["\n".join(f"- {line}" for line in header_lines(report))]
    for dtype, m in _groups(report):
        parts.append(
            f"### Speedup over dense F.linear, {dtype}, M={m}\n\n"
            + _md_table(MAIN_COLUMNS, main_rows(report, dtype, m))
        )
    if report["torch_csr"]:
        parts.append(
            "### Against torch's CSR matmul (same 50%-sparse weight, M=1)\n\n"
            + _md_table(TORCH_CSR_COLUMNS, torch_csr_rows(report))
        )
    if report["crossover"]:
        parts.append("### Speedup over dense by M\n\n" + _md_table(*crossover_table(report)))
    parts.append(summary(report))
    return "\n\n".join(parts) + "\n"


def _finite(obj):
    """JSON has no inf/NaN: they become null."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def to_json(report: dict) -> str:
    return json.dumps(_finite(report), indent=1) + "\n"


def write_json(report: dict, path: str | Path) -> None:
    write_result(path, to_json(report))


def _spec_of(r: dict) -> KernelSpec:
    n = m = 0
    if r["kind"] == "nm":
        n, m = (int(v) for v in r["kernel"].split(":"))
    block = (32, 32)
    if r["kind"] == "bsr":
        bm, bk = r["kernel"].split()[1].split("x")
        block = (int(bm), int(bk))
    return KernelSpec(r["kind"], r["sparsity"], r["act_sparsity"], n=n, m=m, block=block)


def _kind_name(spec: KernelSpec) -> str:
    if spec.kind == "bsr":
        return f"bsr {spec.block[0]}x{spec.block[1]}"
    if spec.kind == "act":
        return "act (dense w_t)"
    if spec.kind == "act_bitmask":
        return f"bitmask + act {round(spec.act_sparsity * 100)}%"
    return spec.label if spec.kind == "nm" else spec.kind


def plot(report: dict, path: str | Path) -> Path:
    """Speedup (M=1, first shape) vs the fraction of the weight a kernel may skip, one color per
    kernel kind, each with its physical limit (bytes ratio) as a dashed line; one panel per dtype."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in report["results"] if r["status"] == "ok" and r["m"] == 1]
    if not rows:
        raise ValueError("no successful M=1 results to plot")
    n, k = rows[0]["n"], rows[0]["k"]
    rows = [r for r in rows if (r["n"], r["k"]) == (n, k)]
    dtypes = list(dict.fromkeys(r["dtype"] for r in rows))
    fig, axes = plt.subplots(1, len(dtypes), figsize=(6.5 * len(dtypes), 4.8), squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, dtype in zip(axes[0], dtypes, strict=True):
        mine = [r for r in rows if r["dtype"] == dtype]
        names = list(dict.fromkeys(_kind_name(_spec_of(r)) for r in mine))
        for i, name in enumerate(names):
            color = colors[i % len(colors)]
            pts = sorted(
                (
                    (_spec_of(r).effective_sparsity, r["ratio"], r)
                    for r in mine
                    if _kind_name(_spec_of(r)) == name
                ),
                key=lambda p: p[0],
            )
            spec = _spec_of(pts[0][2])
            ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", color=color, label=_kind_name(spec))
            for _, _, r in pts:
                if r["target"] is not None:
                    ax.plot([_spec_of(r).effective_sparsity], [r["target"]], "_", color=color, markersize=14)
            if spec.kind == "nm":
                ax.plot([pts[0][0]], [pts[0][2]["limit"]], "*", color=color, markersize=10)
                continue
            grid = [i / 100 for i in range(0, 100)]
            if spec.kind == "act_bitmask":
                # the weight sparsity varies; the x axis is the combined skipped fraction
                a = spec.act_sparsity
                xs = [1 - (1 - s) * (1 - a) for s in grid]
                ys = [analytic_limit(KernelSpec("act_bitmask", s, a), n, k, DTYPES[dtype]) for s in grid]
            elif spec.kind == "act":
                xs, ys = grid, [analytic_limit(KernelSpec("act", 0.0, s), n, k, DTYPES[dtype]) for s in grid]
            else:
                xs = grid
                ys = [
                    analytic_limit(KernelSpec(spec.kind, s, block=spec.block), n, k, DTYPES[dtype])
                    for s in grid
                ]
            ax.plot(xs, ys, "--", color=color, alpha=0.6, linewidth=1)
        ax.axhline(1.0, color="gray", linewidth=0.8)
        ax.set_yscale("log")
        ax.set_ylim(0.1, 40)
        ax.set_xlim(0, 1)
        ax.set_xlabel("fraction of the weight skipped (weight and/or input sparsity)")
        ax.set_ylabel("speedup over dense F.linear (M=1)")
        ax.set_title(f"{n}x{k} {dtype}, {report['meta']['threads']} threads, {report['meta']['cpu']}")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8, title="dashed: bytes limit; -: target", title_fontsize=8)
    fig.tight_layout()
    written = save_figure(fig, path, dpi=120)  # (a path without a suffix gets matplotlib's format's)
    plt.close(fig)
    return written
