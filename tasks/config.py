"""Typed pipeline configuration, loaded from YAML with command-line overrides.

    python -c "from tasks.config import load_config; print(load_config('configs/tiny.yaml'))"

One file drives a whole run (configs/tiny.yaml, configs/7b.yaml). Each pipeline stage owns
one section model below; unknown keys are errors, so a typo never silently falls back to a
default. Errors name the file, the field and what was expected.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator


class ConfigError(ValueError):
    """A config file or override that does not validate; the message names file and field."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())


class RayConfig(Section):
    address: str | None = None  # None: start Ray in-process; "auto" or "ray://..." for a cluster
    num_cpus: int | None = 2  # only for the in-process instance
    object_store_mb: int = 512
    include_dashboard: bool = False


class ModelsConfig(Section):
    """Where the weights come from: local paths only (nothing is ever downloaded)."""

    movqgan_preset: str = "tiny"  # tiny, 67m, 102m, 270m
    movqgan_path: str | None = None  # .ckpt/.pt flat state_dict or .safetensors
    tokenizer: str = "shapes"  # shapes | qwen-offline | hf (a local folder in tokenizer_path)
    tokenizer_path: str | None = None
    # First image-code id; None: 155000 for the release's tokenizers, right after the vocabulary for
    # shapes (model/layout.py).
    code_offset: int | None = None
    decoder_preset: str = "tiny"  # tiny, 2b, 7b
    decoder_path: str | None = None  # a transformers-format folder (the release's format)


class PanelsConfig(Section):
    """build_panels (issue 3)."""

    # shapes {count, seed, aspect} | folder {path, captions} | edits {path} | subjects {path} | generated {uri}
    source: dict[str, Any] = Field(default_factory=lambda: {"kind": "shapes", "count": 64, "seed": 0})
    rows_per_unit: int = 32
    stage_size: int = 256  # buckets of about stage_size^2 pixels (model/buckets.py)
    # Shapes rows spread round-robin over these stage sizes, so one dataset feeds every stage of a
    # staged training (e.g. [64, 96, 128]); None: every row at stage_size.
    stage_sizes: list[int] | None = None
    output: str = "panels"  # dataset name under the workdir, or a URI
    # The mix: task -> weight; tasks a source cannot make are left out (docs/panels.md).
    tasks: dict[str, float] = Field(default_factory=lambda: {
        "t2i": 1.0, "control:canny": 1.0, "control:depth": 1.0, "control:hed": 1.0,
        "dense:depth": 1.0, "dense:canny": 1.0, "edit": 1.0, "subject": 1.0})
    t2i_unsized: float = 0.1  # share of t2i prompts without the size (paper, Table 3 note)
    canny_low: int = 100
    canny_high: int = 200
    soft_edge_sigma: float = 1.5
    depth_model: str | None = None  # local transformers depth-estimation folder (Depth Anything, DPT)
    depth_device: str = "auto"
    image_format: Literal["png", "webp", "jpeg"] = "png"
    png_level: int = Field(3, ge=0, le=9)
    max_pixels: int = 50_000_000  # decompression-bomb limit, checked from the header before decoding
    max_upscale: float = 1.0  # images that need more upscaling than this to fill their panel: too_small
    max_prompt_chars: int = 1200  # the prompt budget (~300 Qwen tokens of English)
    workers: int = 2
    num_gpus: float = 0  # per worker; 1 puts the depth model on a GPU
    contact_sheet: int = 16  # sample panels in the contact sheet
    overwrite: bool = False  # start the dataset afresh instead of resuming it


class TokenizeConfig(Section):
    """pretokenize (issue 4)."""

    batch_size: int = 8  # images per MoVQGAN forward
    workers: int = 2  # encoder actors (one model each); on GPUs, one per GPU
    num_gpus: float = 0  # per actor; 0 on CPU machines
    rows_per_unit: int = 64  # panels rows per work unit (units never mix resolution buckets)
    max_seq: int = 10240  # the decoder's context: longer samples are rejected (too_long)
    input: str = "panels"  # dataset name under the workdir, or a URI
    output: str = "tokens"
    decode_threads: int = 2  # PNG/JPEG decoding threads per actor, overlapping the encoder
    decode_workers: int = 1  # Ray: CPU actors decoding units ahead of the encoder actors
    compile: bool = False  # torch.compile the encoder (GPU)
    overwrite: bool = False  # start the tokens dataset afresh instead of resuming it


class StageConfig(Section):
    """One training stage (paper 5.1): its resolution buckets, learning rate and length."""

    name: str = ""  # default "stage-<k>"
    px: int = 256  # buckets: model.buckets.buckets_for(px), unless `buckets` lists "WxH" names
    buckets: list[str] | None = None
    lr: float = 2e-4
    warmup_steps: int = 0
    decay: Literal["cosine", "linear", "constant"] = "cosine"
    min_lr_ratio: float = 0.1
    steps: int | None = None  # optimizer steps; or `samples` (rounded up to whole global batches)
    samples: int | None = None
    global_batch: int = 8  # samples per optimizer step = micro_batch x accumulation x workers
    micro_batch: int = 2


class TrainConfig(Section):
    """train (issue 5): Ray Train stages on tokens/ (docs/train.md)."""

    workers: int = 2  # Ray Train workers (one per GPU); 0 runs in this process without Ray
    use_gpu: bool = False
    dataset: str = "tokens"  # dataset name under the workdir, or a URI
    run: str = "train"  # checkpoints and exports go to <workdir>/runs/<run>/stage-<k>/
    seed: int = 0
    model_overrides: dict[str, Any] = Field(default_factory=dict)  # ModelArgs fields over the preset
    init_from: str | None = None  # a transformers-format folder to start stage 1 from (models.decoder_path if None)
    betas: tuple[float, float] = (0.9, 0.95)
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    z_loss: float = 1e-5
    cfg_drop: float = 0.1  # share of samples that keep only their image part (CFG)
    loss_chunk: int = 2048  # supervised positions per chunk of the output head
    pad_multiple: int = 8
    # Static shapes (GPUs: one compiled graph per stage): each step's samples packed into rows of
    # one length per stage (pack_length, default the stage's longest sample), micro_batch rows a
    # micro batch, attention kept inside each sample (model/training.py make_packed_batches).
    pack: bool = False
    pack_length: int | None = None
    checkpoint_every: int = 50  # optimizer steps between checkpoints (tasks/checkpoints.py: safetensors + JSON)
    keep_checkpoints: int = 2
    compile: bool = True  # GPU only: torch.compile each layer
    # none | selective (matmul and attention outputs kept) | full (layer inputs kept) | auto: the
    # least recompute that fits the GPU's memory at the stage's longest micro batch (none on CPUs);
    # true/false mean full/none (model/training.py, docs/train.md).
    activation_checkpointing: Literal["auto", "none", "selective", "full"] | bool = "auto"
    mixed_precision: bool = True  # GPU only: bf16 params, fp32 reduce
    peak_tflops: float | None = None  # for MFU; None: datasheet (GPU) or measured (CPU)
    export_dtype: Literal["bfloat16", "float32"] = "bfloat16"
    max_failures: int = 3  # Ray Train restarts of the worker group after a lost worker (each resumes from the
    # newest checkpoint); -1: no limit, 0: fail the run at once (a rerun resumes)
    max_nonfinite: int = 5  # a non-finite loss skips the step; this many in a row stop the run
    fault: str | None = None  # "stage:step": kill a worker after that step (resume tests only)
    stages: list[StageConfig] = Field(default_factory=list)


class RewriteConfig(Section):
    """Prompt rewriting before generation (issue 7, paper 4.3.1): an OpenAI-compatible endpoint."""

    endpoint: str | None = None  # e.g. http://127.0.0.1:8000/v1; None: no rewriting
    model: str = "gpt-4o-mini"
    system_prompt: str = (
        "Rewrite the user's image prompt into one richer, concrete description of the same scene. "
        "Reply with the description only."
    )
    api_key_env: str | None = "OPENAI_API_KEY"  # read from this environment variable, or
    api_key_secret: str | None = None  # the name of a Prefect Secret block
    timeout_s: float = 30.0
    cache_path: str | None = None  # default: <workdir>/rewrites.jsonl when the workdir is local


class GenerateConfig(Section):
    """generate (issues 6 and 7)."""

    cfg: float = 4.0
    temperature: float = 1.0
    top_k: int = 4096
    sjd: bool = True
    sjd_window: int = 16
    # The engine (issue 6, model/engine.py, docs/generate.md): weight-only quantization (int8 on CPU,
    # int4 on CUDA), torch.compile of the decode step (CUDA graphs, GPUs only), and the granularity
    # of the attended cache length (one compiled graph per bucket).
    quantize: Literal["none", "int8", "int4"] = "none"
    compile: bool = False
    kv_bucket: int = 512
    # Bulk jobs (issue 7): inputs, counts, best-of-N and the quality filter, work units.
    inputs: dict[str, Any] = Field(
        default_factory=lambda: {"kind": "shapes", "count": 4, "seed": 0, "tasks": ["t2i", "control:canny"]}
    )  # {kind: file, path} | {kind: panels, uri} | {kind: shapes, count, seed, tasks}
    output: str = "generated"  # dataset name under the workdir, or a URI
    size: str | None = None  # default WIDTHxHEIGHT for prompt rows that name none
    count_per_prompt: int = 1
    best_of: int = 1  # samples per pair; a verifier keeps the best (when one applies)
    scorer: str = "auto"  # auto | none | canny_f1 | depth_rmse | package.module:factory
    depth_estimator: str | None = None  # package.module:factory(cfg) -> fn(uint8 image) -> depth
    thresholds: dict[str, float] = Field(default_factory=dict)  # {scorer name: minimum (or max RMSE)}
    seed: int = 0
    pairs_per_unit: int = 16
    workers: int = 1  # engine actors on CPU; on GPUs one per GPU
    max_batch: int = 8  # the engine's continuous batch (sequences per actor)
    job_retries: int = 2  # reruns of the remaining units after a Ray failure (a lost node)
    max_side: int = 2048
    max_count: int = 1000
    max_pairs: int = 10_000_000
    contact_sheet_pairs: int = 16
    rewrite: RewriteConfig = Field(default_factory=RewriteConfig)


class EvaluateConfig(Section):
    """evaluate (issue 8): figures of a generated dataset (docs/evaluate.md)."""

    canny_low: int = 100
    canny_high: int = 200
    workers: int = 2  # scoring actors of the Ray job
    rows_per_unit: int = 64  # generated rows per work unit
    min_shape_frac: float = 0.004  # smallest region the shape detector counts, share of the picture
    sheet_rows: int = 4  # examples per control task in eval_control.png (twice that in eval_captions.png)


class PipelineConfig(Section):
    name: str = "default"
    # Root of every dataset and run of this config: a local folder or an object-store URI.
    workdir: str = "out/default"
    ray: RayConfig = Field(default_factory=RayConfig)
    models: ModelsConfig = Field(default_factory=ModelsConfig)
    panels: PanelsConfig = Field(default_factory=PanelsConfig)
    tokenize: TokenizeConfig = Field(default_factory=TokenizeConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    generate: GenerateConfig = Field(default_factory=GenerateConfig)
    evaluate: EvaluateConfig = Field(default_factory=EvaluateConfig)

    @model_validator(mode="after")
    def _absolute_local_paths(self) -> "PipelineConfig":
        """Relative local paths mean relative to where the command runs; Ray workers run in other
        folders, so they travel as absolute paths."""
        def absolute(value: str | None) -> str | None:
            if value is None or "://" in value:
                return value
            return str(Path(value).expanduser().resolve())

        self.workdir = absolute(self.workdir)
        for name in ("movqgan_path", "tokenizer_path", "decoder_path"):
            setattr(self.models, name, absolute(getattr(self.models, name)))
        self.train.init_from = absolute(self.train.init_from)
        return self

    def dataset_uri(self, name: str) -> str:
        """URI of a named dataset (panels, tokens, generated, ...) under the workdir."""
        return self.workdir.rstrip("/") + "/" + name


def _format_errors(source: str, err: ValidationError) -> str:
    lines = [f"{source}: invalid configuration"]
    for e in err.errors():
        field = ".".join(str(p) for p in e["loc"]) or "(top level)"
        got = e.get("input")
        got_s = "" if isinstance(got, dict) else f" (got {got!r})"
        lines.append(f"  {field}: {e['msg']}{got_s}")
    return "\n".join(lines)


def parse_override(text: str) -> tuple[list[str], Any]:
    """'train.workers=4' -> (['train', 'workers'], 4); the value is parsed as YAML."""
    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected KEY=VALUE, e.g. train.workers=4")
    key, value = text.split("=", 1)
    path = [p for p in key.strip().split(".") if p]
    if not path:
        raise ConfigError(f"override {text!r}: empty key")
    return path, yaml.safe_load(value) if value.strip() else None


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Set each KEY=VALUE in data; a numeric part indexes a list (train.stages.0.steps=5)."""
    for text in overrides:
        path, value = parse_override(text)
        node: Any = data
        for depth, part in enumerate(path):
            last = depth == len(path) - 1
            if isinstance(node, list):
                if not part.isdigit() or int(part) >= len(node):
                    raise ConfigError(f"override {text!r}: {part!r} is not an index of a list of {len(node)}")
                key: Any = int(part)
            elif isinstance(node, dict):
                key = part
            else:
                raise ConfigError(f"override {text!r}: {path[depth - 1]!r} is not a section")
            if last:
                node[key] = value
            else:
                if isinstance(node, dict) and node.get(key) is None:
                    node[key] = {}
                node = node[key]
    return data


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> PipelineConfig:
    """Load a YAML config (or the defaults when path is None) and apply KEY=VALUE overrides."""
    source = str(path) if path else "(defaults)"
    data: dict = {}
    if path:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"{source}: config file not found")
        try:
            loaded = yaml.safe_load(p.read_text())
        except yaml.YAMLError as e:
            raise ConfigError(f"{source}: not valid YAML: {e}") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"{source}: expected a mapping at the top level, got {type(loaded).__name__}")
        data = loaded or {}
    data = apply_overrides(data, overrides or [])
    try:
        return PipelineConfig.model_validate(data)
    except ValidationError as e:
        if overrides:
            source += " with overrides " + " ".join(overrides)
        raise ConfigError(_format_errors(source, e)) from None
