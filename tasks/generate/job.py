"""Bulk image-pair generation: a resumable Ray job with one engine actor per GPU (issue 7).

    python -m tasks.generate.job --config configs/tiny.yaml [generate.best_of=2 ...]

The driver validates and expands the inputs (tasks/generate/requests.py) before any model is loaded,
optionally rewrites the prompts (tasks/generate/rewrite.py), splits the pairs into deterministic work
units and skips the units already in the generated/ dataset (a rerun after a crash or
preemption redoes only the lost ones). Each actor loads the decoder, MoVQGAN and the layout
once, keeps the engine's continuous batch full with one unit's samples (best-of-N: N per pair
when a verifier applies), decodes codes to pixels, scores the samples (tasks/generate/verify.py), keeps
the best, and writes the unit's shard and rejects itself; the driver commits them as they
arrive. Ray Data restarts an actor that dies and retries its unit (write_shard is idempotent).
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from tasks.generate.requests import PairSpec, RequestError, expand_inputs, no_valid_rows_message, sample_seed

log = logging.getLogger(__name__)

REQUEST_UNIT = "requests"  # the unit that holds the rejects of input validation


def output_uri(cfg) -> str:
    out = cfg.generate.output
    return out if "://" in out or out.startswith("/") else cfg.dataset_uri(out)


def make_units(pairs: list[PairSpec], per_unit: int) -> list[dict]:
    """Consecutive chunks of `per_unit` pairs; a unit's name is its index and a digest of its pair
    ids (not of prompts), so a rerun of the same inputs names the same units."""
    units = []
    for start in range(0, len(pairs), per_unit):
        chunk = pairs[start : start + per_unit]
        digest = hashlib.sha1("\n".join(p.id for p in chunk).encode()).hexdigest()[:10]
        units.append({"unit": f"g{start // per_unit:06d}-{digest}", "pairs": [p.to_dict() for p in chunk]})
    return units


@dataclass(frozen=True)
class EngineSettings:
    """How the engines of a job run, resolved once by the driver from the config and the device."""

    device: str  # cpu | cuda
    quantize: str  # none | int8 | int4
    compile: str  # full | eager: what was asked; a row's params hold what ran (full may fall back)

    def to_dict(self) -> dict:
        return {"device": self.device, "quantize": self.quantize, "compile": self.compile}


def engine_settings(gen, device: str) -> EngineSettings:
    """Resolve generate.quantize / generate.compile for the device the engines run on.

    `auto`: int4 weight-only and the compiled step on CUDA (the paper's setup, what a GPU user
    wants without thinking); none and eager on a CPU, where torchao has no int4 kernel, int8 is
    no faster (docs/generate.md's CPU table) and inductor's compile costs more than it saves on a
    short job. int4 asked on a CPU is a ConfigError naming the field (the CLI prints it as one
    line, before Prefect or Ray start)."""
    from tasks.config import ConfigError

    cuda = device == "cuda"
    quantize = gen.quantize if gen.quantize != "auto" else ("int4" if cuda else "none")
    if quantize == "int4" and not cuda:
        raise ConfigError(f"generate.quantize: int4 needs a CUDA GPU (torchao has no CPU int4 kernel) and this job's "
                          f"engines run on {device}; set generate.quantize to int8, none or auto")
    compile = gen.compile
    if compile == "auto":
        compile = "full" if cuda else "eager"
    elif isinstance(compile, bool):
        compile = "full" if compile else "eager"
    return EngineSettings(device, quantize, compile)


def local_device() -> str:
    """Where an in-process Ray's actors run: this machine's GPU if it has one."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def preflight(cfg) -> EngineSettings | None:
    """The checks of a generate config that need no data and no Ray (the CLI runs them first):
    the engine settings for this machine when Ray runs in-process; None for a cluster, whose
    devices are known once Ray is up."""
    import os

    cluster = cfg.ray.address or os.environ.get("RAY_ADDRESS")  # as tasks.ray_jobs.ray_started decides
    return None if cluster else engine_settings(cfg.generate, local_device())


def job_config(cfg, settings: EngineSettings) -> dict:
    """What determines the rows (stored in the manifest; a rerun with other values is refused).
    quantize and compile are the resolved ones: `auto` on a CPU and `none` are the same rows, and
    int4 rows are never resumed with int8 ones."""
    gen = cfg.generate.model_dump(exclude={"workers", "contact_sheet_pairs", "max_batch", "prefill_tokens"})
    gen["rewrite"] = {k: gen["rewrite"][k] for k in ("endpoint", "model", "system_prompt")}
    gen.update(quantize=settings.quantize, compile=settings.compile)
    for key in ("min_p", "map_guidance"):  # off: the rows are those of the versions before it, which can resume them
        if not gen[key]:
            del gen[key]
    return {"models": cfg.models.model_dump(), "generate": gen, "evaluate": cfg.evaluate.model_dump()}


def sampling_of(gen, task: str) -> dict:
    out = {"cfg": gen.cfg_for(task), "temperature": gen.temperature, "top_k": gen.top_k, "min_p": gen.min_p, "sjd": gen.sjd, "window": gen.sjd_window,
           "drafts": gen.sjd_drafts, "tree": gen.sjd_tree}
    if gen.guides_map(task):  # only where it applies: rows without it read as they always have
        out["map_guidance"] = "empty"
    return out


# ---------------------------------------------------------------------------------------------
# The actor


@dataclass
class Parts:
    """What an actor loads once: the engine, the layout, MoVQGAN and the model's fingerprint."""

    engine: Any
    layout: Any
    movqgan: Any
    fingerprint: str
    device: str = "cpu"
    quantize: str = "none"

    def engine_params(self) -> dict:
        """What a row records of the engine that made it: the quantization, the compile mode that
        ran (after any fallback: model/engine.py) and the dtype it computed in (bf16 as stored, or
        float32 on a CPU without bf16 kernels: the draws differ between the two)."""
        params = {"quantize": self.quantize, "compile": getattr(self.engine, "compile_mode", "eager")}
        dtype = getattr(self.engine, "cache_dtype", None)
        if dtype is not None:
            params["dtype"] = str(dtype).removeprefix("torch.")
        return params


def checkpoint_layout_fingerprint(meta: dict | None) -> str | None:
    """The layout fingerprint a checkpoint's panelforge.json records (None for the release's folder)."""
    meta = meta or {}
    layout = meta.get("layout")
    return meta.get("layout_fingerprint") or (layout.get("fingerprint") if isinstance(layout, dict) else None) or meta.get("fingerprint")


def check_models(cfg) -> str:
    """Fail before Ray or any GPU is claimed when the weights the config names are absent or do
    not fit its layout or MoVQGAN; returns the model fingerprint, computed here once for every
    actor. It reads every weight file once (sha256 at about 1 GB/s: seconds for the 7B release)."""
    from model.layout import Layout
    from storage.hashing import file_sha256

    m = cfg.models
    if not m.decoder_path or not (Path(m.decoder_path) / "config.json").is_file():
        raise RequestError(f"models.decoder_path {m.decoder_path!r}: not a transformers-format decoder folder "
                           "(config.json + model.safetensors); point it at a trained checkpoint")
    if not m.movqgan_path or not Path(m.movqgan_path).is_file():
        raise RequestError(f"models.movqgan_path {m.movqgan_path!r}: no such MoVQGAN checkpoint file")
    meta_file = Path(m.decoder_path) / "panelforge.json"
    meta = json.loads(meta_file.read_text()) if meta_file.is_file() else {}
    fp = checkpoint_layout_fingerprint(meta)
    layout = Layout.from_config(m)
    if fp and fp != layout.fingerprint:
        raise RequestError(f"{m.decoder_path}: decoder was trained with layout {fp}, the config's layout is "
                           f"{layout.fingerprint}; use the tokenizer it was trained with (models.tokenizer[_path])")
    # A decoder learned one MoVQGAN's codes; another MoVQGAN decodes them to noise. Our exports
    # record the sha256 of the MoVQGAN that tokenized their data (the release's folder: none).
    movqgan_sha256 = file_sha256(m.movqgan_path)
    want = (meta.get("movqgan") or {}).get("sha256")
    if want and movqgan_sha256 != want:
        raise RequestError(f"{m.decoder_path}: decoder was trained on the codes of MoVQGAN "
                           f"{meta['movqgan'].get('weights')!r} (sha256 {want[:12]}...), models.movqgan_path "
                           f"{m.movqgan_path!r} is another; use the MoVQGAN its tokens were made with")
    return model_fingerprint(m.decoder_path, movqgan_sha256, layout.fingerprint)


def load_parts(cfg, fingerprint: str | None = None, settings: EngineSettings | None = None) -> Parts:
    """Load the decoder named by the config (transformers-format folder), quantize it, wrap it in
    the engine. `fingerprint`, `settings`: the driver's answers (None: computed here)."""
    from model.hf_checkpoint import generation_dtype, load_decoder
    from model.layout import Layout
    from model.movqgan import load_movqgan

    m = cfg.models
    if not m.decoder_path:
        raise RequestError("models.decoder_path is not set: name a transformers-format decoder folder")
    if not m.movqgan_path:
        raise RequestError("models.movqgan_path is not set: name a MoVQGAN checkpoint (.ckpt/.pt/.safetensors)")
    device = local_device()
    settings = settings or engine_settings(cfg.generate, device)
    if settings.device != device:  # the driver counted GPUs this actor does not see
        raise RequestError(f"generate: the job was set up for {settings.device} engines, this actor has {device}")
    layout = Layout.from_config(m)
    # float32 on a CPU without bf16 kernels (several times faster there), else the checkpoint's dtype
    model, meta = load_decoder(m.decoder_path, device=device, dtype=generation_dtype(device))
    fp = checkpoint_layout_fingerprint(meta)
    if fp and fp != layout.fingerprint:
        raise RequestError(
            f"{m.decoder_path}: decoder was trained with layout {fp}, the config's layout is {layout.fingerprint}; "
            "use the tokenizer the checkpoint was trained with (models.tokenizer, models.tokenizer_path)"
        )
    movq = load_movqgan(m.movqgan_path, m.movqgan_preset, device=device, config=m.movqgan)
    engine = build_engine(model, layout, cfg.generate, settings)
    return Parts(engine, layout, movq, fingerprint or check_models(cfg), device, settings.quantize)


def build_engine(model, layout, gen, settings: EngineSettings):
    """The job's engine: the model quantized as settings say, the batch as large as gen.max_batch
    asks and the device's free memory allows (Engine.fit_batch, the one place that computes it),
    the prefill chunked to gen.prefill_tokens."""
    from model.engine import Engine
    from model.quantize import quantize_decoder
    from model.sjd import parse_tree

    quantize_decoder(model, settings.quantize)
    max_batch = batch_that_fits(model, layout, gen, settings.device)
    siblings, branch = parse_tree(gen.sjd_tree)
    return Engine(model, layout, max_batch=max_batch, device=settings.device, compile=settings.compile != "eager",
                  window=gen.sjd_window, kv_bucket=gen.kv_bucket, prefill_tokens=gen.prefill_tokens,
                  tree_siblings=siblings, tree_branch=branch)


def batch_that_fits(model, layout, gen, device: str) -> int:
    """The engine's batch: gen.max_batch on a CPU (8 for `auto`); on CUDA as many slots as the free
    memory holds beside the loaded weights (Engine.fit_batch), at most gen.max_batch when it is a
    number."""
    import torch

    from model.engine import Engine
    from model.sjd import parse_tree

    if device != "cuda":
        return 8 if gen.max_batch == "auto" else gen.max_batch
    free = torch.cuda.mem_get_info()[0]
    siblings, branch = parse_tree(gen.sjd_tree)  # the step feeds the window and the tree's branches
    fits = Engine.fit_batch(model, max_seq=model.args.max_seq_len, free_bytes=free,
                            window=gen.sjd_window + siblings * branch,
                            n_local=layout.codebook_size + 2, prefill_tokens=gen.prefill_tokens)
    if fits < 1:
        raise RequestError(f"generate: not one engine slot ({model.args.max_seq_len} positions) fits the "
                           f"{free / 2**30:.1f} GiB free beside the weights; use generate.quantize int4 or a larger GPU")
    if gen.max_batch == "auto":
        return fits
    if gen.max_batch > fits:
        log.warning("generate: generate.max_batch %d does not fit the free memory; running %d (Engine.fit_batch)",
                    gen.max_batch, fits)
    return min(gen.max_batch, fits)


def model_fingerprint(decoder_path: str, movqgan_sha256: str, layout_fingerprint: str) -> str:
    """16 hex digits naming what made the images: the decoder's weights and config, the MoVQGAN's
    weights (their sha256) and the layout, by content (the same files anywhere give the same
    fingerprint)."""
    from storage.hashing import file_sha256

    h = hashlib.sha256(f"{layout_fingerprint}|{movqgan_sha256}".encode())
    folder = Path(decoder_path)
    for path in sorted(p for p in folder.iterdir() if p.name == "config.json" or p.suffix == ".safetensors"):
        h.update(f"|{path.name}:{file_sha256(str(path))}".encode())
    return h.hexdigest()[:16]


class GenerateWorker:
    """Ray actor: one unit of pairs -> samples -> best-of-N -> one shard + rejects."""

    def __init__(self, cfg: dict, out_uri: str, parts: Parts | None = None, fingerprint: str | None = None,
                 settings: dict | None = None):
        from tasks.config import PipelineConfig
        from tasks.generate.verify import make_scorers

        self.cfg = PipelineConfig.model_validate(cfg)
        self.out_uri = out_uri
        self.parts = parts or load_parts(self.cfg, fingerprint, EngineSettings(**settings) if settings else None)
        self.scorers = make_scorers(self.cfg)
        self.node = _node_id()
        # pyarrow's first conversion from Python objects imports pandas (about 0.3 s): an actor's
        # start-up cost, paid here with the models' loading rather than in its first unit.
        import pyarrow as pa

        pa.array([0])

    def __call__(self, unit: dict) -> dict:
        from storage import write_shard

        t0 = time.perf_counter()
        pairs = [PairSpec.from_dict(d) for d in unit["pairs"]]
        rows, rejects, stats = self.run_pairs(pairs)
        t_write = time.perf_counter()
        import pyarrow as pa

        from storage.schemas import GENERATED

        table = pa.Table.from_pylist(rows, schema=GENERATED) if rows else None
        info = write_shard(self.out_uri, unit["unit"], table, rejects, kind="generated")
        stats.update(write_s=time.perf_counter() - t_write, unit_s=time.perf_counter() - t0, node=self.node)
        return {"info": info, "stats": stats}

    def run_pairs(self, pairs: list[PairSpec]) -> tuple[list[dict], list[dict], dict]:
        """Generate, decode, verify and choose for a list of pairs (no I/O): rows, rejects, stats."""
        from tasks.generate.verify import best_index, passes, scorer_for

        gen = self.cfg.generate
        requests, owner = [], {}
        t0 = time.perf_counter()
        for p in pairs:
            n = gen.best_of if scorer_for(self.scorers, p.task) else 1
            for j, req in enumerate(pair_requests(p, self.parts.layout, self.parts.movqgan, gen, n)):
                owner[req.id] = (p, j)
                requests.append(req)
        t_gen = time.perf_counter()
        results = {r.id: r for r in self.parts.engine.generate(iter(requests))}
        t_dec = time.perf_counter()
        images = self._decode([r for r in results.values() if r.error is None])
        t_ver = time.perf_counter()

        rows, rejects = [], []
        samples: dict[str, list] = {}
        for rid, (p, j) in owner.items():
            samples.setdefault(p.id, []).append((j, results.get(rid), images.get(rid)))
        stats = {"pairs": len(pairs), "samples": len(requests), "rows": 0, "rejected": 0, "tokens": 0, "steps": 0}
        for p in pairs:
            got = [(j, r, img) for j, r, img in samples[p.id] if r is not None and img is not None]
            for _, r, _ in got:
                stats["tokens"] += r.tokens
                stats["steps"] += r.steps
            if not got:
                errors = sorted({(r.error if r is not None else "no result") for _, r, _ in samples[p.id]})
                rejects.append(_reject(p, "generate", "engine_error", "; ".join(e for e in errors if e)))
                continue
            uppers, lowers = zip(*(self._panels(p, img) for _, _, img in got))
            scorer = scorer_for(self.scorers, p.task)
            scores = [scorer.score(p.task, u, lo, p.caption) for u, lo in zip(uppers, lowers)] if scorer else []
            k = best_index(scorer, scores) if scorer else 0
            j, r, _ = got[k]
            score = float(scores[k]) if scorer else None
            if scorer and not passes(scorer, score, gen.thresholds):
                detail = {"scorer": scorer.name, "score": round(score, 4), "threshold": gen.thresholds[scorer.name], "seed": sample_seed(p.seed, j)}
                rejects.append(_reject(p, "verify", "below_threshold", json.dumps(detail)))
                continue
            params = dict(p.params, best_of=len(got), sample=j, pair_seed=p.seed, **self.parts.engine_params())
            if scorer:
                params.update(scorer=scorer.name, scores=[round(float(s), 4) for s in scores])
            rows.append(
                {
                    "id": p.id, "task": p.task, "prompt": p.prompt, "caption": p.caption,
                    "width": p.width, "height": p.height,
                    "upper": p.upper if p.upper is not None else _png(uppers[k]),
                    "lower": _png(lowers[k]) if lowers[k] is not None else None,
                    "source": f"generated:{p.source}", "params": json.dumps(params),
                    "seed": sample_seed(p.seed, j), "sampling": json.dumps(sampling_of(gen, p.task)),
                    "model_fingerprint": self.parts.fingerprint, "sjd_steps": r.steps,
                    "sjd_acceptance": (r.tokens / r.steps) if r.steps else None, "seconds": r.seconds, "score": score,
                }
            )
        stats.update(
            rows=len(rows), rejected=len(rejects), prep_s=t_gen - t0, generate_s=t_dec - t_gen,
            decode_s=t_ver - t_dec, verify_s=time.perf_counter() - t_ver,
            reasons=_count(r["reason"] for r in rejects),
        )
        return rows, rejects, stats

    def _decode(self, results: list) -> dict[str, np.ndarray]:
        """Codes -> uint8 images [H, W, 3], batched by grid size."""
        import torch

        from model.movqgan import to_uint8

        by_shape: dict[tuple, list] = {}
        for r in results:
            by_shape.setdefault(tuple(r.codes.shape), []).append(r)
        out = {}
        for group in by_shape.values():
            for start in range(0, len(group), 8):
                chunk = group[start : start + 8]
                codes = torch.as_tensor(np.stack([r.codes for r in chunk]), dtype=torch.long, device=self.parts.device)
                with torch.inference_mode():
                    imgs = to_uint8(self.parts.movqgan.decode(codes))
                for r, img in zip(chunk, imgs):
                    out[r.id] = np.asarray(img)
        return out

    @staticmethod
    def _panels(p: PairSpec, image: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """(upper, lower) of a generated image: the given upper panel stays the one given."""
        from model.prompts import is_dual

        if not is_dual(p.task):
            return image, None
        half = image.shape[0] // 2
        upper = np.asarray(_open_rgb(p.upper)) if p.upper is not None else image[:half]
        return upper, image[half:]


def pair_requests(p: PairSpec, layout, movqgan, gen, n: int = 1) -> list:
    """The engine requests of a pair's n samples (ids "<pair id>|<j>"): its prompt, size and seeds,
    the upper panel MoVQGAN-encoded for image-to-image tasks, sampling as the config says. The job
    and the benchmarks (bench/bulk.py, bench/generate.py acceptance) build them here."""
    import torch

    from model.engine import Request

    upper_codes = uncond_upper = None
    if p.upper is not None:
        with torch.inference_mode():
            upper = np.array(_open_rgb(p.upper))
            upper_codes = movqgan.encode(upper[None])[0].cpu().numpy()
            if gen.guides_map(p.task):  # the unconditional branch sees an empty map (docs/evaluate.md)
                uncond_upper = movqgan.encode(np.zeros_like(upper)[None])[0].cpu().numpy()
    ids = layout.encode_prompt(p.prompt)
    return [Request(id=f"{p.id}|{j}", prompt_ids=ids, height=p.height, width=p.width, upper_codes=upper_codes,
                    uncond_upper_codes=uncond_upper,
                    seed=sample_seed(p.seed, j), cfg=gen.cfg_for(p.task), temperature=gen.temperature, top_k=gen.top_k,
                    min_p=gen.min_p, sjd=gen.sjd, window=gen.sjd_window, drafts=gen.sjd_drafts, task=p.task) for j in range(n)]


def _open_rgb(data: bytes):
    from PIL import Image

    return Image.open(io.BytesIO(data)).convert("RGB")


def _png(arr: np.ndarray) -> bytes:
    from tasks.generate.requests import png_bytes

    return png_bytes(arr)


def _reject(p: PairSpec, stage: str, reason: str, detail: str) -> dict:
    return {"input_ref": p.id, "stage": stage, "reason": reason, "detail": detail}


def _count(items) -> dict[str, int]:
    out: dict[str, int] = {}
    for x in items:
        out[x] = out.get(x, 0) + 1
    return out


def _node_id() -> str | None:
    try:
        import ray

        return ray.get_runtime_context().get_node_id() if ray.is_initialized() else None
    except Exception:
        return None


# ---------------------------------------------------------------------------------------------
# The driver


def run_generate(cfg, progress: Callable[[dict], None] | None = None, worker_cls: type = GenerateWorker) -> dict:
    """Run (or resume) the whole job; returns a small summary (URIs, counts, rates, statistics)."""
    from tasks.ray_jobs import ray_started
    from tasks.generate.rewrite import make_rewriter

    t0 = time.perf_counter()
    gen = cfg.generate
    settings = preflight(cfg)  # int4 asked on a CPU fails here, before anything is read or written
    rewriter = make_rewriter(cfg)
    expanded = expand_inputs(cfg, rewrite=rewriter)  # all validation happens here, before any model
    if not expanded.pairs:
        raise RequestError(no_valid_rows_message(expanded))
    for r in expanded.rejects:
        log.warning("rejected %s: %s (%s)", r["input_ref"], r["reason"], r["detail"])
    fingerprint = check_models(cfg)
    units = make_units(expanded.pairs, gen.pairs_per_unit)
    uri = output_uri(cfg)
    job_digest = hashlib.sha256("\n".join(p.id for p in expanded.pairs).encode()).hexdigest()[:16]
    with contextlib.ExitStack() as ray_scope:
        if settings is None:  # a cluster: its devices decide, so Ray starts before the dataset is opened
            ray_scope.enter_context(ray_started(cfg.ray))
            settings = engine_settings(gen, "cuda" if _cluster_gpus() else "cpu")
        return _run_units(cfg, settings, expanded, units, uri, job_digest, fingerprint, rewriter, progress,
                          worker_cls, ray_scope, t0)


def check_resume(uri: str, settings: EngineSettings) -> None:
    """A dataset begun with other engine settings is not resumed: its rows would mix two models
    (int4 and int8 weights sample differently). Said here by name; the writer's own check then
    covers every other field of the config."""
    from storage import DatasetNotFoundError, read_manifest, resolve

    try:
        made = read_manifest(resolve(uri)).get("config", {}).get("generate", {})
    except DatasetNotFoundError:
        return
    asked = {"quantize": settings.quantize, "compile": settings.compile}
    differ = {k: (made.get(k), v) for k, v in asked.items() if k in made and made[k] != v}
    if differ:
        what = ", ".join(f"generate.{k} {old!r} (this run: {new!r})" for k, (old, new) in differ.items())
        raise RequestError(f"{uri}: its rows were generated with {what}; rerun with those settings to resume it, "
                           "or write to another generate.output")


def _cluster_gpus() -> int:
    import ray

    return int(ray.cluster_resources().get("GPU", 0))


def _run_units(cfg, settings, expanded, units, uri, job_digest, fingerprint, rewriter, progress, worker_cls,
               ray_scope, t0) -> dict:
    from storage import DatasetWriter
    from tasks.ray_jobs import map_units, ray_started

    gen = cfg.generate
    log.info("generate: engines on %s, quantize %s, compile %s", settings.device, settings.quantize, settings.compile)
    check_resume(uri, settings)
    writer = DatasetWriter(uri, kind="generated", config=job_config(cfg, settings), inputs=_input_manifests(cfg),
                           meta={"job": job_digest, "pairs": len(expanded.pairs), "units": len(units)})
    if REQUEST_UNIT not in writer.done_units:
        writer.write_unit(REQUEST_UNIT, None, expanded.rejects or None)
    done = writer.done_units
    todo = [u for u in units if u["unit"] not in done]
    n_todo = len(todo)
    state = {"total_units": len(units), "done_units": len(units) - len(todo), "total_pairs": len(expanded.pairs),
             "pairs_done": sum(len(u["pairs"]) for u in units if u["unit"] in done), "pairs_this_run": 0,
             "rows": 0, "rejected": 0, "samples": 0, "tokens": 0, "steps": 0, "generate_s": 0.0, "unit_s": 0.0,
             "reasons": {}, "nodes": {}, "started": time.time()}
    log.info("generate: %d pairs in %d units, %d already done -> %s", len(expanded.pairs), len(units), state["done_units"], uri)
    _report(state, progress)
    if todo:
        ray_scope.enter_context(ray_started(cfg.ray))  # (a no-op when the cluster's Ray is already up)
        gpus = _cluster_gpus() if settings.device == "cuda" else 0
        workers = gpus if gpus else gen.workers
        for attempt in range(gen.job_retries + 1):
            todo = [u for u in units if u["unit"] not in writer.done_units]
            if not todo:
                break
            try:
                for result in map_units(todo, worker_cls, actor_args=(cfg.model_dump(), uri),
                                        actor_kwargs={"fingerprint": fingerprint, "settings": settings.to_dict()},
                                        num_workers=workers, num_gpus=1 if gpus else 0, num_cpus=1):
                    writer.commit(result["info"])
                    log.info("generate: unit %s committed (node %s, %.1f s)", result["info"]["unit"],
                             result["stats"].get("node"), result["stats"]["unit_s"])
                    _account(state, result["stats"])
                    _report(state, progress)
            except Exception as e:  # a lost node can fail the whole Ray Data run: resume the rest
                if attempt == gen.job_retries or not _is_ray_failure(e):
                    raise
                log.warning("generate: Ray failure (%s: %s); rerunning the %d units not committed",
                            type(e).__name__, str(e)[:200], len([u for u in units if u["unit"] not in writer.done_units]))
    fixed = reconcile(writer, {u["unit"] for u in units} - done)
    manifest = writer.finalize(pairs=len(expanded.pairs), request_rejects=len(expanded.rejects), recommitted=fixed)
    elapsed = time.perf_counter() - t0
    rows = sum(e["rows"] for e in manifest["shards"])
    rej_by_reason: dict[str, int] = {}
    for e in manifest["rejects"]:
        for k, v in e.get("reasons", {}).items():
            rej_by_reason[k] = rej_by_reason.get(k, 0) + v
    return {
        "uri": uri, "pairs": len(expanded.pairs), "rows": rows, "rejects": rej_by_reason,
        "request_summary": expanded.summary(), "units": len(units), "units_this_run": n_todo,
        "pairs_this_run": state["pairs_this_run"], "samples_this_run": state["samples"],
        "seconds": round(elapsed, 2),
        "pairs_per_hour": round(3600 * state["pairs_this_run"] / elapsed, 1) if state["pairs_this_run"] else None,
        "acceptance": round(state["tokens"] / state["steps"], 3) if state["steps"] else None,
        "kept_rate": round(state["rows"] / state["pairs_this_run"], 4) if state["pairs_this_run"] else None,
        "rows_per_task": _rows_per_task(manifest),
        "nodes": state["nodes"], "rewrite": rewriter.stats if rewriter else None,
    }


def reconcile(writer, units: set[str]) -> int:
    """Re-hash the files of the units run now; re-commit any that changed after its commit.

    A worker on a node that Ray declared dead can still finish its unit and rename its shard over
    the retry's (a zombie writer on shared storage). Either file is a whole, valid generation of
    the unit (written atomically), but its hash is not the committed one (timings differ). Hashing
    is negligible beside generating the images; returns the number of entries re-committed."""
    from storage import rehash

    fixed = 0
    for unit in sorted(units & writer.done_units):
        info = {"unit": unit, "shard": None, "rejects": None}
        changed = False
        for key, single in (("shards", "shard"), ("rejects", "rejects")):
            entry = next((dict(e) for e in writer.manifest[key] if e["unit"] == unit), None)
            if entry is None:
                continue
            fresh = rehash(writer.loc, entry)
            if fresh is not None:
                log.warning("generate: %s was rewritten after its commit (a worker of a lost node); re-committed", entry["file"])
                entry = fresh
                changed = True
            info[single] = entry
        if changed:
            writer.commit(info)
            fixed += 1
    return fixed


def _account(state: dict, s: dict) -> None:
    state["done_units"] += 1
    state["pairs_done"] += s["pairs"]
    state["pairs_this_run"] += s["pairs"]
    for k in ("rows", "rejected", "samples", "tokens", "steps", "generate_s", "unit_s"):
        state[k] += s[k]
    for k, v in s["reasons"].items():
        state["reasons"][k] = state["reasons"].get(k, 0) + v
    node = str(s.get("node"))
    state["nodes"][node] = state["nodes"].get(node, 0) + 1


def _is_ray_failure(e: Exception) -> bool:
    """Worth a resume: anything but bad inputs or a broken dataset (a lost node surfaces as Ray
    Data errors of several types; a resume only redoes units that were not committed)."""
    from ray.data.exceptions import UserCodeException

    from storage import StorageError

    return not isinstance(e, (RequestError, StorageError, UserCodeException))


def _report(state: dict, progress: Callable[[dict], None] | None) -> None:
    elapsed = max(time.time() - state["started"], 1e-9)
    rate = state["pairs_this_run"] / elapsed
    left = state["total_pairs"] - state["pairs_done"]
    snap = {
        "done_pairs": state["pairs_done"], "total_pairs": state["total_pairs"], "done_units": state["done_units"],
        "total_units": state["total_units"], "pairs_per_hour": 3600 * rate,
        "eta_s": (left / rate) if rate > 0 else None, "rows": state["rows"], "rejected": state["rejected"],
        "reasons": dict(state["reasons"]),
        "acceptance": (state["tokens"] / state["steps"]) if state["steps"] else None,
    }
    log.info("generate: %d/%d pairs, %.0f pairs/hour", snap["done_pairs"], snap["total_pairs"], snap["pairs_per_hour"])
    if progress:
        progress(snap)


def _rows_per_task(manifest: dict) -> dict[str, int]:
    out: dict[str, int] = {}
    for e in manifest["shards"]:
        for k, v in e.get("rows_per_task", {}).items():
            out[k] = out.get(k, 0) + v
    return out


def _input_manifests(cfg) -> list[dict]:
    spec = cfg.generate.inputs
    if spec.get("kind") != "panels":
        return []
    from storage import open_dataset

    return [open_dataset(spec.get("uri") or cfg.dataset_uri("panels")).manifest]


def main() -> None:
    import argparse

    import sys

    from tasks.panels.job import contact_sheet  # one contact sheet for panels and generated pairs
    from tasks.config import ConfigError, load_config

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="configs/tiny.yaml")
    ap.add_argument("overrides", nargs="*", help="KEY=VALUE, e.g. generate.best_of=2")
    args = ap.parse_args()
    try:
        cfg = load_config(args.config, args.overrides)
        preflight(cfg)
    except ConfigError as e:
        sys.exit(f"tasks.generate.job: error: {e}")
    summary = run_generate(cfg)
    summary["contact_sheet"] = contact_sheet(summary["uri"], cfg.generate.contact_sheet_pairs)
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
