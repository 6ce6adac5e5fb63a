"""Optional prompt rewriting before generation ("thinking before generation", paper 4.3.1).

    python -m tasks.generate.rewrite --config configs/tiny.yaml "a red circle"   # prints the rewrite

Calls an OpenAI-compatible chat-completions endpoint named in `generate.rewrite` (endpoint,
model, system prompt). The API key comes from an environment variable or a Prefect Secret
block; it is sent only in the Authorization header and never logged or put in an error.
Rewrites are cached (a jsonl file) so a rerun of a job renders the same prompts and so the
same work units. Transient failures (connection errors, timeouts, HTTP 408/425/429/5xx) are
retried `retries` times with exponential backoff (backoff_s, 2 x backoff_s, ... with jitter,
at least the server's Retry-After); after that, or on a permanent error (another HTTP status, a
malformed reply), the original prompt is used, the failure is counted, and the pair records it
(params.rewrite_error, tasks/generate/requests.py). Failures are not cached: a rerun asks again.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import threading
import time
from pathlib import Path
from typing import Callable

import httpx

log = logging.getLogger(__name__)

TRANSIENT_STATUS = {408, 425, 429, 500, 502, 503, 504}
MAX_BACKOFF_S = 60.0


class RewriteFailed(RuntimeError):
    """One attempt failed; `transient` says whether another attempt may succeed."""

    def __init__(self, message: str, transient: bool, retry_after: float | None = None):
        super().__init__(message)
        self.transient, self.retry_after = transient, retry_after


def resolve_api_key(api_key_env: str | None, api_key_secret: str | None) -> str | None:
    """The key from the environment variable, else from the named Prefect Secret block."""
    if api_key_env and os.environ.get(api_key_env):
        return os.environ[api_key_env]
    if api_key_secret:
        try:
            from prefect.blocks.system import Secret

            return Secret.load(api_key_secret).get()
        except Exception as e:  # a missing block must not stop the job: rewriting is optional
            log.warning("prompt rewriting: Prefect Secret block %r not loadable (%s)", api_key_secret, type(e).__name__)
    return None


class PromptRewriter:
    """rewrite(prompt) -> the endpoint's rewrite, cached; the original prompt on any error."""

    def __init__(
        self,
        endpoint: str,
        model: str,
        system_prompt: str,
        api_key: str | None = None,
        cache_path: str | Path | None = None,
        timeout_s: float = 30.0,
        max_chars: int = 1000,
        retries: int = 3,
        backoff_s: float = 1.0,
        transport: httpx.BaseTransport | None = None,
        sleep: Callable[[float], None] = time.sleep,
    ):
        self.url = endpoint.rstrip("/") + ("" if endpoint.rstrip("/").endswith("/chat/completions") else "/chat/completions")
        self.model, self.system_prompt = model, system_prompt
        self._api_key = api_key
        self.timeout_s, self.max_chars = timeout_s, max_chars
        self.cache_path = Path(cache_path) if cache_path else None
        self.cache: dict[str, str] = {}
        self.stats = {"calls": 0, "cached": 0, "failed": 0}
        self.retries, self.backoff_s = int(retries), float(backoff_s)
        self.retried = 0  # extra attempts made after transient failures
        self.failures: dict[str, str] = {}  # prompt -> why its rewrite failed (recorded in the pair)
        self._sleep, self._rng = sleep, random.Random()
        self._client = httpx.Client(transport=transport, timeout=timeout_s)
        self._lock = threading.Lock()
        if self.cache_path and self.cache_path.is_file():
            for line in self.cache_path.read_text(encoding="utf-8").splitlines():
                try:
                    rec = json.loads(line)
                    self.cache[rec["key"]] = rec["rewrite"]
                except (json.JSONDecodeError, KeyError, TypeError):
                    continue  # a torn last line after a crash: that rewrite is simply redone

    def __repr__(self) -> str:  # never show the key
        return f"PromptRewriter(url={self.url!r}, model={self.model!r})"

    def key(self, prompt: str) -> str:
        return hashlib.sha256(json.dumps([self.url, self.model, self.system_prompt, prompt]).encode()).hexdigest()

    def rewrite(self, prompt: str) -> str:
        k = self.key(prompt)
        with self._lock:
            if k in self.cache:
                self.stats["cached"] += 1
                return self.cache[k]
        with self._lock:
            self.stats["calls"] += 1
        try:
            text = self._with_retries(prompt)
        except Exception as e:  # fall back on anything: the job must not depend on the endpoint
            why = _safe(f"{type(e).__name__}: {e}", self._api_key)
            with self._lock:
                self.stats["failed"] += 1
                self.failures[prompt] = why
            log.warning("prompt rewriting failed (%s); using the original prompt", why)
            return prompt
        with self._lock:
            self.failures.pop(prompt, None)
            self.cache[k] = text
            if self.cache_path:
                self.cache_path.parent.mkdir(parents=True, exist_ok=True)
                with self.cache_path.open("a", encoding="utf-8") as f:
                    f.write(json.dumps({"key": k, "prompt": prompt, "rewrite": text}) + "\n")
        return text

    __call__ = rewrite

    def failure(self, prompt: str) -> str | None:
        """Why the rewrite of `prompt` failed in this run (None when it did not)."""
        return self.failures.get(prompt)

    def backoff(self, attempt: int, retry_after: float | None) -> float:
        """Seconds before attempt `attempt + 1`: backoff_s * 2^attempt with jitter (so that workers
        rate-limited together do not retry together), at least Retry-After, at most a minute."""
        delay = self.backoff_s * 2**attempt * (0.5 + 0.5 * self._rng.random())
        return min(MAX_BACKOFF_S, max(delay, retry_after or 0.0))

    def _with_retries(self, prompt: str) -> str:
        for attempt in range(self.retries + 1):
            try:
                return self._call(prompt)
            except RewriteFailed as e:
                if not e.transient or attempt == self.retries:
                    raise RewriteFailed(f"{e} (attempt {attempt + 1} of {self.retries + 1})", e.transient) from None
                delay = self.backoff(attempt, e.retry_after)
                log.info("prompt rewriting: %s; retrying in %.1f s", e, delay)
                with self._lock:
                    self.retried += 1
                self._sleep(delay)
        raise AssertionError("unreachable")

    def _call(self, prompt: str) -> str:
        """One attempt; RewriteFailed says whether it is worth another."""
        body = {
            "model": self.model,
            "messages": [{"role": "system", "content": self.system_prompt}, {"role": "user", "content": prompt}],
            "temperature": 0,
        }
        headers = {"Content-Type": "application/json"}
        if self._api_key:
            headers["Authorization"] = f"Bearer {self._api_key}"
        try:
            resp = self._client.post(self.url, json=body, headers=headers)
        except httpx.TimeoutException:
            raise RewriteFailed(f"no reply from {self.url} within {self.timeout_s} s", transient=True) from None
        except httpx.TransportError as e:
            raise RewriteFailed(f"cannot reach {self.url} ({type(e).__name__})", transient=True) from None
        if resp.status_code != 200:
            transient = resp.status_code in TRANSIENT_STATUS
            raise RewriteFailed(f"HTTP {resp.status_code} from {self.url}", transient, _retry_after(resp))
        try:
            reply = resp.json()
            text = reply["choices"][0]["message"]["content"]
        except (ValueError, KeyError, IndexError, TypeError):
            raise RewriteFailed(f"malformed reply from {self.url}", transient=False) from None
        if not isinstance(text, str) or not text.strip():
            raise ValueError("empty rewrite")
        text = " ".join(text.split())
        if len(text) > self.max_chars:
            raise ValueError(f"rewrite longer than {self.max_chars} characters")
        return text


def _retry_after(resp: httpx.Response) -> float | None:
    try:
        return float(resp.headers["Retry-After"])
    except (KeyError, ValueError):
        return None  # absent, or an HTTP date: the exponential backoff decides


def _safe(message: str, secret: str | None) -> str:
    return message.replace(secret, "***") if secret else message


def make_rewriter(cfg) -> PromptRewriter | None:
    """The rewriter of cfg.generate.rewrite, or None when no endpoint is configured."""
    rw = cfg.generate.rewrite
    if not rw.endpoint:
        return None
    cache = rw.cache_path
    if cache is None and "://" not in cfg.workdir:
        cache = str(Path(cfg.workdir) / "rewrites.jsonl")
    return PromptRewriter(
        rw.endpoint,
        rw.model,
        rw.system_prompt,
        api_key=resolve_api_key(rw.api_key_env, rw.api_key_secret),
        cache_path=cache,
        timeout_s=rw.timeout_s,
        retries=rw.retries,
        backoff_s=rw.backoff_s,
    )


def main() -> None:
    import argparse

    from tasks.config import load_config

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="configs/tiny.yaml")
    ap.add_argument("prompt")
    args = ap.parse_args()
    rw = make_rewriter(load_config(args.config))
    print(rw.rewrite(args.prompt) if rw else args.prompt)


if __name__ == "__main__":
    main()
