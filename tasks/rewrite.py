"""Optional prompt rewriting before generation ("thinking before generation", paper 4.3.1).

    python -m tasks.rewrite --config configs/tiny.yaml "a red circle"   # prints the rewrite

Calls an OpenAI-compatible chat-completions endpoint named in `generate.rewrite` (endpoint,
model, system prompt). The API key comes from an environment variable or a Prefect Secret
block; it is sent only in the Authorization header and never logged or put in an error.
Rewrites are cached (a jsonl file) so a rerun of a job renders the same prompts and so the
same work units; on ANY error (network, HTTP status, malformed reply) the original prompt is
used and the failure is counted.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
import urllib.error
import urllib.request
from pathlib import Path

log = logging.getLogger(__name__)


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
    ):
        self.url = endpoint.rstrip("/") + ("" if endpoint.rstrip("/").endswith("/chat/completions") else "/chat/completions")
        self.model, self.system_prompt = model, system_prompt
        self._api_key = api_key
        self.timeout_s, self.max_chars = timeout_s, max_chars
        self.cache_path = Path(cache_path) if cache_path else None
        self.cache: dict[str, str] = {}
        self.stats = {"calls": 0, "cached": 0, "failed": 0}
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
        self.stats["calls"] += 1
        try:
            text = self._call(prompt)
        except Exception as e:  # fall back on anything: the job must not depend on the endpoint
            self.stats["failed"] += 1
            log.warning("prompt rewriting failed (%s: %s); using the original prompt", type(e).__name__, _safe(str(e), self._api_key))
            return prompt
        with self._lock:
            self.cache[k] = text
            if self.cache_path:
                self.cache_path.parent.mkdir(parents=True, exist_ok=True)
                with self.cache_path.open("a", encoding="utf-8") as f:
                    f.write(json.dumps({"key": k, "prompt": prompt, "rewrite": text}) + "\n")
        return text

    __call__ = rewrite

    def _call(self, prompt: str) -> str:
        body = json.dumps(
            {
                "model": self.model,
                "messages": [{"role": "system", "content": self.system_prompt}, {"role": "user", "content": prompt}],
                "temperature": 0,
            }
        ).encode()
        headers = {"Content-Type": "application/json"}
        if self._api_key:
            headers["Authorization"] = f"Bearer {self._api_key}"
        req = urllib.request.Request(self.url, data=body, headers=headers, method="POST")
        try:
            with urllib.request.urlopen(req, timeout=self.timeout_s) as resp:
                reply = json.loads(resp.read().decode("utf-8"))
        except urllib.error.HTTPError as e:
            raise RuntimeError(f"HTTP {e.code} from {self.url}") from None
        text = reply["choices"][0]["message"]["content"]
        if not isinstance(text, str) or not text.strip():
            raise ValueError("empty rewrite")
        text = " ".join(text.split())
        if len(text) > self.max_chars:
            raise ValueError(f"rewrite longer than {self.max_chars} characters")
        return text


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
