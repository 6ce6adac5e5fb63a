"""Prompt rewriting against a small OpenAI-compatible server started here on 127.0.0.1."""
from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tasks.config import load_config
from tasks.generate.rewrite import PromptRewriter, make_rewriter

SERVER = r'''
import json, sys
from http.server import BaseHTTPRequestHandler, HTTPServer

LOG = sys.argv[2]

class H(BaseHTTPRequestHandler):
    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        user = body["messages"][-1]["content"]
        with open(LOG, "a") as f:
            f.write(json.dumps({"path": self.path, "auth": self.headers.get("Authorization"), "user": user,
                                "model": body["model"], "system": body["messages"][0]["content"]}) + "\n")
        if "fail" in user:
            self.send_response(500); self.end_headers(); self.wfile.write(b"boom"); return
        if "garbage" in user:
            out = b"not json"
        else:
            out = json.dumps({"choices": [{"message": {"role": "assistant", "content": "DETAILED: " + user.upper()}}]}).encode()
        self.send_response(200); self.send_header("Content-Type", "application/json"); self.end_headers()
        self.wfile.write(out)
    def log_message(self, *a):
        pass

HTTPServer(("127.0.0.1", int(sys.argv[1])), H).serve_forever()
'''


@pytest.fixture
def server(tmp_path, free_port):
    port, log = free_port(), tmp_path / "requests.log"
    script = tmp_path / "server.py"
    script.write_text(SERVER)
    proc = subprocess.Popen([sys.executable, str(script), str(port), str(log)])
    try:
        for _ in range(100):
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                time.sleep(0.1)
        yield f"http://127.0.0.1:{port}/v1", log
    finally:
        os.kill(proc.pid, signal.SIGTERM)
        proc.wait(timeout=10)


def _calls(log: Path) -> list[dict]:
    return [json.loads(x) for x in log.read_text().splitlines()] if log.exists() else []


def test_rewrites_are_fetched_cached_and_fall_back_on_errors(server, tmp_path, caplog):
    url, log = server
    cache = tmp_path / "cache.jsonl"
    rw = PromptRewriter(url, "m1", "be vivid", api_key="sk-secret-123", cache_path=cache, timeout_s=5,
                        retries=0)  # one attempt each here; retries: test_transient_failures_are_retried...
    assert rw.rewrite("a red circle") == "DETAILED: A RED CIRCLE"
    assert rw.rewrite("a red circle") == "DETAILED: A RED CIRCLE"
    calls = _calls(log)
    assert len(calls) == 1  # the second came from the cache
    assert calls[0] == {"path": "/v1/chat/completions", "auth": "Bearer sk-secret-123", "user": "a red circle",
                        "model": "m1", "system": "be vivid"}
    with caplog.at_level(logging.DEBUG):
        assert rw.rewrite("please fail") == "please fail"  # HTTP 500 -> the original prompt
        assert rw.rewrite("garbage reply") == "garbage reply"  # malformed JSON -> the original prompt
    assert rw.stats == {"calls": 3, "cached": 1, "failed": 2}
    assert "sk-secret-123" not in caplog.text and "sk-secret-123" not in repr(rw)

    # a new rewriter (a rerun of the job) reads the cache file: no call, same rewrite
    again = PromptRewriter(url, "m1", "be vivid", api_key="sk-secret-123", cache_path=cache)
    assert again.rewrite("a red circle") == "DETAILED: A RED CIRCLE" and len(_calls(log)) == 3
    assert "sk-secret-123" not in cache.read_text()


def test_unreachable_endpoint_falls_back_and_config_wires_the_key_from_the_environment(tmp_path, server, monkeypatch,
                                                                                      free_port):
    dead = PromptRewriter(f"http://127.0.0.1:{free_port()}/v1", "m", "s", timeout_s=2, retries=0)
    assert dead.rewrite("a blue star") == "a blue star" and dead.stats["failed"] == 1

    url, log = server
    monkeypatch.setenv("PF_TEST_KEY", "sk-env-456")
    cfg = load_config(None, [f"workdir={tmp_path / 'w'}", f"generate.rewrite.endpoint={url}",
                             "generate.rewrite.api_key_env=PF_TEST_KEY"])
    rw = make_rewriter(cfg)
    assert rw.rewrite("two green squares") == "DETAILED: TWO GREEN SQUARES"
    assert _calls(log)[-1]["auth"] == "Bearer sk-env-456"
    assert (tmp_path / "w" / "rewrites.jsonl").is_file()
    assert make_rewriter(load_config(None, [])) is None  # no endpoint: no rewriting


# ---------------------------------------------------------------- retries (issue 17)


def _reply(text: str) -> dict:
    return {"choices": [{"message": {"role": "assistant", "content": text}}]}


class FlakyEndpoint:
    """An httpx MockTransport handler: `fail` transient failures per prompt, then a rewrite."""

    def __init__(self, fail: int, how: str = "503"):
        self.fail, self.how = fail, how
        self.attempts: dict[str, int] = {}

    def __call__(self, request):
        import httpx

        user = json.loads(request.content)["messages"][-1]["content"]
        n = self.attempts[user] = self.attempts.get(user, 0) + 1
        if "forbidden" in user:
            return httpx.Response(403, text="no")
        if n <= self.fail:
            if self.how == "timeout":
                raise httpx.ReadTimeout("slow", request=request)
            if self.how == "reset":
                raise httpx.ConnectError("connection reset", request=request)
            if self.how == "429":
                return httpx.Response(429, headers={"Retry-After": "7"}, text="slow down")
            return httpx.Response(503, text="busy")
        return httpx.Response(200, json=_reply("RICH " + user))


@pytest.mark.parametrize("how", ["503", "timeout", "reset", "429"])
def test_transient_failures_are_retried_with_backoff(how):
    import httpx

    endpoint, slept = FlakyEndpoint(fail=2, how=how), []
    rw = PromptRewriter("http://127.0.0.1:9/v1", "m", "s", retries=3, backoff_s=0.5,
                        transport=httpx.MockTransport(endpoint), sleep=slept.append)
    assert rw.rewrite("a red circle") == "RICH a red circle"
    assert endpoint.attempts["a red circle"] == 3 and rw.retried == 2 and rw.failure("a red circle") is None
    assert rw.stats == {"calls": 1, "cached": 0, "failed": 0}
    if how == "429":
        assert slept == [7.0, 7.0]  # the server's Retry-After, when longer than the backoff
    else:  # exponential, with jitter in [1/2, 1] of 0.5 s then 1 s
        assert 0.25 <= slept[0] <= 0.5 and 0.5 <= slept[1] <= 1.0


def test_a_pair_whose_rewrite_keeps_failing_keeps_its_prompt_and_records_why(tmp_path):
    import httpx

    from tasks.generate.requests import expand_inputs

    endpoint, slept = FlakyEndpoint(fail=10), []
    rw = PromptRewriter("http://127.0.0.1:9/v1", "m", "s", retries=2, backoff_s=0.1,
                        transport=httpx.MockTransport(endpoint), sleep=slept.append)
    assert rw.rewrite("a blue star") == "a blue star"
    assert endpoint.attempts["a blue star"] == 3 and len(slept) == 2
    assert rw.failure("a blue star") == "RewriteFailed: HTTP 503 from http://127.0.0.1:9/v1/chat/completions (attempt 3 of 3)"
    # A permanent error (403) is not retried.
    assert rw.rewrite("forbidden words") == "forbidden words" and endpoint.attempts["forbidden words"] == 1
    assert "HTTP 403" in rw.failure("forbidden words") and rw.stats["failed"] == 2

    # Through the job's inputs: each pair says whether its rewrite failed, and why.
    endpoint.fail = 1  # now one transient failure per prompt: every rewrite succeeds on its second attempt
    f = tmp_path / "p.jsonl"
    f.write_text("\n".join(json.dumps({"id": i, "prompt": p}) for i, p in
                           enumerate(["a green square", "forbidden words"])) + "\n")
    cfg = load_config(None, [f"workdir={tmp_path / 'w'}", "generate.size=64x64",
                             f"generate.inputs={json.dumps({'kind': 'file', 'path': str(f)})}"])
    ex = expand_inputs(cfg, rewrite=rw)
    ok, bad = ex.pairs
    assert ok.caption == "RICH a green square" and ok.params["rewritten"] and "rewrite_error" not in ok.params
    assert bad.caption == "forbidden words" and not bad.params["rewritten"] and "HTTP 403" in bad.params["rewrite_error"]


def test_retry_settings_come_from_the_config(tmp_path):
    cfg = load_config(None, [f"workdir={tmp_path}", "generate.rewrite.endpoint=http://127.0.0.1:9/v1",
                             "generate.rewrite.retries=5", "generate.rewrite.backoff_s=0.25"])
    rw = make_rewriter(cfg)
    assert (rw.retries, rw.backoff_s) == (5, 0.25)
