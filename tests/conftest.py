"""Shared fixtures. Triton kernels run under the interpreter when there is no GPU: the flag
must be set before any kernel module is imported, hence here, first."""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

import fastinterp  # noqa: E402


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Never touch the user's real concept cache from tests."""
    monkeypatch.setenv("FASTINTERP_CACHE", str(tmp_path_factory.mktemp("cache")))


@pytest.fixture(scope="session")
def tiny_clip():
    """(model, preprocess, tokenizer) of the tiny random-weight ViT, seeded."""
    torch.manual_seed(0)
    return fastinterp.load_clip(fastinterp.TINY_MODEL)


class ChatServer:
    """An OpenAI-compatible chat server on 127.0.0.1 replying `answer(prompt)` to each
    request's last message. `.url` ends in /v1; `.requests` gets {"prompt", "auth"} per call;
    `.stop()` (also at the test's end) leaves a dead endpoint behind."""

    def __init__(self, answer):
        import json
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        requests = self.requests = []

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep test output quiet
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                prompt = body["messages"][-1]["content"]
                requests.append({"prompt": prompt, "auth": self.headers.get("Authorization")})
                data = json.dumps({"choices": [{"message": {"role": "assistant", "content": answer(prompt)}}]})
                self.send_response(200)
                self.send_header("Content-Length", str(len(data.encode())))
                self.end_headers()
                self.wfile.write(data.encode())

        self.srv = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.srv.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.srv.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    def stop(self):
        if self.thread.is_alive():
            self.srv.shutdown()
            self.srv.server_close()
            self.thread.join(timeout=5)


@pytest.fixture
def chat_server():
    """`server = chat_server(answer)`: a ChatServer, stopped at the test's end."""
    servers = []

    def start(answer):
        servers.append(ChatServer(answer))
        return servers[-1]

    yield start
    for srv in servers:
        srv.stop()
