"""The `sparseflow` command line: info, demo, bench, inspect, convert, serve."""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading

from . import demo as demo_mod
from ._argtypes import fraction, non_negative_int, port, positive_float, positive_int
from .info import info


class CliError(Exception):
    """A user error: printed as one line, exit code 2."""


def cmd_info(args) -> int:
    data = info()
    if args.json:
        print(json.dumps(data, indent=1))
    else:
        width = max(map(len, data))
        for key, value in data.items():
            print(f"{key:<{width}}  {', '.join(value) if isinstance(value, list) else value}")
    return 0


def cmd_demo(args) -> int:
    report = demo_mod.run(out_dir=args.out, quick=args.quick, show=not args.json)
    if args.json:
        print(json.dumps(report, indent=1))
    return 0 if report["ok"] else 1


def cmd_bench(args) -> int:
    if args.what == "kernels":
        from .bench.kernels import main as bench_kernels

        return bench_kernels(args.rest, prog="sparseflow bench kernels")
    if not args.rest:
        raise CliError("bench model needs a directory saved by sparseflow")
    from .bench.model import main as bench_model

    return bench_model(args.rest, prog="sparseflow bench model")


def cmd_inspect(args) -> int:
    from .inspect_model import inspect

    rows = inspect(args.path, measure=not args.no_measure)
    if args.json:
        print(json.dumps(rows, indent=1))
        return 0
    print(f"{'tensor':<48}{'shape':>13}{'pattern':>14}{'density':>9}{'format':>20}{'MiB':>8}  sparsify would choose")
    for r in rows:
        choice = r["would_choose"] or "-"
        if "speedup" in r:
            choice += "  (" + ", ".join(f"m{m}: {s:.2f}x" for m, s in r["speedup"].items()) + ")"
        print(f"{r['name'][-48:]:<48}{'x'.join(map(str, r['shape'])):>13}{r['pattern']:>14}{r['density']:>9.3f}"
              f"{r['format']:>20}{r['bytes'] / 2**20:>8.2f}  {choice}")
    return 0


def cmd_convert(args) -> int:
    if args.calibration is not None and not os.path.isfile(args.calibration):  # (before loading the model)
        raise CliError(f"--calibration {args.calibration}: no such file")
    from .convert import convert

    report = convert(args.src, args.dst, method=args.method, sparsity=args.sparsity, pattern=args.pattern,
                     calibration=args.calibration, export=args.export, show=not args.json)
    if args.json:
        print(json.dumps(report, indent=1))
    return 0


def cmd_serve(args) -> int:
    from .serve import Limits, serve

    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    limits = Limits(max_batch=args.max_batch, queue_limit=args.queue_limit, max_input_tokens=args.max_input_tokens,
                    max_new_tokens=args.max_new_tokens, request_timeout=args.request_timeout)
    serve(args.dir, host=args.host, port=args.port, limits=limits, sparsify=args.sparsify, name=args.model_name)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sparseflow", description="Compiled-kernel sparse runtime for PyTorch.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("info", help="versions, ISA levels, threads, CUDA and Triton availability")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("demo", help="compress pruned layers, check them against dense and time them")
    p.add_argument("--out", default="sparseflow-demo", help="directory for the JSON report (default: %(default)s)")
    p.add_argument("--quick", action="store_true", help="smaller shapes")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("bench", help="kernel table (bench kernels --help) or a saved model (bench model DIR)")
    p.add_argument("what", choices=["kernels", "model"])
    p.add_argument("rest", nargs=argparse.REMAINDER, help="arguments of the benchmark (--help for its options)")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("inspect", help="per-layer pattern, density, format, bytes and what sparsify would choose")
    p.add_argument("path", help="a sparseflow model dir or weights file, a compressed-tensors dir, a safetensors file")
    p.add_argument("--no-measure", action="store_true", help="skip the timing that says what sparsify would choose")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("convert", help="prune + compress a transformers model directory")
    p.add_argument("src", help="a transformers model directory")
    p.add_argument("dst", help="output directory (written atomically: never half-written)")
    p.add_argument("--method", default="wanda", choices=["magnitude", "wanda", "sparsegpt"],
                   help="(default: %(default)s)")
    p.add_argument("--sparsity", type=fraction, help="the fraction pruned (default 0.5; an n:m pattern fixes it)")
    p.add_argument("--pattern", default="2:4",
                   help="unstructured, n:m (e.g. 2:4), block(bm,bk), neurons or heads (default: %(default)s)")
    p.add_argument("--calibration", help="wanda and sparsegpt: a text file, one calibration sentence per line "
                                         "(default: built-in)")
    p.add_argument("--export", choices=["sparseflow", "dense", "compressed-tensors"], default="sparseflow",
                   help="(default: %(default)s)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("serve", help="an OpenAI-compatible HTTP server (embeddings, completions, chat) for a model dir")
    p.add_argument("dir", help="a model saved by sparseflow, or a transformers directory (with --sparsify)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    p.add_argument("--port", type=port, default=8000)
    p.add_argument("--model-name", help="the model id clients send (default: the directory's name)")
    p.add_argument("--sparsify", help="sf.sparsify arguments for a dense model: inline JSON or a JSON file")
    p.add_argument("--threads", type=non_negative_int, help="torch and kernel threads (default or 0: torch's)")
    for flag, kind, default, what in (("--max-batch", positive_int, 8, "sequences decoded together"),
                                      ("--queue-limit", positive_int, 32, "waiting requests before 429"),
                                      ("--max-input-tokens", positive_int, 1024, "longer inputs get 413"),
                                      ("--max-new-tokens", positive_int, 256, "largest max_tokens"),
                                      ("--request-timeout", positive_float, 120.0, "seconds before 503")):
        p.add_argument(flag, type=kind, default=default, help=f"{what} (default: %(default)s)")
    p.set_defaults(func=cmd_serve)
    return parser


def _terminated(signum, _frame):
    raise SystemExit(128 + signum)  # unwinds like Ctrl-C: a half-written output is removed on the way


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    in_main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _terminated) if in_main else None
    try:
        return args.func(args)
    except KeyboardInterrupt:
        if args.debug:
            raise
        print(f"sparseflow {args.command}: interrupted", file=sys.stderr)
        return 130
    except (CliError, ValueError, TypeError, OSError, ImportError) as e:
        if args.debug:
            raise
        # One line: some libraries (transformers) append paragraphs of advice; --debug shows them all.
        lines = [line.strip() for line in str(e).splitlines() if line.strip()] or [type(e).__name__]
        more = f" (sparseflow --debug {args.command} ... shows the rest)" if len(lines) > 1 else ""
        print(f"sparseflow {args.command}: error: {lines[0]}{more}", file=sys.stderr)
        return 2
    finally:
        if in_main:
            signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)


if __name__ == "__main__":
    sys.exit(main())
