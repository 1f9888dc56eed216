"""A small OpenAI- and Anthropic-compatible model server, to run the examples offline.

    .venv/bin/python examples/local_model_server.py            # http://127.0.0.1:8000
    .venv/bin/python examples/local_model_server.py --listen 127.0.0.1:0   # a free port

It answers the two calls the examples make, with the providers' shapes and a `usage`:
- POST /v1/chat/completions (OpenAI): JSON, or SSE chunks with `"stream": true`, ending with a
  usage chunk when `stream_options.include_usage` is set, then `data: [DONE]`;
- POST /v1/messages (Anthropic): a message with `usage.input_tokens` / `output_tokens`.

The "model" echoes the last user message, one token per word, cut at the request's
max_tokens; a prompt token is a word of any message. The model `no-such-model` answers 404 as
the providers do, so an example can show what happens when the call fails. Standard library
only; it serves on loopback unless told otherwise and keeps nothing.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Self

LISTEN_DEFAULT = "127.0.0.1:8000"
MISSING_MODEL = "no-such-model"
MAX_TOKENS_DEFAULT = 256
REQUEST_BYTES_MAX = 1024 * 1024
ANSWER_PREFIX = "You said:"


def prompt_tokens(messages: list[dict[str, Any]], system: str = "") -> int:
    """One token per word of every message (and of the system prompt)."""
    words = len(system.split())
    for message in messages:
        content = message.get("content", "")
        if isinstance(content, list):  # content blocks
            content = " ".join(block.get("text", "") for block in content)
        words += len(str(content).split())
    return words


def answer_words(messages: list[dict[str, Any]], max_tokens: int) -> list[str]:
    """The reply, one token per word: the last user message echoed, at most max_tokens."""
    said = next((str(message.get("content", "")) for message in reversed(messages)
                 if message.get("role") == "user"), "")
    return [ANSWER_PREFIX, *said.split()][:max_tokens]


class _Handler(BaseHTTPRequestHandler):
    server_version = "local-model-server/1"

    def log_message(self, format: str, *args: Any) -> None:  # quiet: the examples print
        pass

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        if length > REQUEST_BYTES_MAX:
            self._json(413, {"error": {"message": "request too large"}})
            return
        try:
            body = json.loads(self.rfile.read(length) or b"{}")
        except json.JSONDecodeError:
            self._json(400, {"error": {"message": "the body is not JSON"}})
            return
        missing = f"The model `{MISSING_MODEL}` does not exist"
        if body.get("model") == MISSING_MODEL and self.path == "/v1/messages":
            self._json(404, {"type": "error",
                             "error": {"type": "not_found_error", "message": missing}})
        elif body.get("model") == MISSING_MODEL:
            self._json(404, {"error": {"message": missing, "type": "invalid_request_error",
                                       "code": "model_not_found"}})
        elif self.path == "/v1/chat/completions":
            self._chat_completion(body)
        elif self.path == "/v1/messages":
            self._anthropic_message(body)
        else:
            self._json(404, {"error": {"message": f"no route {self.path}"}})

    def _json(self, status: int, payload: dict[str, Any]) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _chat_completion(self, body: dict[str, Any]) -> None:
        messages = body.get("messages", [])
        max_tokens = body.get("max_completion_tokens") or body.get("max_tokens") \
            or MAX_TOKENS_DEFAULT
        words = answer_words(messages, max_tokens)
        usage = {"prompt_tokens": prompt_tokens(messages), "completion_tokens": len(words)}
        usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
        reply_id, created, model = f"chatcmpl-{time.time_ns()}", int(time.time()), body["model"]
        if not body.get("stream"):
            self._json(200, {
                "id": reply_id, "object": "chat.completion", "created": created, "model": model,
                "choices": [{"index": 0, "finish_reason": "stop",
                             "message": {"role": "assistant", "content": " ".join(words)}}],
                "usage": usage})
            return
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.end_headers()  # HTTP/1.0: the body ends when the connection closes

        def chunk(choices: list[dict[str, Any]], usage: dict[str, int] | None = None) -> None:
            event = {"id": reply_id, "object": "chat.completion.chunk", "created": created,
                     "model": model, "choices": choices, "usage": usage}
            self.wfile.write(f"data: {json.dumps(event)}\n\n".encode())
            self.wfile.flush()

        chunk([{"index": 0, "delta": {"role": "assistant", "content": ""},
                "finish_reason": None}])
        for index, word in enumerate(words):
            chunk([{"index": 0, "delta": {"content": word if index == 0 else " " + word},
                    "finish_reason": None}])
        chunk([{"index": 0, "delta": {}, "finish_reason": "stop"}])
        if (body.get("stream_options") or {}).get("include_usage"):
            chunk([], usage)
        self.wfile.write(b"data: [DONE]\n\n")
        self.wfile.flush()

    def _anthropic_message(self, body: dict[str, Any]) -> None:
        messages = body.get("messages", [])
        system = body.get("system", "")
        words = answer_words(messages, body.get("max_tokens") or MAX_TOKENS_DEFAULT)
        self._json(200, {
            "id": f"msg_{time.time_ns()}", "type": "message", "role": "assistant",
            "model": body["model"], "content": [{"type": "text", "text": " ".join(words)}],
            "stop_reason": "end_turn", "stop_sequence": None,
            "usage": {"input_tokens": prompt_tokens(messages, system if isinstance(system, str)
                                                    else ""),
                      "output_tokens": len(words)}})


class LocalModelServer:
    """The server on a thread: `start()` then `base_url`; `close()` stops it."""

    def __init__(self, listen: str = LISTEN_DEFAULT) -> None:
        host, _, port = listen.rpartition(":")
        self._http = ThreadingHTTPServer((host, int(port)), _Handler)
        self._http.daemon_threads = True
        self._thread = threading.Thread(target=self._http.serve_forever, daemon=True)

    @property
    def address(self) -> str:
        host, port = self._http.server_address[:2]
        return f"{host}:{port}"

    @property
    def base_url(self) -> str:
        """The root URL (Anthropic's base_url); OpenAI's base_url is this + "/v1"."""
        return f"http://{self.address}"

    def start(self) -> Self:
        self._thread.start()
        return self

    def serve_forever(self) -> None:
        """Serves on this thread until interrupted (Ctrl-C)."""
        try:
            self._http.serve_forever()
        except KeyboardInterrupt:
            pass
        finally:
            self._http.server_close()

    def close(self) -> None:
        self._http.shutdown()
        self._http.server_close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--listen", default=LISTEN_DEFAULT, metavar="HOST:PORT",
                        help="where to serve (port 0 picks a free one; default: %(default)s)")
    args = parser.parse_args(argv)
    server = LocalModelServer(args.listen)
    print(f"serving OpenAI's base_url {server.base_url}/v1 and Anthropic's {server.base_url}",
          flush=True)
    server.serve_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main())
