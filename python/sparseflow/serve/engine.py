"""The engine: one thread that owns the model. HTTP handlers submit work to a bounded queue and
receive events through a callback; the thread admits waiting sequences into the running batch
(prefill), then advances every active sequence by one token per step (decode at M = batch size),
and answers embedding jobs between steps, several requests in one forward pass.

Events a generation sink receives: ("text", delta), then ("done", finish_reason, usage) or
("error", status, message). An embedding sink receives ("embeddings", [[float]], tokens) or an error."""

from __future__ import annotations

import collections
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ..models import cache_keyword
from .kv_cache import BatchCache
from .loader import GENERATE, LoadedModel
from .metrics import Metrics

Sink = Callable[[tuple], None]


class QueueFull(Exception):
    """More requests are waiting than the queue limit allows (HTTP 429)."""


class EngineStopped(Exception):
    """The engine is not running (HTTP 503)."""


@dataclass
class Limits:
    max_batch: int = 8  # sequences decoding together (the M the sparse kernels see)
    queue_limit: int = 32  # requests waiting to be admitted; more get 429
    max_input_tokens: int = 1024
    max_new_tokens: int = 256
    request_timeout: float = 120.0  # seconds from arrival to the last token; then 503
    max_embedding_batch_tokens: int = 16384  # padded tokens per embedding forward pass

    def __post_init__(self):
        for name in ("max_batch", "queue_limit", "max_input_tokens", "max_new_tokens", "max_embedding_batch_tokens"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if not self.request_timeout > 0:
            raise ValueError(f"request_timeout must be positive, got {self.request_timeout}")


@dataclass
class Sampling:
    max_new_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None


@dataclass
class Sequence:
    prompt_ids: list[int]
    sampling: Sampling
    sink: Sink
    deadline: float
    generated: list[int] = field(default_factory=list)
    text_sent: str = ""
    cancelled: bool = False
    generator: torch.Generator | None = None

    def cancel(self) -> None:
        self.cancelled = True


@dataclass
class EmbeddingJob:
    inputs: list[list[int]]
    sink: Sink
    deadline: float
    cancelled: bool = False

    def cancel(self) -> None:
        self.cancelled = True


class Engine:
    def __init__(self, loaded: LoadedModel, limits: Limits, metrics: Metrics):
        self.loaded, self.limits, self.metrics = loaded, limits, metrics
        self.model, self.tokenizer = loaded.model, loaded.tokenizer
        self._cache_kw = cache_keyword(self.model) if loaded.kind == GENERATE else ""
        self._waiting: collections.deque = collections.deque()
        self._cond = threading.Condition()
        self._active: list[Sequence] = []
        self._batch = BatchCache()
        self._running = False
        self._thread: threading.Thread | None = None
        self.error: BaseException | None = None

    # ---- lifecycle ----
    def start(self) -> None:
        self._running = True
        self._thread = threading.Thread(target=self._loop, name="sparseflow-engine", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        with self._cond:
            self._running = False
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=30)
        for item in list(self._waiting) + self._active:
            item.sink(("error", 503, "the server is shutting down"))
        self._waiting.clear()
        self._active.clear()

    @property
    def alive(self) -> bool:
        return self._running and self._thread is not None and self._thread.is_alive()

    # ---- submission (any thread) ----
    def submit(self, items: list[Sequence] | list[EmbeddingJob]) -> None:
        """Queues all items or none: raises QueueFull when they would pass the queue limit."""
        with self._cond:
            if not self.alive:
                raise EngineStopped("the model engine is not running")
            if len(items) > self.limits.queue_limit:
                raise QueueFull(f"the request holds {len(items)} prompts, more than the queue takes at once "
                                f"({self.limits.queue_limit}): send fewer per request")
            if len(self._waiting) + len(items) > self.limits.queue_limit:
                raise QueueFull(f"{len(self._waiting)} requests are already waiting (limit {self.limits.queue_limit})")
            self._waiting.extend(items)
            self.metrics.queue_depth.set(len(self._waiting))
            self._cond.notify()

    # ---- the engine thread ----
    def _loop(self) -> None:
        try:
            with torch.inference_mode():
                while True:
                    with self._cond:
                        while self._running and not self._waiting and not self._active:
                            self._cond.wait()
                        if not self._running:
                            return
                        admitted = self._admit()
                        self.metrics.queue_depth.set(len(self._waiting))
                    jobs = [j for j in admitted if isinstance(j, EmbeddingJob)]
                    if jobs:
                        self._guarded(self._embed, jobs, jobs)
                    for seq in admitted:
                        if isinstance(seq, Sequence):
                            self._guarded(self._prefill, [seq], seq)
                    if self._active:
                        self._guarded(self._decode_step, self._active, drop_batch=True)
        except BaseException as e:  # report to every waiting client instead of hanging them
            self.error = e
            self._running = False
            for item in list(self._waiting) + self._active:
                item.sink(("error", 500, f"engine failed: {type(e).__name__}: {e}"))
            raise

    def _guarded(self, fn, affected: list, *args, drop_batch: bool = False) -> None:
        """Runs fn; if it raises, the requests it was serving get a 500 and the engine goes on.
        `drop_batch`: fn was a decode step, which leaves the batch's cache undefined when it fails."""
        try:
            fn(*args)
        except Exception as e:
            for item in list(affected):
                item.sink(("error", 500, f"the model failed on this request: {type(e).__name__}: {e}"))
            if drop_batch:
                self._active, self._batch = [], BatchCache()
                self.metrics.active_sequences.set(0)

    def _admit(self) -> list:
        """Waiting items that fit: every embedding job up to the token budget, sequences up to max_batch."""
        admitted, kept, tokens = [], collections.deque(), 0
        now = time.monotonic()
        free = self.limits.max_batch - len(self._active)
        while self._waiting:
            item = self._waiting.popleft()
            if item.cancelled:
                continue
            if now > item.deadline:
                item.sink(("error", 503, "the request timed out while waiting in the queue"))
                continue
            if isinstance(item, EmbeddingJob):
                size = max(map(len, item.inputs)) * len(item.inputs)
                if admitted and tokens + size > self.limits.max_embedding_batch_tokens:
                    kept.append(item)
                    continue
                tokens += size
                admitted.append(item)
            elif free > 0:
                free -= 1
                admitted.append(item)
            else:
                kept.append(item)
        self._waiting = kept
        return admitted

    def _embed(self, jobs: list[EmbeddingJob]) -> None:
        inputs = [ids for job in jobs for ids in job.inputs]
        width = max(map(len, inputs))
        ids = torch.full((len(inputs), width), self.tokenizer.pad_id, dtype=torch.long)
        mask = torch.zeros(len(inputs), width, dtype=torch.long)
        for i, row in enumerate(inputs):
            ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
            mask[i, : len(row)] = 1
        hidden = self.model(input_ids=ids, attention_mask=mask).last_hidden_state.float()
        if self.loaded.pooling == "cls":
            pooled = hidden[:, 0]
        else:
            m = mask.unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * m).sum(1) / m.sum(1).clamp_min(1)
        vectors = F.normalize(pooled, dim=-1)
        self.metrics.embedding_batch_size.observe(len(inputs))
        start = 0
        for job in jobs:
            n = len(job.inputs)
            job.sink(("embeddings", vectors[start : start + n].tolist(), sum(map(len, job.inputs))))
            start += n

    def _forward(self, ids: torch.Tensor, cache, **kwargs) -> torch.Tensor:
        out = self.model(input_ids=ids, use_cache=True, **{self._cache_kw: cache}, **kwargs)
        return out.logits[:, -1].float()

    def _prefill(self, seq: Sequence) -> None:
        from transformers import DynamicCache

        t0 = time.perf_counter()
        cache = DynamicCache()
        logits = self._forward(torch.tensor([seq.prompt_ids], dtype=torch.long), cache)
        self.metrics.prefill_seconds.observe(time.perf_counter() - t0)
        if seq.sampling.seed is not None:
            seq.generator = torch.Generator().manual_seed(seq.sampling.seed)
        self._batch.join(cache, len(seq.prompt_ids))
        self._active.append(seq)
        try:
            self._emit([seq], logits)
        except Exception:  # the caller answers it with a 500: it must not stay in the batch tokenless
            if seq in self._active:
                rows = [i for i, s in enumerate(self._active) if s is not seq]
                self._active = [self._active[i] for i in rows]
                self._batch.keep(rows)
            raise

    def _decode_step(self) -> None:
        t0 = time.perf_counter()
        batch = self._batch.batch
        last = torch.tensor([[s.generated[-1]] for s in self._active], dtype=torch.long)
        positions = torch.tensor([[len(s.prompt_ids) + len(s.generated) - 1] for s in self._active], dtype=torch.long)
        logits = self._forward(last, self._batch.cache, attention_mask=self._batch.step_mask(), position_ids=positions)
        self.metrics.decode_batch_size.observe(batch)
        self.metrics.decode_step_seconds.observe(time.perf_counter() - t0)
        self._emit(list(self._active), logits)

    def _sample(self, seq: Sequence, logits: torch.Tensor) -> int:
        s = seq.sampling
        if s.temperature == 0:
            return int(logits.argmax())
        scaled = logits.double() / s.temperature
        if not bool(torch.isfinite(scaled).all()):  # a temperature this small is greedy decoding
            return int(logits.argmax())
        probs = torch.softmax(scaled, dim=-1)
        if s.top_p < 1:
            sorted_probs, order = probs.sort(descending=True)
            outside = sorted_probs.cumsum(0) - sorted_probs > s.top_p  # keep the smallest set reaching top_p
            sorted_probs[outside] = 0
            return int(order[torch.multinomial(sorted_probs, 1, generator=seq.generator)])
        return int(torch.multinomial(probs, 1, generator=seq.generator))

    def _emit(self, seqs: list[Sequence], logits: torch.Tensor) -> None:
        """Samples one token per sequence, sends its text, and retires the finished ones."""
        now = time.monotonic()
        finished = set()
        for row, seq in enumerate(seqs):
            if seq.cancelled:
                finished.add(id(seq))
                continue
            if now > seq.deadline:
                seq.sink(("error", 503, f"the request timed out after {len(seq.generated)} tokens"))
                finished.add(id(seq))
                continue
            token = self._sample(seq, logits[row])
            seq.generated.append(token)
            self.metrics.generated_tokens.inc()
            at_eos, at_length = token in self.loaded.eos_ids, len(seq.generated) >= seq.sampling.max_new_tokens
            reason = self._send_text(seq, final=at_eos or at_length)
            if reason is None and (at_eos or at_length):
                reason = "stop" if at_eos else "length"
            if reason is not None:
                usage = {"prompt_tokens": len(seq.prompt_ids), "completion_tokens": len(seq.generated),
                         "total_tokens": len(seq.prompt_ids) + len(seq.generated)}
                seq.sink(("done", reason, usage))
                finished.add(id(seq))
        if finished:
            rows = [i for i, s in enumerate(self._active) if id(s) not in finished]
            self._active = [self._active[i] for i in rows]
            self._batch.keep(rows)
        self.metrics.active_sequences.set(len(self._active))

    def _send_text(self, seq: Sequence, final: bool) -> str | None:
        """Sends the text decoded since the last call; returns "stop" when a stop string ended it.
        Until `final`, text that may still become a stop string, or ends in an incomplete
        character, is held back."""
        text = self.tokenizer.decode([t for t in seq.generated if t not in self.loaded.eos_ids])
        sent = len(seq.text_sent)
        hits = [i for i in (text.find(s, max(0, sent - len(s))) for s in seq.sampling.stop) if i >= 0]
        if hits:
            text, final = text[: min(hits)], True
        elif not final:
            hold = max((len(s) - 1 for s in seq.sampling.stop), default=0)
            text = text[: len(text) - max(hold, int(text.endswith("\ufffd")))]
        if len(text) > sent:  # decoding only ever appends (a re-spaced prefix would not be resent)
            seq.sink(("text", text[sent:]))
            seq.text_sent = text
        return "stop" if hits else None
