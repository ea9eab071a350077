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
        if mode in ("trickle", "incomplete", "reset", "retryafter", "echokey", "say"):
            return self._fault(mode, reply, server)
        self._send(200, json.dumps(reply).encode())

    def _fault(self, mode, reply, server):
        """trickle: headers, then the body one byte every 0.2 s (at most 40 bytes, then the
        rest); incomplete / reset: the first request of each pair gets a body cut short / a
        dropped connection, the second the reply; retryafter: 429 with Retry-After: 2 once;
        echokey: a 500 whose body repeats the Authorization header; say: replies with the
        text queued in server.say."""
        body = json.dumps(reply).encode()
        server.faults += 1
        first = server.faults % 2 == 1
        try:
            if mode == "trickle":
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                for i in range(min(40, len(body))):
                    self.wfile.write(body[i:i + 1])
                    self.wfile.flush()
                    time.sleep(0.2)
                self.wfile.write(body[40:])
            elif mode == "incomplete" and first:
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body[:10])
                self.wfile.flush()
                self.close_connection = True
            elif mode == "reset" and first:
                self.close_connection = True  # no response at all: the connection just closes
            elif mode == "retryafter" and first:
                self._send(429, b'{"error": "slow down"}', [("Retry-After", "2")])
            elif mode == "echokey":
                self._send(500, json.dumps({"error": f"bad request from {self.headers.get('Authorization')}"}).encode())
            elif mode == "say":
                reply["choices"][0]["message"]["content"] = server.say.pop(0)
                self._send(200, json.dumps(reply).encode())
            else:
                self._send(200, body)
        except (BrokenPipeError, ConnectionResetError):
            pass


@pytest.fixture(scope="module")
def server():
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    srv.daemon_threads = True
    srv.requests, srv.flaky, srv.faults, srv.say = [], 0, 0, []
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


# ---------------------------------------------------------------- faults (issue 13)


def test_timeout_bounds_the_whole_request_against_a_trickling_server(server):
    """Headers at once, then a byte every 0.2 s: each read is quick, the request is not."""
    c = _client(server, "trickle", timeout=1.0, max_retries=1)
    t0 = time.perf_counter()
    with pytest.raises(LLMError, match="timed out"):
        c.complete(MSG)
    assert c.calls == 2
    assert time.perf_counter() - t0 < 3.5


@pytest.mark.parametrize("mode", ["incomplete", "reset"])
def test_partial_reads_and_dropped_connections_are_retried(server, mode):
    server.faults = 0
    c = _client(server, mode, timeout=5, max_retries=2)
    assert c.complete(MSG) == "echo: hello"
    assert c.calls == 2


def test_retry_after_is_honoured(server):
    server.faults = 0
    waits = []
    c = _client(server, "retryafter", timeout=5, max_retries=2, backoff=0.01, sleep=waits.append)
    assert c.complete(MSG) == "echo: hello"
    assert c.calls == 2 and len(waits) == 1 and waits[0] >= 2.0


def test_retry_after_as_http_date():
    from email.utils import format_datetime
    from datetime import datetime, timedelta, timezone

    from fastinterp.llm import _retry_after_seconds

    when = format_datetime(datetime.now(timezone.utc) + timedelta(seconds=30), usegmt=True)
    assert 25 <= _retry_after_seconds(when) <= 31
    assert _retry_after_seconds("3") == 3.0 and _retry_after_seconds("soon") is None


def test_api_key_never_in_errors_or_repr(server):
    c = _client(server, "echokey", api_key="sk-secret-123", timeout=5, max_retries=1)
    with pytest.raises(LLMError) as info:
        c.complete(MSG)
    assert "sk-secret-123" not in str(info.value) and "***" in str(info.value)
    assert "sk-secret-123" not in repr(c)


@pytest.mark.parametrize("refusal", ["I cannot say.", "Sorry, I can't", "N/A", "As an AI", "As an AI language model, I",
                                     "none", "Unknown", "I'm not sure"])
def test_refusals_are_not_labels(refusal):
    with pytest.raises(ValueError):
        parse_label(refusal)


@pytest.mark.parametrize("reply", ["-1", "No, 1 is wrong", "1 or 0", "+1", "2", "Yes, but 0", "I cannot judge this"])
def test_judgement_junk(reply):
    with pytest.raises(ValueError):
        parse_judgement(reply)


def test_junk_replies_over_http_are_retried_then_name_the_step(server):
    server.say[:] = ["Sorry, I can't", "N/A", "location"]
    lab = LLMLabeller(_client(server, "say", timeout=5), junk_retries=2)
    assert lab.label(["Photo taken in Rome"]) == "location"
    server.say[:] = ["-1", "No, 1 is wrong", "I cannot judge"]
    with pytest.raises(LLMError, match="unusable judge reply after 3"):
        lab.judge("a street", "location")
