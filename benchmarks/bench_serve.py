"""Load test of `sparseflow serve`: dense against sparse, same Llama-shaped random-weight model.

    python benchmarks/bench_serve.py [--clients 8] [--seconds 20] [--max-tokens 32] [--json PATH]

For each variant (dense, 2:4, 50% unstructured) the model is saved with MiniLM's tokenizer, a
`sparseflow serve` process is started on a loopback port, and N clients stream completions for T
seconds (bounded: each client has one request in flight). Reported: requests/s, generated
tokens/s, p50/p99 request latency, p50 time to first token, errors, and the mean decode batch
size the server saw (from /metrics). Variants take turns for --rounds rounds so drift hits all."""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import openai
import torch

import sparseflow as sf
from sparseflow.io._atomic import write_result
from sparseflow.models import llama, save_for_serving

PROMPT_WORDS = ("sparse kernels skip zeros so the model reads fewer bytes and decodes faster on the same "
                "machine while answers stay the same as dense").split()


def build_variants(args, root: Path) -> dict[str, Path]:
    base = llama(hidden=args.hidden, intermediate=args.intermediate, layers=args.layers, vocab=30522)
    dirs = {"dense": save_for_serving(base, root / "dense")}
    for name, pattern, fmt in (("2:4", "2:4", "2:4"), ("unstructured 50%", "unstructured", "bitmask")):
        model = llama(hidden=args.hidden, intermediate=args.intermediate, layers=args.layers, vocab=30522)
        sf.prune(model, method="magnitude", sparsity=0.5, pattern=pattern, progress=False)
        sf.sparsify(model, format=fmt, m_range=(1, args.clients, 64), prefill=args.prefill_path)
        dirs[name] = save_for_serving(model, root / fmt)
    return dirs


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(directory: Path, args) -> tuple[subprocess.Popen, int]:
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "sparseflow.cli", "serve", str(directory), "--port", str(port),
                             "--model-name", "bench", "--max-batch", str(args.clients),
                             "--queue-limit", str(4 * args.clients)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"sparseflow serve {directory} exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                if r.status == 200:
                    return proc, port
        except OSError:
            time.sleep(0.5)
    proc.kill()
    raise RuntimeError("the server did not come up in 300 s")


def decode_batch_mean(port: int) -> tuple[float, float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics").read().decode()
    values = {line.split()[0]: float(line.split()[-1]) for line in text.splitlines() if line and line[0] != "#"}
    return values.get("sparseflow_decode_batch_size_sum", 0.0), values.get("sparseflow_decode_batch_size_count", 0.0)


async def load(port: int, args, seconds: float) -> dict:
    client = openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0,
                                timeout=120)
    latencies, first_tokens, tokens, errors = [], [], 0, 0
    stop_at = time.monotonic() + seconds

    async def one_client(i: int):
        nonlocal tokens, errors
        n = 0
        while time.monotonic() < stop_at:
            words = [PROMPT_WORDS[(i * 7 + n * 3 + k) % len(PROMPT_WORDS)] for k in range(args.prompt_words)]
            t0 = time.perf_counter()
            first = None
            try:
                stream = await client.completions.create(model="bench", prompt=" ".join(words),
                                                         max_tokens=args.max_tokens, temperature=0, stream=True,
                                                         stream_options={"include_usage": True})
                async for chunk in stream:
                    if first is None and chunk.choices and chunk.choices[0].text:
                        first = time.perf_counter() - t0
                    if chunk.usage is not None:
                        tokens += chunk.usage.completion_tokens
            except openai.APIError:
                errors += 1
                continue
            latencies.append(time.perf_counter() - t0)
            if first is not None:
                first_tokens.append(first)
            n += 1

    t0 = time.perf_counter()
    await asyncio.gather(*(one_client(i) for i in range(args.clients)))
    elapsed = time.perf_counter() - t0
    await client.close()
    return {"requests": len(latencies), "tokens": tokens, "errors": errors, "seconds": elapsed,
            "latencies": latencies, "first_tokens": first_tokens}


def quantile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    return statistics.quantiles(values, n=100, method="inclusive")[int(q * 100) - 1] if len(values) > 1 else values[0]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--intermediate", type=int, default=8192)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--seconds", type=float, default=20.0, help="per variant and round")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--prompt-words", type=int, default=24)
    p.add_argument("--prefill-path", choices=["batched", "auto", "dense"], default="batched",
                   help="sf.sparsify(prefill=...): what runs above a layer's crossover (default: %(default)s)")
    p.add_argument("--json", default="benchmarks/results/serve.json")
    args = p.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        print("building and saving the variants...", flush=True)
        dirs = build_variants(args, Path(tmp))
        servers = {name: start_server(d, args) for name, d in dirs.items()}
        try:
            for _, port in servers.values():  # warm-up: first calls pay one-time costs
                asyncio.run(load(port, argparse.Namespace(**{**vars(args), "clients": 2}), 2.0))
            before = {name: decode_batch_mean(port) for name, (_, port) in servers.items()}
            runs = {name: [] for name in servers}
            for _ in range(args.rounds):
                for name, (_, port) in servers.items():
                    runs[name].append(asyncio.run(load(port, args, args.seconds)))
            after = {name: decode_batch_mean(port) for name, (_, port) in servers.items()}
        finally:
            for proc, _ in servers.values():
                proc.terminate()
                proc.wait(timeout=30)

    rows = []
    for name, rs in runs.items():
        seconds = sum(r["seconds"] for r in rs)
        lat = [x for r in rs for x in r["latencies"]]
        ttft = [x for r in rs for x in r["first_tokens"]]
        (s0, c0), (s1, c1) = before[name], after[name]
        rows.append({"variant": name, "requests_per_s": sum(r["requests"] for r in rs) / seconds,
                     "tokens_per_s": sum(r["tokens"] for r in rs) / seconds,
                     "p50_latency_s": quantile(lat, 0.5), "p99_latency_s": quantile(lat, 0.99),
                     "p50_first_token_s": quantile(ttft, 0.5), "errors": sum(r["errors"] for r in rs),
                     "requests": len(lat), "mean_decode_batch": (s1 - s0) / max(c1 - c0, 1)})
    dense = rows[0]["tokens_per_s"]
    for r in rows:
        r["tokens_per_s_vs_dense"] = r["tokens_per_s"] / dense if dense else float("nan")

    print(f"\n{args.clients} clients x {args.seconds:.0f} s x {args.rounds} rounds, max_tokens {args.max_tokens}, "
          f"Llama {args.hidden}/{args.intermediate}/{args.layers} layers bf16, {torch.get_num_threads()} threads\n")
    print("| variant | req/s | tokens/s | vs dense | p50 latency s | p99 latency s | p50 first token s | "
          "mean decode M | errors |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['variant']} | {r['requests_per_s']:.2f} | {r['tokens_per_s']:.1f} | "
              f"{r['tokens_per_s_vs_dense']:.2f}x | {r['p50_latency_s']:.2f} | {r['p99_latency_s']:.2f} | "
              f"{r['p50_first_token_s']:.2f} | {r['mean_decode_batch']:.1f} | {r['errors']} |")
    report = {"date": datetime.date.today().isoformat(), "cpu": platform.processor() or platform.machine(),
              "threads": torch.get_num_threads(), "torch": torch.__version__, "args": vars(args), "rows": rows}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    write_result(args.json, json.dumps(report, indent=1))
    print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
