"""``moekit serve`` under hostile input: limits, malformed values, keep-alive, SIGTERM, ports, a fuzz test.

A real server process (a tiny random qwen3_moe with a 48-token context, ``--max-body-bytes 200000
--max-prompt-tokens 40``) is talked to over one HTTP/1.1 connection (``http.client``), so a dropped
keep-alive connection fails the test, and with the official ``openai`` client.
"""

from __future__ import annotations

import http.client
import json
import signal
import socket
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from moekit.cli import main
from moekit.data import load_tokenizer
from moekit.testing import save_tiny_checkpoint
from serve_helpers import start_server

openai = pytest.importorskip("openai")

CONTEXT, PROMPT_CAP, BODY_CAP = 48, 40, 200_000


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve-hard")
    ckpt = save_tiny_checkpoint("qwen3_moe", root / "ckpt", max_position_embeddings=CONTEXT)
    srv = start_server(ckpt, root, "--max-body-bytes", str(BODY_CAP), "--max-prompt-tokens", str(PROMPT_CAP))
    yield srv
    srv["proc"].kill()
    srv["proc"].wait()


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer()


class Conn:
    """One HTTP/1.1 keep-alive connection; every request must reuse the same TCP socket."""

    def __init__(self, port: int) -> None:
        self.c = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
        self.c.connect()
        self.local = self.c.sock.getsockname()

    def post(self, path: str, body, content_type: str | None = "application/json", chunked: bool = False):
        data = body if isinstance(body, (bytes, list)) else json.dumps(body).encode()
        headers = {"Content-Type": content_type} if content_type else {}
        self.c.request("POST", path, body=iter(data) if chunked else data, headers=headers,
                       encode_chunked=chunked)
        r = self.c.getresponse()
        raw = r.read()
        assert r.getheader("connection") != "close"
        assert self.c.sock is not None and self.c.sock.getsockname() == self.local, "the connection was dropped"
        return r.status, raw

    def close(self) -> None:
        self.c.close()


def assert_openai_error(status: int, raw: bytes, expect: int | None = None, param: str | None = "?") -> dict:
    assert 400 <= status < 500, (status, raw[:300])
    if expect is not None:
        assert status == expect, raw[:300]
    err = json.loads(raw)["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert isinstance(err["message"], str) and err["message"] and isinstance(err["type"], str)
    assert err["param"] is None or isinstance(err["param"], str)
    assert err["code"] is None or isinstance(err["code"], str)
    if param != "?":
        assert err["param"] == param, err
    return err


VALID = {"prompt": "The cat", "max_tokens": 2, "temperature": 0}


def assert_still_serving(conn: Conn) -> None:
    status, raw = conn.post("/v1/completions", VALID)
    assert status == 200, raw
    assert json.loads(raw)["usage"]["completion_tokens"] == 2


# ----- limits ------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_body_over_the_cap_is_413_before_it_is_read_and_the_connection_lives(server):
    conn = Conn(server["port"])
    huge = b'{"prompt": "' + b"a" * 20_000_000 + b'"}'  # 20 MB, declared by Content-Length
    err = assert_openai_error(*conn.post("/v1/completions", huge), expect=413)
    assert err["code"] == "request_too_large" and str(BODY_CAP) in err["message"]
    assert_still_serving(conn)
    # without Content-Length (chunked): counted while reading
    chunks = [b'{"prompt": "'] + [b"b" * 65536] * 8 + [b'"}']
    assert_openai_error(*conn.post("/v1/chat/completions", chunks, chunked=True), expect=413)
    assert_still_serving(conn)
    # just under the cap is read (and then refused for its prompt length, not its size)
    under = {"prompt": "c" * (BODY_CAP - 100)}
    err = assert_openai_error(*conn.post("/v1/completions", under), expect=400, param="prompt")
    assert err["code"] == "context_length_exceeded"
    conn.close()


@pytest.mark.slow
def test_long_prompt_refused_by_characters_before_tokenizing(server):
    conn = Conn(server["port"])
    err = assert_openai_error(*conn.post("/v1/completions", {"prompt": "word " * 20_000}), expect=400,
                              param="prompt")
    assert err["message"] == (f"the prompt has 100000 characters, more than this server accepts ({16 * PROMPT_CAP}: "
                              f"16 per token of the {PROMPT_CAP}-token prompt limit)")
    msgs = [{"role": "user", "content": "x" * 400}] * 2
    assert_openai_error(*conn.post("/v1/chat/completions", {"messages": msgs}), expect=400, param="messages")
    assert_still_serving(conn)
    conn.close()


@pytest.mark.slow
def test_prompt_tokens_and_max_tokens_checked_against_cap_and_context(server, tok):
    client = openai.OpenAI(base_url=server["base"] + "/v1", api_key="unused", timeout=120, max_retries=0)
    words = " ".join(f"w{i}" for i in range(200))
    ids = tok(words, add_special_tokens=False)["input_ids"]
    # a prompt of exactly PROMPT_CAP + 1 tokens (ids), then one of PROMPT_CAP - 10 tokens as text
    with pytest.raises(openai.BadRequestError) as exc:
        client.completions.create(model="tiny", prompt=ids[:PROMPT_CAP + 1], max_tokens=1)
    assert exc.value.code == "context_length_exceeded"
    assert f"the prompt has {PROMPT_CAP + 1} tokens, more than this server's limit of {PROMPT_CAP}" in str(exc.value)
    text = tok.decode(ids[:PROMPT_CAP - 10])
    n = len(tok(text, add_special_tokens=False)["input_ids"])
    assert n <= PROMPT_CAP
    with pytest.raises(openai.BadRequestError) as exc:
        client.completions.create(model="tiny", prompt=text, max_tokens=CONTEXT - n + 1, temperature=0)
    assert (f"the prompt has {n} tokens and max_tokens is {CONTEXT - n + 1}: {CONTEXT + 1} tokens exceed the "
            f"model's context of {CONTEXT}") in str(exc.value)
    assert exc.value.body["param"] == "max_tokens"
    # exactly the context: accepted, and generated to the end
    r = client.completions.create(model="tiny", prompt=text, max_tokens=CONTEXT - n, temperature=0)
    assert r.usage.prompt_tokens == n and r.usage.total_tokens <= CONTEXT
    # no max_tokens: the default (16) is cut to what is left of the context
    r = client.completions.create(model="tiny", prompt=ids[:PROMPT_CAP], temperature=0)
    assert r.usage.prompt_tokens == PROMPT_CAP
    assert r.usage.completion_tokens <= CONTEXT - PROMPT_CAP
    m = httpx.get(server["base"] + "/metrics").json()["limits"]
    assert m == {"max_body_bytes": BODY_CAP, "max_prompt_tokens": PROMPT_CAP, "context": CONTEXT}


# ----- malformed values --------------------------------------------------------------------------------

BAD = [  # (path, raw body or object, content type, expected status, expected param or "?")
    ("c", b'{"prompt": "x", "temperature": NaN}', "application/json", 400, "temperature"),
    ("c", b'{"prompt": "x", "temperature": Infinity}', "application/json", 400, "temperature"),
    ("c", b'{"prompt": "x", "temperature": -Infinity}', "application/json", 400, "temperature"),
    ("c", b'{"prompt": "x", "temperature": 1e400}', "application/json", 400, "temperature"),
    ("c", {"prompt": "x", "temperature": -0.5}, None, 400, "temperature"),
    ("c", {"prompt": "x", "temperature": 10**400}, None, 400, "temperature"),
    ("c", {"prompt": "x", "temperature": "0.7"}, None, 400, "temperature"),
    ("c", {"prompt": "x", "top_p": 0}, None, 400, "top_p"),
    ("c", {"prompt": "x", "top_p": 1.5}, None, 400, "top_p"),
    ("c", {"prompt": "x", "top_p": -1}, None, 400, "top_p"),
    ("c", b'{"prompt": "x", "top_p": NaN}', "application/json", 400, "top_p"),
    ("c", {"prompt": "x", "seed": 2**64}, None, 400, "seed"),
    ("c", {"prompt": "x", "seed": -1}, None, 400, "seed"),
    ("c", {"prompt": "x", "seed": 1.5}, None, 400, "seed"),
    ("c", {"prompt": "x", "seed": "7"}, None, 400, "seed"),
    ("c", {"prompt": "x", "max_tokens": 0}, None, 400, "max_tokens"),
    ("c", {"prompt": "x", "max_tokens": -5}, None, 400, "max_tokens"),
    ("c", {"prompt": "x", "max_tokens": 10**30}, None, 400, "max_tokens"),
    ("c", {"prompt": "x", "max_tokens": 10**400}, None, 400, "max_tokens"),
    ("c", {"prompt": "x", "max_tokens": 2.5}, None, 400, "max_tokens"),
    ("c", {"prompt": "x", "max_tokens": "3"}, None, 400, "max_tokens"),
    ("c", {"prompt": "x", "max_tokens": {"a": 1}}, None, 400, "max_tokens"),
    ("c", {"prompt": "x", "n": 2}, None, 400, "n"),
    ("c", {"prompt": "x", "stream": "yes"}, None, 400, "stream"),
    ("c", {"prompt": "x", "stop": 5}, None, 400, "stop"),
    ("c", {"prompt": "x", "stop": ["a", {"b": 1}]}, None, 400, "stop"),
    ("c", {"prompt": {"text": "x"}}, None, 400, "prompt"),
    ("c", {"prompt": 12}, None, 400, "prompt"),
    ("c", {"prompt": [1, "a"]}, None, 400, "prompt"),
    ("c", {"prompt": [1, 10**400]}, None, 400, "prompt"),
    ("c", {"prompt": [-1]}, None, 400, "prompt"),
    ("c", {"prompt": [True]}, None, 400, "prompt"),
    ("c", {}, None, 400, "prompt"),
    ("c", b'{"prompt": "\\ud800"}', "application/json", 400, None),
    ("c", b'{"prompt": "ok", "stop": ["\\udfff"]}', "application/json", 400, None),
    ("x", b'{"messages": [{"role": "user", "content": "\\ud800"}]}', "application/json", 400, None),
    ("x", b'{"messages": [{"role": "\\ud800", "content": "hi"}]}', "application/json", 400, None),
    ("c", b"[" * 100_000 + b"]" * 100_000, "application/json", 400, None),
    ("c", b'{"prompt": "x", "moekit": ' + b"[" * 50 + b"]" * 50 + b"}", "application/json", 400, None),
    ("c", b"not json at all", "application/json", 400, None),
    ("c", b'{"prompt": "x",', "application/json", 400, None),
    ("c", b"\xff\xfe\x00garbage", "application/json", 400, None),
    ("c", b"", "application/json", 400, None),
    ("c", b'"just a string"', "application/json", 400, None),
    ("c", b'[{"prompt": "x"}]', "application/json", 400, None),
    ("c", json.dumps(VALID).encode(), "text/plain", 415, None),
    ("c", b"prompt=x&max_tokens=2", "application/x-www-form-urlencoded", 415, None),
    ("c", json.dumps(VALID).encode(), "multipart/form-data; boundary=x", 415, None),
    ("x", {"messages": "hi"}, None, 400, "messages"),
    ("x", {"messages": [{"role": 1, "content": "hi"}]}, None, 400, "messages"),
    ("x", {"messages": [{"role": "user", "content": 5}]}, None, 400, "messages"),
    ("x", {"messages": [{"role": "user", "content": [{"type": "text", "text": 5}]}]}, None, 400, "messages"),
    ("x", {"messages": [{"role": "user", "content": ["a"]}]}, None, 400, "messages"),
    ("x", {"messages": [["user", "hi"]]}, None, 400, "messages"),
    ("x", {"messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": -1}, None, 400,
     "max_completion_tokens"),
    ("c", b'{"prompt": "x", "moekit": {"boost": {"1:2": NaN}}}', "application/json", 400, "moekit.boost"),
    ("c", b'{"prompt": "x", "moekit": {"boost": {"1:2": Infinity}}}', "application/json", 400, "moekit.boost"),
    ("c", {"prompt": "x", "moekit": {"boost": {"1:2": 1e300}}}, None, 400, "moekit.boost"),
    ("c", {"prompt": "x", "moekit": {"boost": {"1:2": "2"}}}, None, 400, "moekit.boost"),
    ("c", {"prompt": "x", "moekit": {"bias": {"1:2": None}}}, None, 400, "moekit.bias"),
    ("c", b'{"prompt": "x", "moekit": {"bias": {"1:2": -Infinity}}}', "application/json", 400, "moekit.bias"),
    ("c", {"prompt": "x", "moekit": {"disable": ["1:9999"]}}, None, 400, "moekit"),
    ("c", {"prompt": "x", "moekit": {"disable": ["-1:2"]}}, None, 400, "moekit.disable"),
    ("c", {"prompt": "x", "moekit": {"disable": ["1:-2"]}}, None, 400, "moekit.disable"),
    ("c", {"prompt": "x", "moekit": {"disable": [[1, 2.5]]}}, None, 400, "moekit.disable"),
    ("c", {"prompt": "x", "moekit": {"disable": ["1:2:3"]}}, None, 400, "moekit.disable"),
    ("c", {"prompt": "x", "moekit": {"disable": "1:2"}}, None, 400, "moekit.disable"),
    ("c", {"prompt": "x", "moekit": {"force": [[10**400, 1]]}}, None, 400, "moekit.force"),
    ("c", {"prompt": "x", "moekit": {"top_k": 0}}, None, 400, "moekit.top_k"),
    ("c", {"prompt": "x", "moekit": {"top_k": 10**9}}, None, 400, "moekit"),
    ("c", {"prompt": "x", "moekit": {"top_p": 2}}, None, 400, "moekit.top_p"),
    ("c", {"prompt": "x", "moekit": {"nope": 1}}, None, 400, "moekit"),
    ("c", {"prompt": "x", "moekit": [1]}, None, 400, "moekit"),
]


@pytest.mark.slow
def test_every_malformed_value_is_a_4xx_and_the_connection_lives(server):
    conn = Conn(server["port"])
    for path, body, ctype, status, param in BAD:
        url = "/v1/chat/completions" if path == "x" else "/v1/completions"
        assert_openai_error(*conn.post(url, body, content_type=ctype or "application/json"), expect=status,
                            param=param)
    assert_still_serving(conn)
    # a body without Content-Type is taken as JSON (curl --data-binary without -H)
    status, raw = conn.post("/v1/completions", VALID, content_type=None)
    assert status == 200, raw
    # tiny temperatures sample greedily instead of overflowing
    status, raw = conn.post("/v1/completions", {**VALID, "temperature": 1e-300, "seed": 2**63 - 1})
    greedy = conn.post("/v1/completions", VALID)[1]
    assert status == 200 and json.loads(raw)["choices"][0]["text"] == json.loads(greedy)["choices"][0]["text"]
    conn.close()


@pytest.mark.slow
def test_openai_client_gets_bad_request_errors(server):
    client = openai.OpenAI(base_url=server["base"] + "/v1", api_key="unused", timeout=120, max_retries=0)
    # (the client itself refuses to send NaN, inf or lone surrogates: the test above sends them raw)
    for kw in ({"temperature": -1.0}, {"temperature": 1e308}, {"seed": 2**64}, {"seed": -1}, {"top_p": 0},
               {"max_tokens": 0}, {"extra_body": {"moekit": {"boost": {"0:1": 1e300}}}}):
        with pytest.raises(openai.BadRequestError):
            client.completions.create(model="tiny", prompt="x", **{"max_tokens": 2, **kw})
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=2,
                                       stop=["a", "b", "c", "d", "e"])
    r = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=2,
                                       temperature=0)
    assert r.usage.completion_tokens == 2


@pytest.mark.slow
def test_64_concurrent_clients_equal_sequential_between_bad_requests(server):
    prompts = [f"Request {i} says" for i in range(64)]
    url = server["base"] + "/v1/completions"

    def good(c: httpx.Client, p: str) -> str:
        r = c.post(url, json={"prompt": p, "max_tokens": 2, "temperature": 0})
        assert r.status_code == 200, r.text
        return r.json()["choices"][0]["text"]

    def bad_then_good(p: str) -> str:
        with httpx.Client(timeout=300) as c:
            bad = c.post(url, content=b'{"prompt": "x", "seed": NaN}', headers={"content-type": "application/json"})
            assert bad.status_code == 400
            return good(c, p)

    with httpx.Client(timeout=300) as c:
        sequential = [good(c, p) for p in prompts]
    with ThreadPoolExecutor(64) as pool:
        assert list(pool.map(bad_then_good, prompts)) == sequential


# ----- the fuzz test -----------------------------------------------------------------------------------

_scalars = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=12),
    st.sampled_from([0, 1, 2, -1, 0.5, 2**63, 2**64, 10**30, "3:5", "0:1", "1:15", "\ud800", "", "x" * 2000]))
_json = st.recursive(_scalars, lambda kids: st.one_of(st.lists(kids, max_size=4),
                                                      st.dictionaries(st.text(max_size=8), kids, max_size=4)),
                     max_leaves=10)
_small = st.one_of(st.integers(min_value=-2, max_value=4), _json)
_expert_key = st.one_of(st.sampled_from(["0:1", "1:3", "2:15", "2:16", "3:0", "-1:0", "a:b", "1:2:3"]), st.text(max_size=5))
_moekit = st.one_of(_json, st.fixed_dictionaries({}, optional={
    "disable": st.one_of(st.lists(_expert_key, max_size=3), _json),
    "force": st.one_of(st.lists(st.one_of(_expert_key, st.lists(_small, max_size=3)), max_size=3), _json),
    "boost": st.one_of(st.dictionaries(_expert_key, _scalars, max_size=3), _json),
    "bias": st.one_of(st.dictionaries(_expert_key, _scalars, max_size=3), _json),
    "top_k": _small, "top_p": st.one_of(st.floats(), _json)}))
_common = {
    "max_tokens": _small, "temperature": st.one_of(st.floats(), _json), "top_p": st.one_of(st.floats(), _json),
    "n": _small, "stop": st.one_of(st.text(max_size=3), st.lists(st.text(max_size=3), max_size=5), _json),
    "seed": st.one_of(st.integers(), _json), "stream": st.one_of(st.booleans(), _json), "moekit": _moekit,
    "model": _json, "logprobs": _json, "user": _json,
}
_prompt = st.one_of(st.text(max_size=40), st.lists(st.integers(min_value=-3, max_value=7000), max_size=45),
                    st.lists(st.text(max_size=5), max_size=2), _json)
_content = st.one_of(st.text(max_size=30),
                     st.lists(st.fixed_dictionaries({"type": st.sampled_from(["text", "image_url"]),
                                                     "text": st.one_of(st.text(max_size=10), _json)}), max_size=2),
                     _json)
_message = st.one_of(st.fixed_dictionaries({"role": st.one_of(st.sampled_from(["system", "user", "assistant"]),
                                                               _json), "content": _content}), _json)
_completion_body = st.fixed_dictionaries({}, optional={"prompt": _prompt, **_common})
_chat_body = st.fixed_dictionaries({}, optional={"messages": st.one_of(st.lists(_message, max_size=3), _json),
                                                 "max_completion_tokens": _small, **_common})


@pytest.mark.slow
@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
@given(chat=st.booleans(), data=st.data())
def test_fuzz_every_response_is_200_or_an_openai_4xx(server, chat, data):
    body = data.draw(_chat_body if chat else _completion_body)
    raw = json.dumps(body, allow_nan=True).encode()
    if data.draw(st.integers(0, 9)) == 0:  # now and then: a broken body or a wrong content type
        raw = data.draw(st.sampled_from([raw[: len(raw) // 2], raw + b"}", b"\xff" + raw, raw.replace(b'"', b"'")]))
    ctype = data.draw(st.sampled_from(["application/json"] * 8 + ["text/plain", None]))
    conn = server.setdefault("fuzz_conn", Conn(server["port"]))
    status, out = conn.post("/v1/chat/completions" if chat else "/v1/completions", raw, content_type=ctype)
    if status != 200:
        assert_openai_error(status, out)
        return
    if body.get("stream") is True:
        events = [line[len("data: "):] for line in out.decode().split("\n") if line.startswith("data: ")]
        assert events[-1] == "[DONE]"
        chunks = [json.loads(e) for e in events[:-1]]
        assert all("choices" in c for c in chunks), chunks
        assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")
    else:
        res = json.loads(out)
        assert res["usage"]["prompt_tokens"] + res["usage"]["completion_tokens"] <= CONTEXT
        assert res["choices"][0]["finish_reason"] in ("stop", "length")


# ----- command line: ports and flags, checked before the model is loaded ---------------------------------

@pytest.mark.parametrize("args, message", [
    (["--port", "70000"], "--port must be in 0..65535, not 70000"),
    (["--port", "-1"], "--port must be in 0..65535, not -1"),
    (["--max-body-bytes", "0"], "--max-body-bytes must be at least 1, not 0"),
    (["--max-prompt-tokens", "-3"], "--max-prompt-tokens must be at least 1, not -3"),
    (["--host", "no-such-host.invalid"], "cannot listen on no-such-host.invalid"),
    (["--device", "tpu"], "unknown device 'tpu'"),
])
def test_bad_serve_options_exit_2_before_loading(tmp_path, capfd, args, message):
    # the model does not exist: an error about it would mean the model was loaded first
    assert main(["serve", str(tmp_path / "no-model"), *args]) == 2
    err = capfd.readouterr().err
    assert message in err and "Traceback" not in err and "no-model" not in err
    assert len(err.strip().splitlines()) == 1


def test_port_in_use_is_one_line_exit_2(tmp_path, capfd):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert main(["serve", str(tmp_path / "no-model"), "--port", str(port)]) == 2
    err = capfd.readouterr().err.strip()
    assert err == f"error: cannot listen on 127.0.0.1:{port}: the port is already in use"


def test_non_loopback_host_warns(tmp_path, capfd):
    # binds every interface for an instant, then fails on the missing model
    assert main(["serve", str(tmp_path / "no-model"), "--host", "0.0.0.0", "--port", "0"]) == 2
    err = capfd.readouterr().err
    assert "warning: listening on 0.0.0.0: the model is reachable from other machines" in err
    assert main(["serve", str(tmp_path / "no-model"), "--host", "localhost", "--port", "0"]) == 2
    assert "warning" not in capfd.readouterr().err


# ----- SIGTERM during a long generation ------------------------------------------------------------------

@pytest.mark.slow
def test_sigterm_stops_a_busy_server(tmp_path):
    ckpt = save_tiny_checkpoint("qwen3_moe", tmp_path / "ckpt", max_position_embeddings=60_000)
    srv = start_server(ckpt, tmp_path, "--max-prompt-tokens", "1000")
    proc, base = srv["proc"], srv["base"]
    long = {"prompt": "Once upon a time", "max_tokens": 50_000, "temperature": 0}
    events = []
    with ThreadPoolExecutor(1) as pool, httpx.stream("POST", base + "/v1/completions", json={**long, "stream": True},
                                                     timeout=60) as r:
        assert r.status_code == 200
        queued = None
        for line in r.iter_lines():
            if not line.startswith("data: "):
                continue
            events.append(line[len("data: "):])
            if len(events) == 5:
                # while the model thread is busy, oversized requests are still refused: none waits for it
                big = httpx.post(base + "/v1/completions", content=b'{"prompt": "' + b"a" * 20_000_000 + b'"}',
                                 headers={"content-type": "application/json"}, timeout=60)
                assert big.status_code == 413
                by_chars = httpx.post(base + "/v1/completions", json={"prompt": "word " * 20_000}, timeout=60)
                assert by_chars.status_code == 400 and "100000 characters" in by_chars.json()["error"]["message"]
                by_tokens = httpx.post(base + "/v1/completions", json={"prompt": "w1 w2 " * 1200}, timeout=60)
                assert by_tokens.status_code == 400
                assert "more than this server's limit of 1000" in by_tokens.json()["error"]["message"]
            if len(events) == 10:  # a second request, waiting behind the running one
                queued = pool.submit(httpx.post, base + "/v1/completions", json=long, timeout=60)
                while httpx.get(base + "/metrics").json()["requests"] < 2:
                    time.sleep(0.05)
                proc.send_signal(signal.SIGTERM)
        waiting = queued.result()
    # a bound that detects a hang (the old server took 20-40 s), not a speed requirement
    assert proc.wait(timeout=20) == 0
    srv["log"].seek(0)
    log = srv["log"].read()
    assert "Traceback" not in log and "server stopped" in log
    assert events[-1] == "[DONE]"
    err = json.loads(events[-2])["error"]
    assert err["code"] == "shutting_down" and err["message"] == "the server is shutting down"
    assert all(json.loads(e)["choices"][0]["finish_reason"] is None for e in events[:-2])
    assert waiting.status_code == 503 and waiting.json()["error"]["code"] == "shutting_down"
