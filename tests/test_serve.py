"""The OpenAI-compatible server, started for real on a loopback port and spoken to with the
official `openai` client (and with raw HTTP for malformed requests). Models: a tiny Llama-shaped
decoder pruned 2:4 and sparsified (random weights, MiniLM's tokenizer) and MiniLM-L6 pruned to
50% unstructured."""

from __future__ import annotations

import base64
import http.client
import json
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch

import sparseflow as sf

openai = pytest.importorskip("openai")
uvicorn = pytest.importorskip("uvicorn")
pytest.importorskip("transformers")

from sparseflow.models import llama, load_minilm, minilm_path, save_for_serving  # noqa: E402
from sparseflow.serve import Limits, build_app, load_for_serving  # noqa: E402
from sparseflow.serve.kv_cache import BatchCache, kv_tensors  # noqa: E402

LLAMA, MINILM = "tiny-llama", "minilm"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A uvicorn server in a thread, on a free loopback port."""

    def __init__(self, loaded, limits: Limits | None = None, step_delay: float = 0.0):
        self.app = build_app(loaded, limits)
        self.engine = self.app.state.engine
        if step_delay:  # slows each decode step so that queue and timeout tests are deterministic
            step = self.engine._decode_step
            self.engine._decode_step = lambda: (time.sleep(step_delay), step())
        self.port = _free_port()
        self.server = uvicorn.Server(uvicorn.Config(self.app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline, "the server did not start"
            time.sleep(0.02)
        self.client = openai.OpenAI(base_url=f"http://127.0.0.1:{self.port}/v1", api_key="unused", max_retries=0)

    def raw(self, method: str, path: str, body: bytes | str | None = None, headers=None) -> tuple[int, dict | str]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        conn.request(method, path, body=body, headers=headers or {"Content-Type": "application/json"})
        resp = conn.getresponse()
        data = resp.read().decode()
        conn.close()
        try:
            return resp.status, json.loads(data)
        except json.JSONDecodeError:
            return resp.status, data

    def post(self, path: str, body: dict) -> tuple[int, dict]:
        return self.raw("POST", path, json.dumps(body))

    def metric(self, name: str) -> float:
        _, text = self.raw("GET", "/metrics")
        return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(name))

    def close(self):
        self.server.should_exit = True
        self.thread.join(timeout=30)


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    model = llama(hidden=64, intermediate=160, layers=2, heads=4, kv_heads=2, vocab=30522, dtype=torch.float32)
    sf.prune(model, method="magnitude", sparsity=0.5, pattern="2:4")
    sf.sparsify(model, format="2:4", measure=False)
    return save_for_serving(model, tmp_path_factory.mktemp("llama"))


@pytest.fixture(scope="module")
def minilm_dir(tmp_path_factory):
    model, tokenizer = load_minilm()
    sf.prune(model, method="magnitude", sparsity=0.5, pattern="unstructured")
    sf.sparsify(model, format="bitmask", measure=False)
    out = tmp_path_factory.mktemp("minilm")
    sf.save_pretrained(model, out)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def llama_server(llama_dir):
    server = Server(load_for_serving(llama_dir, name=LLAMA), Limits(max_batch=4, max_new_tokens=64,
                                                                       max_input_tokens=48))
    yield server
    server.close()


@pytest.fixture(scope="module")
def minilm_server(minilm_dir):
    server = Server(load_for_serving(minilm_dir, name=MINILM), Limits(max_input_tokens=64))
    yield server
    server.close()


def _greedy(model, tokenizer, prompt: str, n: int) -> str:
    """What transformers' own generate says, for the same model and prompt."""
    ids = torch.tensor([tokenizer(prompt)["input_ids"]])
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=n, do_sample=False, min_new_tokens=n)
    return tokenizer.decode(out[0, ids.shape[1]:].tolist(), skip_special_tokens=True)


# ---- the batched KV cache ----
def test_batch_cache_join_and_keep_pad_on_the_left():
    from transformers import DynamicCache

    def cache_of(length, value):
        c = DynamicCache()
        k = torch.full((1, 2, length, 4), float(value))
        c.update(k, k.clone(), 0)
        return c

    batch = BatchCache()
    batch.join(cache_of(3, 1), 3)
    batch.join(cache_of(5, 2), 5)
    k, _ = kv_tensors(batch.cache)[0]
    assert k.shape == (2, 2, 5, 4)
    assert batch.mask.tolist() == [[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]]
    assert torch.equal(k[0, :, :2], torch.zeros(2, 2, 4)) and torch.equal(k[0, :, 2:], torch.ones(2, 3, 4))
    batch.keep([0])  # the long row leaves: the padding columns go with it
    assert batch.mask.tolist() == [[1, 1, 1]]
    assert kv_tensors(batch.cache)[0][0].shape == (1, 2, 3, 4)
    batch.keep([])
    assert batch.batch == 0


# ---- embeddings ----
def test_embeddings_match_the_sparse_model(minilm_server, minilm_dir):
    sentences = ["Sparse kernels skip the zeros.", "The cat sat on the mat.", "A third, longer sentence here."]
    model = sf.from_pretrained(minilm_dir)
    import transformers

    expected = sf.models.embed(model, transformers.AutoTokenizer.from_pretrained(minilm_dir), sentences)
    for fmt in ("float", openai.NOT_GIVEN):  # the client's default asks for base64 and decodes it itself
        resp = minilm_server.client.embeddings.create(model=MINILM, input=sentences, encoding_format=fmt)
        got = torch.tensor([d.embedding for d in resp.data])
        assert got.shape == (3, 384)
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)
        assert resp.usage.prompt_tokens > 3
    # raw base64: little-endian float32
    status, body = minilm_server.post("/v1/embeddings", {"model": MINILM, "input": sentences[0],
                                                         "encoding_format": "base64"})
    assert status == 200
    vec = np.frombuffer(base64.b64decode(body["data"][0]["embedding"]), dtype="<f4")
    torch.testing.assert_close(torch.from_numpy(vec.copy()), expected[0], atol=1e-5, rtol=1e-4)


def test_embeddings_of_concurrent_requests_share_forward_passes(minilm_server):
    before = minilm_server.metric("sparseflow_embedding_batch_size_count")
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda i: minilm_server.client.embeddings.create(model=MINILM, input=f"sentence {i}"),
                                range(16)))
    assert all(len(r.data) == 1 for r in results)
    passes = minilm_server.metric("sparseflow_embedding_batch_size_count") - before
    assert 1 <= passes <= 16


# ---- completions ----
def test_completion_equals_transformers_generate(llama_server, llama_dir):
    model = sf.from_pretrained(llama_dir)
    import transformers

    tokenizer = transformers.AutoTokenizer.from_pretrained(llama_dir)
    resp = llama_server.client.completions.create(model=LLAMA, prompt="the quick brown fox", max_tokens=12,
                                                  temperature=0)
    assert resp.choices[0].text == _greedy(model, tokenizer, "the quick brown fox", 12)
    assert resp.choices[0].finish_reason == "length"
    assert resp.usage.completion_tokens == 12


def test_concurrent_requests_decode_as_one_batch(llama_server):
    prompts = [f"prompt number {i} says" + " more" * i for i in range(6)]
    alone = [llama_server.client.completions.create(model=LLAMA, prompt=p, max_tokens=10, temperature=0).choices[0].text
             for p in prompts]
    steps_before = llama_server.metric("sparseflow_decode_batch_size_count")
    single_before = llama_server.metric('sparseflow_decode_batch_size_bucket{le="1.0"}')
    with ThreadPoolExecutor(6) as pool:
        together = list(pool.map(lambda p: llama_server.client.completions.create(
            model=LLAMA, prompt=p, max_tokens=10, temperature=0).choices[0].text, prompts))
    assert together == alone
    steps = llama_server.metric("sparseflow_decode_batch_size_count") - steps_before
    single = llama_server.metric('sparseflow_decode_batch_size_bucket{le="1.0"}') - single_before
    assert steps - single > 0, "no decode step ran with more than one sequence"
    _, text = llama_server.raw("GET", "/metrics")
    assert 'sparseflow_decode_batch_size_bucket{le="4.0"}' in text  # max_batch bounds M


def test_a_list_of_prompts_gives_one_choice_each(llama_server):
    resp = llama_server.client.completions.create(model=LLAMA, prompt=["one", "two two", "three"], max_tokens=5,
                                                  temperature=0)
    assert [c.index for c in resp.choices] == [0, 1, 2]
    single = llama_server.client.completions.create(model=LLAMA, prompt="two two", max_tokens=5, temperature=0)
    assert resp.choices[1].text == single.choices[0].text
    assert resp.usage.completion_tokens == 15


def test_streamed_completion_equals_the_whole_one(llama_server):
    whole = llama_server.client.completions.create(model=LLAMA, prompt="stream me", max_tokens=9, temperature=0)
    chunks = list(llama_server.client.completions.create(model=LLAMA, prompt="stream me", max_tokens=9,
                                                         temperature=0, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == whole.choices[0].text
    assert chunks[-1].choices[0].finish_reason == "length"


def test_stop_string_ends_the_text_before_it(llama_server):
    whole = llama_server.client.completions.create(model=LLAMA, prompt="a stop test", max_tokens=20,
                                                   temperature=0).choices[0].text
    words = whole.split()
    stop = words[len(words) // 2]
    resp = llama_server.client.completions.create(model=LLAMA, prompt="a stop test", max_tokens=20, temperature=0,
                                                  stop=[stop])
    assert resp.choices[0].text == whole[: whole.find(stop)]
    assert resp.choices[0].finish_reason == "stop"
    streamed = list(llama_server.client.completions.create(model=LLAMA, prompt="a stop test", max_tokens=20,
                                                           temperature=0, stop=stop, stream=True))
    assert "".join(c.choices[0].text for c in streamed) == resp.choices[0].text


def test_sampling_with_a_seed_repeats(llama_server):
    def sample(seed):
        return llama_server.client.completions.create(model=LLAMA, prompt="random", max_tokens=12, temperature=1.0,
                                                      top_p=0.9, seed=seed).choices[0].text

    assert sample(7) == sample(7)
    assert len({sample(s) for s in range(4)}) > 1


# ---- chat ----
def test_streaming_chat_equals_the_whole_answer(llama_server):
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello there"}]
    whole = llama_server.client.chat.completions.create(model=LLAMA, messages=messages, max_tokens=8, temperature=0)
    assert whole.choices[0].message.role == "assistant"
    stream = llama_server.client.chat.completions.create(model=LLAMA, messages=messages, max_tokens=8, temperature=0,
                                                         stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 8 == whole.usage.completion_tokens


# ---- limits and errors ----
def _error(status_body, status, param=None):
    code, body = status_body
    assert code == status, body
    assert isinstance(body, dict) and set(body["error"]) >= {"message", "type", "param", "code"}, body
    if param is not None:
        assert body["error"]["param"] == param, body
    return body["error"]


@pytest.mark.parametrize("body, status, param", [
    (b"{not json", 400, None),
    (b"[1, 2]", 400, None),
    ('{"model": "tiny-llama"}', 400, "prompt"),
    ('{"model": "tiny-llama", "prompt": "x", "max_tokens": "5"}', 400, "max_tokens"),
    ('{"model": "tiny-llama", "prompt": "x", "max_tokens": 0}', 400, "max_tokens"),
    ('{"model": "tiny-llama", "prompt": "x", "max_tokens": 65}', 400, "max_tokens"),
    ('{"model": "tiny-llama", "prompt": "x", "temperature": "hot"}', 400, "temperature"),
    ('{"model": "tiny-llama", "prompt": "x", "n": 2}', 400, "n"),
    ('{"model": "tiny-llama", "prompt": "x", "stop": [""]}', 400, "stop"),
    ('{"model": "tiny-llama", "prompt": "x", "logprobs": 2}', 400, "logprobs"),
    ('{"model": "tiny-llama", "prompt": []}', 400, "prompt"),
    ('{"model": "tiny-llama", "prompt": [[]]}', 400, "prompt"),
    ('{"model": "tiny-llama", "prompt": [1, 99999999]}', 400, "prompt"),
    ('{"model": "gpt-4", "prompt": "x"}', 404, "model"),
    ('{"model": 3, "prompt": "x"}', 400, "model"),
    ('{"model": "tiny-llama", "prompt": "x", "seed": 1180591620717411303424}', 400, "seed"),
])
def test_bad_completion_requests_are_4xx(llama_server, body, status, param):
    _error(llama_server.raw("POST", "/v1/completions", body), status, param)


def test_other_bad_requests(llama_server, minilm_server):
    _error(llama_server.post("/v1/completions", {"model": LLAMA, "prompt": "word " * 60}), 413)
    _error(llama_server.post("/v1/chat/completions", {"model": LLAMA, "messages": []}), 400, "messages")
    _error(llama_server.post("/v1/chat/completions", {"model": LLAMA, "messages": [{"role": "wizard",
                                                                                     "content": "x"}]}), 400)
    _error(llama_server.post("/v1/embeddings", {"model": LLAMA, "input": "x"}), 400, "model")
    _error(minilm_server.post("/v1/completions", {"model": MINILM, "prompt": "x"}), 400, "model")
    _error(minilm_server.post("/v1/embeddings", {"model": MINILM, "input": "x", "dimensions": 8}), 400)
    _error(minilm_server.post("/v1/embeddings", {"model": MINILM, "input": ["ok", 5]}), 400, "input")
    _error(llama_server.raw("GET", "/v1/nothing-here"), 404)
    _error(llama_server.raw("GET", "/v1/completions"), 405)
    _error(llama_server.raw("POST", "/v1/completions", b"x" * (5 << 20)), 413)
    _error(llama_server.raw("POST", "/v1/completions", b"[" * 100_000 + b"]" * 100_000), 400)  # too deep to parse
    lone = '"ok \\ud800"'  # JSON for a string with an unpaired surrogate: no tokenizer takes it
    for server, path, body in ((llama_server, "/v1/completions", f'{{"model": "{LLAMA}", "prompt": {lone}}}'),
                               (llama_server, "/v1/chat/completions",
                                f'{{"model": "{LLAMA}", "messages": [{{"role": "user", "content": {lone}}}]}}'),
                               (minilm_server, "/v1/embeddings", f'{{"model": "{MINILM}", "input": ["ok", {lone}]}}')):
        assert "not valid Unicode" in _error(server.raw("POST", path, body), 400)["message"]
    with pytest.raises(openai.NotFoundError):
        llama_server.client.completions.create(model="nope", prompt="x")
    # the server is still healthy after all of that
    assert llama_server.raw("GET", "/health") == (200, {"status": "ok", "model": LLAMA, "kind": "generate"})


def test_a_tiny_temperature_is_greedy_and_spares_the_other_requests(llama_dir):
    """temperature 1e-45 overflowed the scaled logits: its sampling failed after the sequence had
    joined the batch, and the next decode step failed every request in it."""
    server = Server(load_for_serving(llama_dir, name=LLAMA), Limits(max_batch=4), step_delay=0.05)
    try:
        with ThreadPoolExecutor(2) as pool:
            victim = pool.submit(server.post, "/v1/completions", {"model": LLAMA, "prompt": "hello there",
                                                                  "max_tokens": 30, "temperature": 0})
            time.sleep(0.3)
            ask = {"model": LLAMA, "prompt": "x", "max_tokens": 4}
            tiny = server.post("/v1/completions", {**ask, "temperature": 1e-45})
            greedy = server.post("/v1/completions", {**ask, "temperature": 0})
            assert victim.result()[0] == 200
        assert tiny[0] == 200 and tiny[1]["choices"][0]["text"] == greedy[1]["choices"][0]["text"]
    finally:
        server.close()


def test_embedding_requests_over_the_batch_budget_get_413(minilm_dir):
    server = Server(load_for_serving(minilm_dir, name=MINILM), Limits(max_embedding_batch_tokens=64))
    try:
        error = _error(server.post("/v1/embeddings", {"model": MINILM, "input": ["word " * 20] * 8}), 413, "input")
        assert "limit is 64" in error["message"]
        assert server.post("/v1/embeddings", {"model": MINILM, "input": ["word"] * 8})[0] == 200
    finally:
        server.close()


def test_a_request_with_more_prompts_than_the_queue_says_so(llama_dir):
    server = Server(load_for_serving(llama_dir, name=LLAMA), Limits(queue_limit=2))
    try:
        error = _error(server.post("/v1/completions", {"model": LLAMA, "prompt": ["a", "b", "c"], "max_tokens": 2}),
                       429)
        assert "holds 3 prompts" in error["message"]
    finally:
        server.close()


def test_queue_limit_gives_429_and_the_rest_succeed(llama_dir):
    server = Server(load_for_serving(llama_dir, name=LLAMA), Limits(max_batch=1, queue_limit=1), step_delay=0.02)
    try:
        def ask(_):
            return server.post("/v1/completions", {"model": LLAMA, "prompt": "queue", "max_tokens": 20})

        with ThreadPoolExecutor(6) as pool:
            results = list(pool.map(ask, range(6)))
        statuses = sorted(code for code, _ in results)
        assert 429 in statuses and 200 in statuses, statuses
        assert set(statuses) <= {200, 429}
        busy = next(body for code, body in results if code == 429)
        assert busy["error"]["type"] == "rate_limit_exceeded"
    finally:
        server.close()


def test_request_timeout_gives_503(llama_dir):
    server = Server(load_for_serving(llama_dir, name=LLAMA), Limits(request_timeout=0.3), step_delay=0.05)
    try:
        err = _error(server.post("/v1/completions", {"model": LLAMA, "prompt": "slow", "max_tokens": 60}), 503)
        assert "timed out" in err["message"]
        stream = server.client.completions.create(model=LLAMA, prompt="slow", max_tokens=60, stream=True)
        with pytest.raises(openai.APIError, match="timed out"):  # an error event ends the stream
            list(stream)
        status, _ = server.raw("GET", "/health")
        assert status == 200
    finally:
        server.close()


def test_a_client_that_hangs_up_frees_its_batch_slot(llama_dir):
    server = Server(load_for_serving(llama_dir, name=LLAMA), step_delay=0.05)
    try:
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
        conn.request("POST", "/v1/completions", json.dumps({"model": LLAMA, "prompt": "bye", "max_tokens": 60,
                                                            "stream": True}), {"Content-Type": "application/json"})
        resp = conn.getresponse()
        assert resp.status == 200 and resp.read1().startswith(b"data: ")
        assert server.metric("sparseflow_active_sequences") == 1
        conn.sock.shutdown(socket.SHUT_RDWR)
        conn.close()
        deadline = time.monotonic() + 2.0  # well before the 60 tokens x 50 ms it would take to finish
        while server.metric("sparseflow_active_sequences") and time.monotonic() < deadline:
            time.sleep(0.05)
        assert server.metric("sparseflow_active_sequences") == 0
        assert server.metric("sparseflow_generated_tokens_total") < 40
    finally:
        server.close()


def test_a_model_failure_answers_500_and_the_server_goes_on(llama_dir):
    server = Server(load_for_serving(llama_dir, name=LLAMA))
    prefill = server.engine._prefill

    def failing_prefill(seq):
        if seq.prompt_ids[-1] == 7:
            raise RuntimeError("injected failure")
        prefill(seq)

    server.engine._prefill = failing_prefill
    try:
        err = _error(server.post("/v1/completions", {"model": LLAMA, "prompt": [5, 6, 7], "max_tokens": 3}), 500)
        assert "injected failure" in err["message"]
        code, body = server.post("/v1/completions", {"model": LLAMA, "prompt": [5, 6, 8], "max_tokens": 3})
        assert code == 200 and body["usage"]["completion_tokens"] == 3
        assert server.raw("GET", "/health")[0] == 200
    finally:
        server.close()


def test_an_unexpected_error_answers_500_and_is_counted(llama_dir):
    """An exception no handler expects answers 500 from the outermost error handler, outside the
    metrics middleware, which still counts it."""
    loaded = load_for_serving(llama_dir, name=LLAMA)
    encode = loaded.tokenizer.encode
    loaded.tokenizer.encode = lambda text: encode(text) if text != "boom" else 1 / 0
    server = Server(loaded)
    try:
        assert "ZeroDivisionError" in _error(server.post("/v1/completions", {"model": LLAMA, "prompt": "boom"}),
                                             500)["message"]
        assert server.metric('sparseflow_requests_total{endpoint="/v1/completions",status="500"}') == 1
        assert server.raw("GET", "/health")[0] == 200
    finally:
        server.close()


def test_an_embedding_input_longer_than_the_positions_names_the_input(minilm_dir):
    server = Server(load_for_serving(minilm_dir, name=MINILM), Limits(max_input_tokens=1000))
    try:
        err = _error(server.post("/v1/embeddings", {"model": MINILM, "input": [5] * 600}), 400, "input")
        assert err["message"] == "600 input tokens exceed the model's 512 positions"
    finally:
        server.close()


def test_metrics_and_models(llama_server):
    llama_server.client.completions.create(model=LLAMA, prompt="count me", max_tokens=3)
    _, text = llama_server.raw("GET", "/metrics")
    for name in ("sparseflow_requests_total", "sparseflow_generated_tokens_total", "sparseflow_queue_depth",
                 "sparseflow_decode_step_seconds_bucket", 'sparseflow_model_info{model="tiny-llama"}'):
        assert name in text
    assert llama_server.metric('sparseflow_requests_total{endpoint="/v1/completions",status="200"}') >= 1
    assert [m.id for m in llama_server.client.models.list()] == [LLAMA]


def test_a_dense_directory_with_a_sparsify_config_serves_the_same_text(llama_server, tmp_path):
    """The same pruned weights saved dense (zeros), sparsified at start-up from a JSON config."""
    model = llama(hidden=64, intermediate=160, layers=2, heads=4, kv_heads=2, vocab=30522, dtype=torch.float32)
    sf.prune(model, method="magnitude", sparsity=0.5, pattern="2:4")
    save_for_serving(model, tmp_path)
    config = tmp_path / "sparsify.json"
    config.write_text(json.dumps({"format": "2:4", "measure": False}))
    loaded = load_for_serving(tmp_path, sparsify=str(config), name=LLAMA)
    assert loaded.info["sparse_layers"] == 14  # 2 layers x (q, k, v, o, gate, up, down); lm_head stays dense
    server = Server(loaded)
    try:
        ask = {"model": LLAMA, "prompt": "same text", "max_tokens": 10, "temperature": 0}
        assert server.post("/v1/completions", ask)[1]["choices"][0]["text"] == \
            llama_server.post("/v1/completions", ask)[1]["choices"][0]["text"]
    finally:
        server.close()
    copies = load_for_serving(tmp_path, sparsify='{"format": "2:4", "measure": false, "prefill": "dense"}')
    layers = [m for m in copies.model.modules() if isinstance(m, sf.SparseLinear)]
    assert len(layers) == 14 and all(m.dense_copy is not None and m.dense_above == 128 for m in layers)
    acts = load_for_serving(tmp_path, sparsify='{"activation_sparsity": 0.5, "measure": false}')  # built-in text
    assert acts.info["sparse_layers"] == 14  # unmeasured: kept (measured, these tiny layers lose to dense)
    with pytest.raises(ValueError, match="JSON"):
        load_for_serving(tmp_path, sparsify="{not json")


# ---- the command line and the export path ----
def test_serve_cli_binds_loopback_and_answers(llama_dir):
    from sparseflow.cli import build_parser

    args = build_parser().parse_args(["serve", str(llama_dir)])
    assert args.host == "127.0.0.1"
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "sparseflow.cli", "serve", str(llama_dir), "--port", str(port),
                             "--model-name", LLAMA], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, proc.stdout.read()
            try:
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
                conn.request("GET", "/health")
                if conn.getresponse().status == 200:
                    break
            except OSError:
                pass
            assert time.monotonic() < deadline, "sparseflow serve did not come up"
            time.sleep(0.3)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0)
        assert client.completions.create(model=LLAMA, prompt="hi", max_tokens=4).usage.completion_tokens == 4
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_serve_cli_errors_exit_2(tmp_path):
    from sparseflow.cli import main

    assert main(["serve", str(tmp_path / "missing")]) == 2
    assert main(["serve", str(minilm_path()), "--sparsify", "{not json"]) == 2


def test_dense_export_serves_in_transformers_unchanged(llama_server, llama_dir, tmp_path):
    """The path to other engines: dense-with-zeros safetensors that transformers (and vLLM) load
    as they are; their greedy text equals ours."""
    import transformers

    sf.export_dense(sf.from_pretrained(llama_dir), tmp_path)
    dense = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(llama_dir)
    served = llama_server.client.completions.create(model=LLAMA, prompt="export check", max_tokens=10, temperature=0)
    assert served.choices[0].text == _greedy(dense, tokenizer, "export check", 10)
