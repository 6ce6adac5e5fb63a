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
from tasks.rewrite import PromptRewriter, make_rewriter

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


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def server(tmp_path):
    port, log = _free_port(), tmp_path / "requests.log"
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
    rw = PromptRewriter(url, "m1", "be vivid", api_key="sk-secret-123", cache_path=cache, timeout_s=5)
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


def test_unreachable_endpoint_falls_back_and_config_wires_the_key_from_the_environment(tmp_path, server, monkeypatch):
    dead = PromptRewriter(f"http://127.0.0.1:{_free_port()}/v1", "m", "s", timeout_s=2)
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
