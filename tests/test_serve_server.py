"""A real ``moekit serve`` process, talked to with the official ``openai`` client."""

from __future__ import annotations

import json
import signal
import subprocess
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

import moekit
from moekit.generation import generate
from moekit.testing import save_tiny_checkpoint
from serve_helpers import start_server

openai = pytest.importorskip("openai")

PROMPTS = [f"Prompt number {i}: the" for i in range(16)]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    ckpt = save_tiny_checkpoint("qwen3_moe", root / "ckpt")
    srv = start_server(ckpt, root, "--offload", "--policy", "lru+prefetch")
    proc = srv["proc"]
    yield {**srv, "ckpt": ckpt}
    # SIGTERM after the module's tests, whichever of them ran and in whatever order: a clean exit, no traceback
    # (a failure here is reported as an error at teardown)
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            code = proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            pytest.fail("the server did not stop within 120 s of SIGTERM")
        srv["log"].seek(0)
        log = srv["log"].read()
        assert code == 0 and "Traceback" not in log, log[-2000:]


@pytest.fixture(scope="module")
def reference(server):
    return moekit.load(server["ckpt"])


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server["base"] + "/v1", api_key="unused", timeout=300, max_retries=0)


def test_models_and_health(client, server):
    assert [m.id for m in client.models.list().data] == ["tiny"]
    assert httpx.get(server["base"] + "/health").json()["status"] == "ok"


def test_completion_greedy_equals_fully_loaded_model(client, reference):
    r = client.completions.create(model="tiny", prompt="The cat sat on", max_tokens=10, temperature=0)
    ref = generate(reference, "The cat sat on", max_new_tokens=10)
    assert r.choices[0].text == ref.text
    assert r.choices[0].finish_reason == ref.finish_reason
    assert r.usage.completion_tokens == len(ref.token_ids)
    assert r.usage.prompt_tokens == ref.prompt_tokens


def test_completion_streaming_and_stop(client, reference):
    full = client.completions.create(model="tiny", prompt="Once upon a time", max_tokens=12, temperature=0)
    pieces = list(client.completions.create(model="tiny", prompt="Once upon a time", max_tokens=12,
                                            temperature=0, stream=True))
    assert "".join(p.choices[0].text for p in pieces) == full.choices[0].text
    assert pieces[-1].choices[0].finish_reason == full.choices[0].finish_reason
    text = full.choices[0].text
    stop = text[len(text) // 2:][:2]
    cut = client.completions.create(model="tiny", prompt="Once upon a time", max_tokens=12, temperature=0,
                                    stop=[stop, "\n\n\n"])
    ref = generate(reference, "Once upon a time", max_new_tokens=12, stop=[stop, "\n\n\n"])
    assert cut.choices[0].text == ref.text and len(ref.text) < len(text)
    assert cut.choices[0].finish_reason == "stop"


def test_chat_and_chat_streaming(client, reference):
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."}]
    r = client.chat.completions.create(model="tiny", messages=msgs, max_tokens=10, temperature=0)
    prompt = reference.tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert r.choices[0].message.content == generate(reference, prompt, max_new_tokens=10).text
    assert r.choices[0].message.role == "assistant"
    chunks = list(client.chat.completions.create(model="tiny", messages=msgs, max_tokens=10, temperature=0,
                                                 stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == r.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason is not None


def test_sampling_with_seed_is_reproducible(client):
    kw = dict(model="tiny", prompt="A story:", max_tokens=10, temperature=0.9, top_p=0.8, seed=7)
    assert client.completions.create(**kw).choices[0].text == client.completions.create(**kw).choices[0].text


def test_steering_body_field(client, reference):
    body = {"moekit": {"disable": ["0:1", "2:3"], "boost": {"2:5": 2.0}, "top_k": 3}}
    r = client.completions.create(model="tiny", prompt="The cat sat on", max_tokens=10, temperature=0,
                                  extra_body=body)
    ctrl = moekit.RoutingControl.make(disable=[(0, 1), (2, 3)], scale={(2, 5): 2.0}, top_k=3)
    assert r.choices[0].text == generate(reference, "The cat sat on", max_new_tokens=10, control=ctrl).text


def test_sixteen_concurrent_requests_equal_sequential(client):
    def one(p: str) -> str:
        return client.completions.create(model="tiny", prompt=p, max_tokens=6, temperature=0).choices[0].text

    sequential = [one(p) for p in PROMPTS]
    with ThreadPoolExecutor(16) as pool:
        concurrent = list(pool.map(one, PROMPTS))
    assert concurrent == sequential


def test_bad_requests_get_400_and_the_server_keeps_serving(client, server):
    base = server["base"]
    r = httpx.post(base + "/v1/completions", content=b'{"prompt": "x", ', headers={"content-type": "application/json"})
    assert r.status_code == 400
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error" and err["message"] and "param" in err and "code" in err
    for body, param in (({"prompt": "x", "temperature": -1}, "temperature"), ({"prompt": "x", "max_tokens": 0},
                        "max_tokens"), ({"prompt": ""}, "prompt"), ({"messages": []}, "messages"),
                        ({"prompt": "x", "moekit": {"disable": ["7:1"]}}, "moekit"),
                        ({"prompt": "x", "moekit": {"disable": ["zz"]}}, "moekit.disable")):
        url = base + ("/v1/chat/completions" if "messages" in body else "/v1/completions")
        r = httpx.post(url, json=body)
        assert r.status_code == 400, body
        assert r.json()["error"]["param"] == param
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model="tiny", prompt="x", max_tokens=5, top_p=0)
    assert client.completions.create(model="tiny", prompt="still alive", max_tokens=3, temperature=0).choices


def test_metrics_count_this_tests_requests(client, server, reference):
    """/metrics counts exactly what happened between two reads (no reliance on what other tests did)."""
    base = server["base"]
    m0 = httpx.get(base + "/metrics", timeout=120).json()
    r = client.completions.create(model="tiny", prompt="The dog", max_tokens=4, temperature=0)
    assert httpx.post(base + "/v1/completions", json={"prompt": "x", "temperature": -1}).status_code == 400
    m = httpx.get(base + "/metrics", params={"belady": "true"}, timeout=120).json()
    assert m["requests"] - m0["requests"] == 1 and m["completed"] - m0["completed"] == 1
    assert m["errors"] - m0["errors"] == 1
    assert m["completion_tokens"] - m0["completion_tokens"] == r.usage.completion_tokens
    cache, cache0 = m["cache"], m0["cache"]
    assert m["offload"] and cache["hits"] + cache["misses"] == cache["requests"]
    # each decode step (every generated token after the first) asks for top-k distinct experts per MoE layer
    per_token = sum(v.top_k for v in reference.moe)
    assert cache["decode_requests"] - cache0["decode_requests"] == (r.usage.completion_tokens - 1) * per_token
    assert cache["requests"] - cache0["requests"] > cache["decode_requests"] - cache0["decode_requests"]
    assert cache["policy"] == "lru+prefetch" and "prefetch" in cache and "belady" in cache
    json.dumps(m)
