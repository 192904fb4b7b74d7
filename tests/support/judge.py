"""A stand-in OpenAI-compatible judge: `POST /v1/chat/completions` graded by a rule on the answer in the rubric, with
failures, slowness and request bookkeeping on demand, for the stated-rewards tests (`edgerlhf.rewards.Judge`)."""

from __future__ import annotations

import contextlib
import http.server
import json
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

ANSWER_MARK = "ANSWER>>>"
"""Where the tests' rubric puts the answer (`rubric = "...ANSWER>>>{answer}"`), so the stand-in can grade it."""


@dataclass
class StandInJudge:
    url: str
    grade: Callable[[str], str]
    """The reply to an answer (a number as text, or anything else)."""
    fail_first: int = 0
    """Answer this many requests with 503 before grading."""
    delay_s: float = 0.0
    requests: list[str] = field(default_factory=list)
    """The answers asked about, in arrival order (failed requests included)."""
    in_flight: int = 0
    max_in_flight: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)


@contextlib.contextmanager
def stand_in_judge(grade: Callable[[str], str], fail_first: int = 0, delay_s: float = 0.0) -> Iterator[StandInJudge]:
    """A judge on a free port of 127.0.0.1, its base URL in `.url` (`.../v1`), stopped on exit."""
    judge = StandInJudge("", grade, fail_first, delay_s)

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            answer = body["messages"][-1]["content"].split(ANSWER_MARK, 1)[-1]
            with judge.lock:
                judge.requests.append(answer)
                judge.in_flight += 1
                judge.max_in_flight = max(judge.max_in_flight, judge.in_flight)
                failing = len(judge.requests) <= judge.fail_first
            try:
                time.sleep(judge.delay_s)
            finally:
                # Counted out before the reply is written: once the client has it, it may send its next request,
                # which must not meet this one still counted.
                with judge.lock:
                    judge.in_flight -= 1
            if self.path != "/v1/chat/completions" or failing:
                self._send(404 if not failing else 503, {"error": {"message": "unavailable"}})
                return
            self._send(200, {"id": "x", "object": "chat.completion", "created": 0, "model": body["model"],
                             "choices": [{"index": 0, "finish_reason": "stop",
                                          "message": {"role": "assistant", "content": judge.grade(answer)}}]})

        def _send(self, status: int, payload: dict) -> None:
            data = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    judge.url = f"http://127.0.0.1:{server.server_port}/v1"
    try:
        yield judge
    finally:
        server.shutdown()
        server.server_close()
