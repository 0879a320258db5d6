"""The twin's HTTP API, as a vLLM client sees it (FastAPI test client, real engine and truth model)."""

import json

import pytest
from fastapi.testclient import TestClient

from rooflab.twin.server import build_server, create_app


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    tok = tmp_path_factory.mktemp("tok") / "tokenizer"
    server = build_server("llama-3.1-8b", "H100-SXM", 1, accel=200, tokenizer_path=tok)
    with TestClient(create_app(server)) as c:
        c.server = server
        yield c


def test_models_health_metrics(client):
    assert client.get("/health").status_code == 200
    m = client.get("/v1/models").json()
    assert m["object"] == "list" and m["data"][0]["id"] == "llama-3.1-8b" and m["data"][0]["max_model_len"] == 4096
    text = client.get("/metrics").text
    for name in ("vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc",
                 "vllm:num_preemptions_total", "vllm:generation_tokens_total", "vllm:time_to_first_token_seconds"):
        assert f"# TYPE {name}" in text


def test_completion_usage_and_exact_token_counts(client):
    prompt = "lo mi ne ru " * 30
    r = client.post("/v1/completions", json={"model": "llama-3.1-8b", "prompt": prompt, "max_tokens": 17,
                                             "ignore_eos": True}, headers={"X-Request-Id": "req-42"})
    assert r.status_code == 200 and r.headers["x-request-id"] == "req-42"
    body = r.json()
    tok = client.server.tok
    assert body["object"] == "text_completion" and body["id"] == "cmpl-req-42"
    assert body["usage"] == {"prompt_tokens": tok.count(prompt), "completion_tokens": 17,
                             "total_tokens": tok.count(prompt) + 17}
    assert tok.count(body["choices"][0]["text"]) == 17  # generated text tokenizes back to the reported count
    assert body["choices"][0]["finish_reason"] == "length"


def test_token_id_prompts_are_counted_by_length(client):
    r = client.post("/v1/completions", json={"prompt": list(range(100, 150)), "max_tokens": 3, "ignore_eos": True})
    assert r.json()["usage"]["prompt_tokens"] == 50


def test_streaming_sse_framing(client):
    body = {"prompt": "ka lo", "max_tokens": 9, "stream": True, "ignore_eos": True,
            "stream_options": {"include_usage": True}}
    with client.stream("POST", "/v1/completions", json=body) as s:
        raw = b"".join(s.iter_bytes())
    events = raw.split(b"\n\n")
    assert events[-1] == b"" and events[-2] == b"data: [DONE]"
    payloads = [json.loads(e[len(b"data: "):]) for e in events[:-2]]
    assert all(e.startswith(b"data: {") for e in events[:-2])  # exact "data: " framing
    texts = [p["choices"][0]["text"] for p in payloads if p["choices"]]
    assert sum(client.server.tok.count(t) for t in texts if t) == 9
    assert payloads[-1]["usage"]["completion_tokens"] == 9 and payloads[-2]["choices"][0]["finish_reason"] == "length"


def test_chat_streaming_and_not(client):
    msgs = [{"role": "user", "content": "vo shi pe"}]
    r = client.post("/v1/chat/completions", json={"messages": msgs, "max_tokens": 5, "ignore_eos": True})
    b = r.json()
    assert b["object"] == "chat.completion" and b["choices"][0]["message"]["role"] == "assistant"
    assert client.server.tok.count(b["choices"][0]["message"]["content"]) == 5
    with client.stream("POST", "/v1/chat/completions",
                       json={"messages": msgs, "max_tokens": 4, "stream": True, "ignore_eos": True}) as s:
        lines = [ln for ln in s.iter_lines() if ln]
    first = json.loads(lines[0][6:])
    assert first["object"] == "chat.completion.chunk" and first["choices"][0]["delta"]["role"] == "assistant"
    assert lines[-1] == "data: [DONE]"


def test_eos_without_ignore_eos_stops_early_sometimes(client):
    reasons = [client.post("/v1/completions", json={"prompt": "x", "max_tokens": 400}).json()["choices"][0][
        "finish_reason"] for _ in range(6)]
    assert "stop" in reasons  # natural lengths (mean 128) end before 400 tokens


@pytest.mark.parametrize("payload,status,etype", [
    ({"model": "other-model", "prompt": "x"}, 404, "NotFoundError"),
    ({"prompt": "x " * 100, "max_tokens": 5000}, 400, "BadRequestError"),
    ({"prompt": 12}, 400, "BadRequestError"),
    ({"prompt": "x", "max_tokens": 0}, 400, "BadRequestError"),
])
def test_bad_requests_get_vllm_errors(client, payload, status, etype):
    r = client.post("/v1/completions", json=payload)
    assert r.status_code == status
    err = r.json()["error"]
    assert err["type"] == etype and err["code"] == status and err["message"]


def test_malformed_json_is_a_400(client):
    r = client.post("/v1/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["type"] == "BadRequestError"
    assert "maximum context length is 4096" in client.post(
        "/v1/completions", json={"prompt": "x " * 100, "max_tokens": 5000}).json()["error"]["message"]
