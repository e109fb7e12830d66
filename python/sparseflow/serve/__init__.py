"""`sparseflow serve`: an OpenAI-compatible HTTP server on the sparse runtime. /v1/embeddings for
encoders, /v1/completions and /v1/chat/completions (with streaming) for causal LMs, /v1/models,
/health and /metrics. Concurrent requests decode together, so the sparse kernels see M > 1."""

from __future__ import annotations

from .app import build_app
from .engine import Limits
from .loader import LoadedModel, load_for_serving

__all__ = ["Limits", "LoadedModel", "build_app", "load_for_serving", "serve"]


def serve(directory, host: str = "127.0.0.1", port: int = 8000, limits: Limits | None = None,
          sparsify: str | None = None, name: str | None = None, log_level: str = "info") -> None:
    """Loads the model in `directory` and serves it until interrupted (loopback by default)."""
    import uvicorn

    loaded = load_for_serving(directory, sparsify=sparsify, name=name)
    app = build_app(loaded, limits)
    print(f"sparseflow: serving {loaded.name!r} ({loaded.kind}, {loaded.info['sparse_layers']} sparse layers) "
          f"on http://{host}:{port}", flush=True)
    uvicorn.run(app, host=host, port=port, log_level=log_level)
