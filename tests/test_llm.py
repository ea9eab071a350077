"""The OpenAI-compatible client against a real local HTTP server, the prompts' parsing, and
the offline CLIP labeller."""
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch

from fastinterp.concepts import ConceptDictionary
from fastinterp.llm import (ClipLabeller, LLMError, LLMLabeller, LLMScorer, OpenAIChat, UnusableReply, complete_parsed,
                            judge_messages, label_messages, parse_judgement, parse_label)


class _Handler(BaseHTTPRequestHandler):
    """Behaviour chosen by the first path segment: ok, slow, error500, flaky (500 twice then
    ok), junk (malformed JSON), nochoice (JSON without choices), unauthorized (401),
    parts (content as a list of parts)."""

    def log_message(self, *args):  # keep test output quiet
        pass

    def _send(self, status, body: bytes, headers=()):
        try:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            for k, v in headers:
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError):
            pass

    def do_POST(self):
        server = self.server
        length = int(self.headers.get("Content-Length", 0))
        request = json.loads(self.rfile.read(length))
        mode = self.path.strip("/").split("/")[0]
        server.requests.append({"path": self.path, "body": request, "auth": self.headers.get("Authorization")})
        reply = {"id": "x", "choices": [{"index": 0, "message": {"role": "assistant",
                                                                 "content": " echo: " + request["messages"][-1]["content"]}}]}
        if mode == "slow":
            time.sleep(1.0)
        if mode == "error500":
            return self._send(500, b'{"error": "boom"}')
        if mode == "flaky":
            server.flaky += 1
            if server.flaky <= 2:
                return self._send(503, b"busy", [("Retry-After", "0")])
        if mode == "junk":
            return self._send(200, b'{"choices": [ {"message": ')
        if mode == "nochoice":
            return self._send(200, b'{"object": "chat.completion"}')
        if mode == "unauthorized":
            return self._send(401, b'{"error": "bad key"}')
        if mode == "parts":
            reply["choices"][0]["message"]["content"] = [{"type": "text", "text": "location"}]
        self._send(200, json.dumps(reply).encode())


@pytest.fixture(scope="module")
def server():
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    srv.daemon_threads = True
    srv.requests, srv.flaky = [], 0
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()
    thread.join(timeout=5)


def _client(server, mode, **kw):
    kw.setdefault("backoff", 0.0)
    return OpenAIChat(f"http://127.0.0.1:{server.server_address[1]}/{mode}", model="test-model", **kw)


MSG = [{"role": "user", "content": "hello"}]


def test_normal_reply_and_request_shape(server):
    c = _client(server, "ok", api_key="sk-test", timeout=5)
    assert c.complete(MSG) == "echo: hello"
    req = server.requests[-1]
    assert req["path"] == "/ok/chat/completions"
    assert req["body"]["model"] == "test-model" and req["body"]["messages"] == MSG
    assert req["auth"] == "Bearer sk-test"
    assert _client(server, "parts", timeout=5).complete(MSG) == "location"


def test_env_configuration(server, monkeypatch):
    monkeypatch.setenv("FASTINTERP_LLM_BASE_URL", f"http://127.0.0.1:{server.server_address[1]}/ok")
    monkeypatch.setenv("FASTINTERP_LLM_MODEL", "env-model")
    monkeypatch.setenv("OPENAI_API_KEY", "sk-env")
    c = OpenAIChat(timeout=5)
    assert c.complete(MSG) == "echo: hello"
    assert server.requests[-1]["body"]["model"] == "env-model"
    assert server.requests[-1]["auth"] == "Bearer sk-env"


def test_slow_reply_times_out_and_is_retried(server):
    c = _client(server, "slow", timeout=0.2, max_retries=1)
    t0 = time.perf_counter()
    with pytest.raises(LLMError, match="timed out"):
        c.complete(MSG)
    assert c.calls == 2
    assert time.perf_counter() - t0 < 3


def test_500_retried_with_exponential_backoff(server):
    waits = []
    c = _client(server, "error500", timeout=5, max_retries=3, backoff=0.5, sleep=waits.append)
    with pytest.raises(LLMError, match="HTTP 500"):
        c.complete(MSG)
    assert c.calls == 4
    assert len(waits) == 3
    for w, base in zip(waits, (0.5, 1.0, 2.0)):
        assert base <= w <= base * 1.1


def test_flaky_server_recovers(server):
    server.flaky = 0
    c = _client(server, "flaky", timeout=5, max_retries=3)
    assert c.complete(MSG) == "echo: hello"
    assert c.calls == 3


@pytest.mark.parametrize("mode,match", [("junk", "malformed JSON"), ("nochoice", "no choices")])
def test_unparseable_replies(server, mode, match):
    c = _client(server, mode, timeout=5, max_retries=2)
    with pytest.raises(LLMError, match=match):
        c.complete(MSG)
    assert c.calls == 3


def test_client_error_not_retried(server):
    c = _client(server, "unauthorized", timeout=5, max_retries=3)
    with pytest.raises(LLMError, match="401.*not retried"):
        c.complete(MSG)
    assert c.calls == 1


def test_connection_refused():
    import socket

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    c = OpenAIChat(f"http://127.0.0.1:{port}/v1", model="m", timeout=1, max_retries=1, backoff=0)
    with pytest.raises(LLMError, match="cannot connect|connection"):
        c.complete(MSG)


def test_bad_arguments():
    with pytest.raises(ValueError, match="http"):
        OpenAIChat("ftp://example.invalid")
    with pytest.raises(ValueError, match="timeout"):
        OpenAIChat("http://127.0.0.1:1", timeout=0)
    with pytest.raises(ValueError, match="message #0"):
        OpenAIChat("http://127.0.0.1:1").complete([{"role": "user"}])


def test_prompts_follow_the_paper():
    msgs = label_messages(["Photo taken in Rome", "A street in Cairo"])
    assert msgs[-1]["content"].startswith("What is the common characteristic in the following quoted lines? "
                                          "Provide a one-word response without punctuation.")
    assert '"Photo taken in Rome"\n"A street in Cairo"' in msgs[-1]["content"]
    assert [m["role"] for m in msgs[1:-1]] == ["user", "assistant"] * 3  # few-shot pairs
    msgs = judge_messages("A street in Cairo", "location")
    assert "Rate the association of the property label to the text. 1 if associated and 0 if not associated." \
        in msgs[-1]["content"]
    assert '"location"' in msgs[-1]["content"] and '"A street in Cairo"' in msgs[-1]["content"]


def test_reply_parsing():
    assert parse_label(" Location.\n") == "location"
    assert parse_label('Label: "color"') == "color"
    assert [parse_judgement(r) for r in ("1", "0", "Score: 1.", "1.0", "no")] == [1, 0, 1, 1, 0]
    for junk in ("", "The lines all show places around the world", "..."):
        with pytest.raises(ValueError):
            parse_label(junk)
    for junk in ("", "10", "0 or 1", "perhaps"):
        with pytest.raises(ValueError):
            parse_judgement(junk)


class _Scripted:
    def __init__(self, replies):
        self.replies, self.seen = list(replies), []

    def complete(self, messages):
        self.seen.append(messages)
        return self.replies.pop(0)


def test_llm_labeller_retries_junk_then_errors():
    lab = LLMLabeller(_Scripted(["I think the answer is that they are all places", "location"]))
    assert lab.label(["a", "b"]) == "location"
    lab = LLMLabeller(_Scripted(["maybe", "??", "definitely"]), junk_retries=2)
    with pytest.raises(LLMError, match="unusable judge reply after 3"):
        lab.judge("a", "b")
    with pytest.raises(TypeError, match="complete"):
        LLMLabeller(object())


def test_one_retry_loop_for_unusable_replies():
    """complete_parsed is the loop both the CCS labeller and SITH's scorer ask through."""
    client = _Scripted(["junk", "more junk", "7"])
    assert complete_parsed(client, [{"role": "user", "content": "n?"}], int, retries=2) == 7
    assert len(client.seen) == 3
    with pytest.raises(UnusableReply, match="invalid literal") as info:
        complete_parsed(_Scripted(["a", "b"]), [{"role": "user", "content": "n?"}], int, retries=1)
    assert info.value.attempts == 2 and isinstance(info.value, ValueError)
    with pytest.raises(ValueError, match="retries"):
        complete_parsed(_Scripted([]), [{"role": "user", "content": "n?"}], int, retries=-1)
    scorer_client = _Scripted(["no", "no", "Score: 2"])
    assert LLMScorer(scorer_client, retries=2)("p") == 2 and len(scorer_client.seen) == 3


def test_llm_labeller_over_http(server):
    lab = LLMLabeller(_client(server, "parts", timeout=5))
    assert lab.label(["Photo taken in Rome"]) == "location"


def test_clip_labeller(tiny_clip, tmp_path):
    model, _, tokenizer = tiny_clip
    vocab = ConceptDictionary(["dog", "cat", "city", "beach", "red", "three"], name="t")
    lab = ClipLabeller(model, tokenizer, vocab, threshold=0.5, cache_dir=tmp_path)
    descs = ["a photo of a dog", "a dog running", "a puppy"]
    label = lab.label(descs)
    assert label in vocab.texts
    e = lab.embed(descs)
    centroid = torch.nn.functional.normalize(e.mean(0), dim=-1)
    assert label == vocab[int((lab._vocab @ centroid).argmax())]
    # a text is consistent with itself; the judgement is the thresholded cosine
    assert lab.judge("city", "city") == 1
    cos = lab.cosine("a puppy", "beach")
    assert lab.judge("a puppy", "beach") == int(cos >= 0.5)
    assert ClipLabeller(model, tokenizer, vocab, threshold=-1.0, cache_dir=tmp_path).judge("a puppy", "beach") == 1
    with pytest.raises(ValueError, match="cosine"):
        ClipLabeller(model, tokenizer, vocab, threshold=2.0, cache_dir=tmp_path)
