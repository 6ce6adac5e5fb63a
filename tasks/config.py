"""Typed pipeline configuration, loaded from YAML with command-line overrides.

    python -c "from tasks.config import load_config; print(load_config('configs/tiny.yaml'))"

One file drives a whole run (configs/tiny.yaml, configs/7b.yaml). Each pipeline stage owns
one section model below; unknown keys are errors, so a typo never silently falls back to a
default. Errors name the file, the field and what was expected, one line each.

Two layers of checks, both before a Prefect flow run is created or Ray starts (flows/cli.py):
the models themselves (types, ranges, source kinds and their fields, registered scorer names,
no credentials in any URI: what Prefect's UI also shows and validates for a deployment's
parameters), and `check_config(cfg, stage)`, the preflight of what the stage will touch on disk
(input paths present and readable, model files of the right kind, the workdir writable).
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    field_validator,
    model_validator,
)

from model.prompts import CONTROL_NAMES, TASK_KINDS, PromptError, split_task
from storage.uri import has_credentials, redact


class ConfigError(ValueError):
    """A config file or override that does not validate; the message names file and field."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())


# A path or URI field. Its JSON schema refuses `scheme://user:secret@...` too: Prefect's server
# validates a deployment run's parameters against the schema before it stores them, and never runs
# the Python validator below (PipelineConfig._no_credentials), so the secret is refused before it
# is stored. (The schema's regex is Python's, used by jsonschema; pydantic itself ignores it.)
NO_CREDENTIALS = r"^(?![A-Za-z][A-Za-z0-9+.-]*://\S*@)"
PathOrURI = Annotated[str, Field(json_schema_extra={"pattern": NO_CREDENTIALS})]
# A source spec's own strings (path, uri, ...) under the same rule.
_SPEC_SCHEMA = {"additionalProperties": {"pattern": NO_CREDENTIALS}}
# A KEY=VALUE override, for the flows' `overrides` parameter: no credentials anywhere in it.
Override = Annotated[str, Field(json_schema_extra={"pattern": r"^(?!.*[A-Za-z][A-Za-z0-9+.-]*://\S*@)"})]


# The source kinds of panels.source and generate.inputs: the fields each takes (tasks/panels/sources.py,
# tasks/generate/requests.py read them). A new kind is added here too, so a config naming it validates.
class _Spec(Section):
    kind: str


class ShapesSourceSpec(_Spec):
    count: int = Field(64, ge=1)
    seed: int = 0
    aspect: Literal["square", "mixed"] = "square"


class FolderSourceSpec(_Spec):
    path: str
    captions: str | None = None
    recursive: bool = False


class PairsSourceSpec(_Spec):
    path: str


class GeneratedSourceSpec(_Spec):
    uri: str


class WebDatasetSourceSpec(_Spec):
    path: str  # a folder of .tar shards, one .tar, or a brace range; local or s3
    caption_field: str = "caption"


class ParquetSourceSpec(_Spec):
    path: str  # a folder of .parquet files, one file, or a brace range; local or s3
    image_column: str | None = None
    caption_column: str | None = None
    id_column: str | None = None


class FileInputsSpec(_Spec):
    path: str  # a jsonl, csv or parquet file, or a folder of <id>.txt prompts
    count: int | None = Field(None, ge=1)  # its first N rows


class PanelsInputsSpec(_Spec):
    uri: str | None = None  # None: the workdir's panels dataset
    tasks: list[str] | None = None
    limit: int | None = Field(None, ge=0)


class ShapesInputsSpec(_Spec):
    count: int = Field(8, ge=1)
    seed: int = 0
    tasks: list[str] | None = Field(None, min_length=1)
    size: str | None = None


PANEL_SOURCES: dict[str, type[_Spec]] = {
    "shapes": ShapesSourceSpec, "folder": FolderSourceSpec, "edits": PairsSourceSpec,
    "subjects": PairsSourceSpec, "generated": GeneratedSourceSpec, "webdataset": WebDatasetSourceSpec,
    "parquet": ParquetSourceSpec,
}
GENERATE_INPUTS: dict[str, type[_Spec]] = {
    "file": FileInputsSpec, "panels": PanelsInputsSpec, "shapes": ShapesInputsSpec,
}


def _check_spec(field: str, spec: dict, kinds: dict[str, type[_Spec]]) -> dict:
    """Validate a source spec against its kind's fields; the spec itself is kept as written."""
    kind = spec.get("kind")
    if kind not in kinds:
        raise ValueError(f"{field}.kind: {kind!r} is not a source kind; expected one of {', '.join(kinds)}")
    try:
        kinds[kind].model_validate(spec)
    except ValidationError as e:
        first = e.errors()[0]
        name = ".".join(str(p) for p in first["loc"])
        got = first.get("input")
        got_s = "" if first["type"] == "missing" or isinstance(got, dict) else f" (got {redact(repr(got))})"
        raise ValueError(f"{field}.{name}: {first['msg']}{got_s} (kind {kind})") from None
    return spec


class RayConfig(Section):
    address: PathOrURI | None = None  # None: start Ray in-process; "auto" or "ray://..." for a cluster
    num_cpus: int | None = Field(2, ge=1)  # only for the in-process instance
    object_store_mb: int = Field(512, ge=75)  # Ray refuses object stores under 75 MB
    include_dashboard: bool = False


class ModelsConfig(Section):
    """Where the weights come from: local paths only (nothing is ever downloaded)."""

    movqgan_preset: str = "tiny"  # tiny, 67m, 102m, 270m
    movqgan_path: PathOrURI | None = None  # .ckpt/.pt flat state_dict or .safetensors
    # Any other MoVQGAN (issue 17): its architecture in the official keys (ch, ch_mult, num_res_blocks,
    # attn_resolutions, z_channels, embed_dim, n_embed); else a config beside the weights, else the preset.
    movqgan: dict[str, Any] | None = None
    tokenizer: Literal["shapes", "qwen-offline", "hf"] = "shapes"  # hf: a local folder in tokenizer_path
    tokenizer_path: PathOrURI | None = None
    # First image-code id; None: 155000 for the release's tokenizers, right after the vocabulary for
    # shapes (model/layout.py).
    code_offset: int | None = Field(None, ge=0)
    decoder_preset: str = "tiny"  # tiny, 2b, 7b
    decoder_path: PathOrURI | None = None  # a transformers-format folder (the release's format)


class PanelsConfig(Section):
    """build_panels (issue 3)."""

    # shapes {count, seed, aspect} | folder {path, captions} | edits {path} | subjects {path} | generated {uri}
    source: dict[str, Any] = Field(default_factory=lambda: {"kind": "shapes", "count": 64, "seed": 0},
                                   json_schema_extra=_SPEC_SCHEMA)
    rows_per_unit: int = Field(32, ge=1)
    stage_size: int = Field(256, ge=32)  # buckets of about stage_size^2 pixels (model/buckets.py)
    # Shapes rows spread round-robin over these stage sizes, so one dataset feeds every stage of a
    # staged training (e.g. [64, 96, 128]); None: every row at stage_size.
    stage_sizes: list[Annotated[int, Field(ge=32)]] | None = Field(None, min_length=1)
    output: PathOrURI = "panels"  # dataset name under the workdir, or a URI
    # The mix: task -> weight; tasks a source cannot make are left out (docs/panels.md).
    tasks: dict[str, float] = Field(default_factory=lambda: {
        "t2i": 1.0, "control:canny": 1.0, "control:depth": 1.0, "control:hed": 1.0,
        "dense:depth": 1.0, "dense:canny": 1.0, "edit": 1.0, "subject": 1.0})
    t2i_unsized: float = Field(0.1, ge=0, le=1)  # share of t2i prompts without the size (paper, Table 3 note)
    canny_low: int = Field(100, ge=0)
    canny_high: int = Field(200, ge=0)
    soft_edge_sigma: float = Field(1.5, gt=0)
    depth_model: PathOrURI | None = None  # local transformers depth-estimation folder (Depth Anything, DPT)
    depth_device: str = "auto"
    image_format: Literal["png", "webp", "jpeg"] = "png"
    png_level: int = Field(3, ge=0, le=9)
    max_pixels: int = Field(50_000_000, ge=1)  # decompression-bomb limit, checked from the header before decoding
    max_upscale: float = Field(1.0, gt=0)  # images that need more upscaling than this to fill their panel: too_small
    max_prompt_chars: int = Field(1200, ge=1)  # the prompt budget (~300 Qwen tokens of English)
    workers: int = Field(2, ge=1)
    num_gpus: float = Field(0, ge=0)  # per worker; 1 puts the depth model on a GPU
    contact_sheet: int = Field(16, ge=0)  # sample panels in the contact sheet
    overwrite: bool = False  # start the dataset afresh instead of resuming it

    @field_validator("source")
    @classmethod
    def _source_kind(cls, v: dict) -> dict:
        return _check_spec("panels.source", v, PANEL_SOURCES)

    @field_validator("tasks")
    @classmethod
    def _mix(cls, v: dict[str, float]) -> dict[str, float]:
        if any(w < 0 for w in v.values()) or not any(w > 0 for w in v.values()):
            raise ValueError("panels.tasks: weights must be >= 0 with at least one above 0")
        return v


class TokenizeConfig(Section):
    """pretokenize (issue 4)."""

    batch_size: int = Field(8, ge=1)  # images per MoVQGAN forward
    workers: int = Field(2, ge=1)  # encoder actors (one model each); on GPUs, one per GPU
    num_gpus: float = Field(0, ge=0)  # per actor; 0 on CPU machines
    rows_per_unit: int = Field(64, ge=1)  # panels rows per work unit (units never mix resolution buckets)
    max_seq: int = Field(10240, ge=2)  # the decoder's context: longer samples are rejected (too_long)
    input: PathOrURI = "panels"  # dataset name under the workdir, or a URI
    output: PathOrURI = "tokens"
    decode_threads: int = Field(2, ge=1)  # PNG/JPEG decoding threads per actor, overlapping the encoder
    decode_workers: int = Field(1, ge=1)  # Ray: CPU actors decoding units ahead of the encoder actors
    compile: bool = False  # torch.compile the encoder (GPU)
    overwrite: bool = False  # start the tokens dataset afresh instead of resuming it


class StageConfig(Section):
    """One training stage (paper 5.1): its resolution buckets, learning rate and length."""

    name: str = ""  # default "stage-<k>"
    px: int = Field(256, ge=32)  # buckets: model.buckets.buckets_for(px), unless `buckets` lists "WxH" names
    buckets: list[str] | None = None
    lr: float = Field(2e-4, gt=0)
    warmup_steps: int = Field(0, ge=0)
    decay: Literal["cosine", "linear", "constant"] = "cosine"
    min_lr_ratio: float = Field(0.1, ge=0, le=1)
    steps: int | None = Field(None, ge=1)  # optimizer steps; or `samples` (rounded up to whole global batches)
    samples: int | None = Field(None, ge=1)
    global_batch: int = Field(8, ge=1)  # samples per optimizer step = micro_batch x accumulation x workers
    micro_batch: int = Field(2, ge=1)


class TrainConfig(Section):
    """train (issue 5): Ray Train stages on tokens/ (docs/train.md)."""

    workers: int = Field(2, ge=0)  # Ray Train workers (one per GPU); 0 runs in this process without Ray
    use_gpu: bool = False
    dataset: PathOrURI = "tokens"  # dataset name under the workdir, or a URI
    run: str = "train"  # checkpoints and exports go to <workdir>/runs/<run>/stage-<k>/
    seed: int = 0
    model_overrides: dict[str, Any] = Field(default_factory=dict)  # ModelArgs fields over the preset
    init_from: PathOrURI | None = None  # a transformers-format folder to start stage 1 from (models.decoder_path if None)
    betas: tuple[float, float] = (0.9, 0.95)
    weight_decay: float = Field(0.1, ge=0)
    grad_clip: float = Field(1.0, ge=0)
    z_loss: float = Field(1e-5, ge=0)
    cfg_drop: float = Field(0.1, ge=0, le=1)  # share of samples that keep only their image part (CFG)
    # Which image tokens the loss covers: "image" all of them (the release), "lower" only the lower
    # panel of dual-panel rows (the picture under a map, the map under a picture: what a
    # conditional task generates), t2i rows whole. A fine-tuning choice (docs/train.md).
    supervise: Literal["image", "lower"] = "image"
    loss_chunk: int = Field(2048, ge=1)  # supervised positions per chunk of the output head
    pad_multiple: int = Field(8, ge=1)
    # Static shapes (GPUs: one compiled graph per stage): each step's samples packed into rows of
    # one length per stage (pack_length, default the stage's longest sample), micro_batch rows a
    # micro batch, attention kept inside each sample (model/training.py make_packed_batches).
    pack: bool = False
    pack_length: int | None = Field(None, ge=2)
    checkpoint_every: int = Field(50, ge=1)  # optimizer steps between checkpoints (tasks/train/checkpoints.py: safetensors + JSON)
    keep_checkpoints: int = Field(2, ge=1)
    compile: bool = True  # GPU only: torch.compile each layer
    # none | selective (matmul and attention outputs kept) | full (layer inputs kept) | auto: the
    # least recompute that fits the GPU's memory at the stage's longest micro batch (none on CPUs);
    # true/false mean full/none (model/training.py, docs/train.md).
    activation_checkpointing: Literal["auto", "none", "selective", "full"] | bool = "auto"
    mixed_precision: bool = True  # GPU only: bf16 params, fp32 reduce
    peak_tflops: float | None = Field(None, gt=0)  # for MFU; None: datasheet (GPU) or measured (CPU)
    export_dtype: Literal["bfloat16", "float32"] = "bfloat16"
    max_failures: int = Field(3, ge=-1)  # Ray Train restarts of the worker group after a lost worker (each
    # resumes from the newest checkpoint); -1: no limit, 0: fail the run at once (a rerun resumes)
    max_nonfinite: int = Field(5, ge=1)  # a non-finite loss skips the step; this many in a row stop the run
    fault: str | None = None  # "stage:step": kill a worker after that step (resume tests only)
    stages: list[StageConfig] = Field(default_factory=list)


class RewriteConfig(Section):
    """Prompt rewriting before generation (issue 7, paper 4.3.1): an OpenAI-compatible endpoint."""

    endpoint: PathOrURI | None = None  # e.g. http://127.0.0.1:8000/v1; None: no rewriting
    model: str = "gpt-4o-mini"
    system_prompt: str = (
        "Rewrite the user's image prompt into one richer, concrete description of the same scene. "
        "Reply with the description only."
    )
    api_key_env: str | None = "OPENAI_API_KEY"  # read from this environment variable, or
    api_key_secret: str | None = None  # the name of a Prefect Secret block
    timeout_s: float = Field(30.0, gt=0)
    retries: int = Field(3, ge=0)  # further attempts after a transient failure (timeout, connection, 429, 5xx)
    backoff_s: float = Field(1.0, ge=0)  # first wait; doubles each attempt (with jitter, at least Retry-After)
    cache_path: PathOrURI | None = None  # default: <workdir>/rewrites.jsonl when the workdir is local


class GenerateConfig(Section):
    """generate (issues 6 and 7)."""

    cfg: float = 4.0  # classifier-free guidance scale; 1 turns guidance off (the release: 4.0)
    # Per task: a task ("control:canny") or a kind ("control") -> its own cfg scale; the exact task
    # first, then its kind, else `cfg`. Guidance amplifies the text only (the unconditional branch
    # sees the image from its start token on, upper panel included). On the shipped tiny pair control
    # and dense rows follow their maps best at 1.5-2 (configs/tiny.yaml: 2; docs/evaluate.md, "Guidance
    # 2 for control and dense rows"); t2i draws alike at 2, 4 and 6.
    cfg_by_task: dict[str, float] = Field(default_factory=dict)
    # Map guidance: control tasks ("control:canny") or the kind ("control") whose unconditional branch
    # sees an empty map (a black upper panel, MoVQGAN-encoded) in place of the row's own, so that the
    # guidance scale amplifies the map as well as the text (docs/evaluate.md, "Map guidance").
    map_guidance: list[str] = Field(default_factory=list)
    temperature: float = 1.0
    top_k: int = 4096
    # min-p: keep the ids whose probability is at least min_p x the position's largest, after the
    # temperature (0 keeps all, as the release samples). It cuts the tail a stray code is drawn from
    # where the model is sure, and nothing where it hesitates; lossless SJD samples the same
    # distribution (model/sampling.py; docs/evaluate.md "min-p" has what it did on the tiny model).
    min_p: float = 0.0
    sjd: bool = True
    sjd_window: int = 16
    # How SJD's drafts start (model.sjd.DRAFT_KINDS, docs/generate.md "Draft initialisations"):
    # uniform (the SJD paper's), above (the code one row up, mixed with uniform), above+carry, pac (SJD-PAC's
    # adaptive continuation), pac+above (pac with the new positions drafted from the row above: on the
    # leg-12 tiny decoder 2.5-6.5% fewer steps than pac, docs/generate.md); lossless all. Default:
    # model.sjd.DEFAULT_DRAFTS (tests/tasks/test_config.py checks they agree).
    sjd_drafts: str = "pac"
    # SJD-PAC's proactive drafting (model/sjd.py "Draft tree", docs/generate.md "Draft tree"): SIBLINGSxBRANCH
    # extra candidates at the window's first position, each the root of a branch of BRANCH nodes
    # (Engine tree_siblings / tree_branch; BRANCH <= sjd_window - 1); lossless. "0x0": none, the
    # default (model.sjd.DEFAULT_TREE): on a CPU the extra nodes cost about what they gain.
    sjd_tree: str = "0x0"
    # The engine (issues 6 and 13, model/engine.py, docs/generate.md). `auto` is resolved per device
    # by tasks.generate.job.engine_settings: int4 weight-only + the compiled step on CUDA, neither on a
    # CPU (int8 is no faster there), so one config file runs on both; int4 asked on a CPU is an
    # error before Ray starts. compile: full (the whole step; if compiling fails the engine falls
    # back to the compiled forward with an eager sampling half, then to eager) or eager; true/false
    # mean full/eager.
    quantize: Literal["auto", "none", "int8", "int4"] = "auto"
    compile: Literal["auto", "full", "eager"] | bool = "auto"
    kv_bucket: int = Field(512, ge=1)  # attended cache length granularity (one compiled graph per bucket)
    prefill_tokens: int = Field(2048, ge=64)  # tokens per prefill forward: bounds its activation memory (engine default)
    # Bulk jobs (issue 7): inputs, counts, best-of-N and the quality filter, work units.
    inputs: dict[str, Any] = Field(
        default_factory=lambda: {"kind": "shapes", "count": 4, "seed": 0, "tasks": ["t2i", "control:canny"]}
    )  # {kind: file, path} | {kind: panels, uri} | {kind: shapes, count, seed, tasks}
    output: PathOrURI = "generated"  # dataset name under the workdir, or a URI
    task: str = "t2i"  # the task of prompt rows that name none (benchmark files: GenEval, DPG-Bench)
    size: str | None = None  # default WIDTHxHEIGHT for prompt rows that name none
    count_per_prompt: int = Field(1, ge=1)
    best_of: int = Field(1, ge=1)  # samples per pair; a verifier keeps the best (when one applies)
    # Names from the registry (tasks/plugins.py): auto | none | canny_f1 | depth_rmse | an entry point
    # of the "panelforge.scorers" group; comma-separated for several.
    scorer: str = "auto"
    depth_estimator: str | None = None  # an entry point of "panelforge.depth_estimators" (tasks/plugins.py)
    thresholds: dict[str, float] = Field(default_factory=dict)  # {scorer name: minimum (or max RMSE)}
    seed: int = 0
    pairs_per_unit: int = Field(16, ge=1)
    workers: int = Field(1, ge=1)  # engine actors on CPU; on GPUs one per GPU
    # The engine's continuous batch (images per actor). auto: as many as fit the GPU's free memory
    # (Engine.fit_batch), 8 on a CPU; a number is a bound (tasks.generate.job.batch_that_fits).
    max_batch: int | Literal["auto"] = "auto"
    job_retries: int = Field(2, ge=0)  # reruns of the remaining units after a Ray failure (a lost node)
    max_side: int = Field(2048, ge=32)
    max_count: int = Field(1000, ge=1)
    max_pairs: int = Field(10_000_000, ge=1)
    contact_sheet_pairs: int = Field(16, ge=0)
    rewrite: RewriteConfig = Field(default_factory=RewriteConfig)

    @field_validator("inputs")
    @classmethod
    def _inputs_kind(cls, v: dict) -> dict:
        return _check_spec("generate.inputs", v, GENERATE_INPUTS)

    @field_validator("sjd_drafts")
    @classmethod
    def _draft_kind(cls, v: str) -> str:
        from model.sjd import DRAFT_KINDS

        if v not in DRAFT_KINDS:
            raise ValueError(f"{v!r} is not a draft kind; expected one of {', '.join(DRAFT_KINDS)}")
        return v

    @field_validator("sjd_tree")
    @classmethod
    def _draft_tree(cls, v: str, info) -> str:
        from model.engine import check_tree
        from model.sjd import parse_tree

        check_tree(*parse_tree(v), info.data.get("sjd_window", 16))
        return v

    @field_validator("max_batch", mode="before")
    @classmethod
    def _batch_or_auto(cls, v):
        if v == "auto" or (isinstance(v, int) and not isinstance(v, bool) and v >= 1):
            return v
        raise ValueError(f"expected 'auto' or a whole number >= 1 (got {v!r})")

    @field_validator("scorer")
    @classmethod
    def _registered_scorer(cls, v: str) -> str:
        from tasks.plugins import scorer_problem

        if problem := scorer_problem(v):
            raise ValueError(problem)
        return v

    @field_validator("depth_estimator")
    @classmethod
    def _registered_estimator(cls, v: str | None) -> str | None:
        from tasks.plugins import estimator_problem

        if problem := estimator_problem(v):
            raise ValueError(problem)
        return v

    @model_validator(mode="after")
    def _engine_ranges(self) -> "GenerateConfig":
        # The engine's fields above keep their plain declarations (another change edits them).
        for name, low in (("top_k", 1), ("sjd_window", 1), ("kv_bucket", 1)):
            if getattr(self, name) < low:
                raise ValueError(f"generate.{name}: must be >= {low} (got {getattr(self, name)})")
        if not 0 <= self.min_p < 1:
            raise ValueError(f"generate.min_p: must be in [0, 1), 0 keeps every code (got {self.min_p})")
        if self.temperature < 0:
            raise ValueError(f"generate.temperature: must be >= 0 (got {self.temperature})")
        if not self.cfg >= 1:  # the engine's own bound (model/engine.py)
            raise ValueError(f"generate.cfg: must be >= 1, 1 turns guidance off (got {self.cfg})")
        for task, scale in self.cfg_by_task.items():
            try:
                if task not in TASK_KINDS:
                    split_task(task)
            except PromptError as e:
                raise ValueError(f"generate.cfg_by_task: {e} (or a kind: {', '.join(TASK_KINDS)})") from None
            if not scale >= 1:
                raise ValueError(f"generate.cfg_by_task.{task}: must be >= 1, 1 turns guidance off (got {scale})")
        for task in self.map_guidance:
            kind, _, name = task.partition(":")
            if task != "control" and not (kind == "control" and name in CONTROL_NAMES):
                raise ValueError(f"generate.map_guidance: {task!r} is not a control task; the upper panel of "
                                 f"another task is a picture, not a map (use 'control' or one of "
                                 f"{', '.join('control:' + c for c in CONTROL_NAMES)})")
        return self

    def guides_map(self, task: str) -> bool:
        """Whether a task's rows are guided by their map too (map_guidance names it or its kind)."""
        return task in self.map_guidance or task.partition(":")[0] in self.map_guidance

    def cfg_for(self, task: str) -> float:
        """The guidance scale of a task's rows: cfg_by_task's entry for the task, else for its kind,
        else cfg."""
        kind = task.partition(":")[0]
        return self.cfg_by_task.get(task, self.cfg_by_task.get(kind, self.cfg))


class EvaluateConfig(Section):
    """evaluate (issue 8): figures of a generated dataset (docs/evaluate.md)."""

    canny_low: int = Field(100, ge=0)
    canny_high: int = Field(200, ge=0)
    workers: int = Field(2, ge=1)  # scoring actors of the Ray job
    rows_per_unit: int = Field(64, ge=1)  # generated rows per work unit
    min_shape_frac: float = Field(0.004, ge=0, le=1)  # smallest region the shape detector counts, share of the picture
    sheet_rows: int = Field(4, ge=0)  # examples per control task in eval_control.png (twice that in eval_captions.png)


class PipelineConfig(Section):
    name: str = "default"
    # Root of every dataset and run of this config: a local folder or an object-store URI.
    workdir: PathOrURI = "out/default"
    ray: RayConfig = Field(default_factory=RayConfig)
    models: ModelsConfig = Field(default_factory=ModelsConfig)
    panels: PanelsConfig = Field(default_factory=PanelsConfig)
    tokenize: TokenizeConfig = Field(default_factory=TokenizeConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    generate: GenerateConfig = Field(default_factory=GenerateConfig)
    evaluate: EvaluateConfig = Field(default_factory=EvaluateConfig)
    # Where this config was read from, for error messages (not settings: never serialized).
    _source: str = PrivateAttr("(config)")
    _overrides: list[str] = PrivateAttr(default_factory=list)  # redacted

    @model_validator(mode="before")
    @classmethod
    def _no_credentials(cls, data: Any) -> Any:
        """Credentials come from the environment or Prefect Secret blocks, never from a config: a
        URI with user:password@ in any field is refused, and the message names only the field."""
        fields = [f for f, v in _strings(data) if has_credentials(v)]
        if fields:
            raise ValueError(
                f"{', '.join(fields)}: a URI with credentials in it (user:secret@); put keys in the environment "
                "(AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY) or a Prefect Secret block, not in the config")
        return data

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


def _strings(data: Any, prefix: str = "") -> list[tuple[str, str]]:
    """(dotted field, value) of every string in a nested config mapping."""
    if isinstance(data, BaseModel):
        data = data.model_dump()
    if isinstance(data, dict):
        return [kv for k, v in data.items() for kv in _strings(v, f"{prefix}{k}.")]
    if isinstance(data, (list, tuple)):
        return [kv for i, v in enumerate(data) for kv in _strings(v, f"{prefix}{i}.")]
    return [(prefix.rstrip("."), data)] if isinstance(data, str) else []


_NAMES_FIELD = re.compile(r"^[a-z_][\w.]*(, [a-z_][\w.]*)*: ")


def _format_errors(source: str, err: ValidationError) -> str:
    """One line per error: '<file>: <field>: <what was expected> (got <value>)'. Values are
    redacted of URI credentials."""
    lines = []
    for e in err.errors():
        field = ".".join(str(p) for p in e["loc"])
        msg = e["msg"].removeprefix("Value error, ")
        got = e.get("input")
        got_s = "" if isinstance(got, (dict, list)) or e["type"] in ("value_error", "missing") \
            else f" (got {redact(repr(got))})"
        # Our own validators' messages start with the dotted fields they are about.
        if e["type"] == "value_error" and _NAMES_FIELD.match(msg):
            lines.append(f"{source}: {msg}")
        else:
            lines.append(f"{source}: {field or '(top level)'}: {msg}{got_s}")
    return "\n".join(lines)


def parse_override(text: str) -> tuple[list[str], Any]:
    """'train.workers=4' -> (['train', 'workers'], 4); the value is parsed as YAML."""
    if "=" not in text:
        raise ConfigError(f"override {redact(text)!r}: expected KEY=VALUE, e.g. train.workers=4")
    key, value = text.split("=", 1)
    path = [p for p in key.strip().split(".") if p]
    if not path:
        raise ConfigError(f"override {redact(text)!r}: empty key")
    try:
        return path, yaml.safe_load(value) if value.strip() else None
    except yaml.YAMLError as e:
        raise ConfigError(f"{'.'.join(path)}: the override's value is not valid YAML ({_yaml_problem(e)}); "
                          "quote strings holding { } [ ] , : or #, e.g. path: '/data/{00000..00009}.tar'") from None


def _yaml_problem(e: yaml.YAMLError) -> str:
    """A YAML error in one line (PyYAML's own message spans several, with the text quoted)."""
    mark = getattr(e, "problem_mark", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    return redact(f"{getattr(e, 'problem', None) or str(e).splitlines()[0]}{where}")


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Set each KEY=VALUE in data; a numeric part indexes a list (train.stages.0.steps=5)."""
    for text in overrides:
        path, value = parse_override(text)
        node: Any = data
        for depth, part in enumerate(path):
            last = depth == len(path) - 1
            if isinstance(node, list):
                if not part.isdigit() or int(part) >= len(node):
                    raise ConfigError(f"override {redact(text)!r}: {part!r} is not an index of a list of {len(node)}")
                key: Any = int(part)
            elif isinstance(node, dict):
                key = part
            else:
                raise ConfigError(f"override {redact(text)!r}: {path[depth - 1]!r} is not a section")
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
            raise ConfigError(f"{source}: not valid YAML: {_yaml_problem(e)}") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"{source}: expected a mapping at the top level, got {type(loaded).__name__}")
        data = loaded or {}
    try:
        data = apply_overrides(data, overrides or [])
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None
    try:
        cfg = PipelineConfig.model_validate(data)
    except ValidationError as e:
        if overrides:
            source += " with overrides " + redact(" ".join(overrides))
        raise ConfigError(_format_errors(source, e)) from None
    cfg._source, cfg._overrides = source, [redact(o) for o in overrides or []]
    return cfg


# ---------------------------------------------------------------------------------------------
# Preflight: what a stage will touch on disk, checked before a flow run or Ray starts.

STAGES = ("build-panels", "pretokenize", "train", "generate", "evaluate", "retrain")
MOVQGAN_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth")  # model/movqgan.py reads these


def _is_uri(value: str) -> bool:
    return "://" in value


def _uri_problem(field: str, value: str) -> str | None:
    """A URI's form: a supported scheme, a bucket for s3 (credentials are refused by validation)."""
    from urllib.parse import urlparse

    parsed = urlparse(value)
    scheme = parsed.scheme.lower()
    if scheme not in ("file", "s3"):
        return f"{field}: unsupported URI scheme {scheme!r} in {value!r}; use a local path, file:// or s3://bucket/prefix"
    if scheme == "s3" and not parsed.netloc:
        return f"{field}: {value!r} names no bucket; use s3://bucket/prefix"
    return None


def _bucket_problem(field: str, value: str) -> str | None:
    """An object-store location: its bucket exists and the environment's credentials reach it
    (one HEAD request; pyarrow would otherwise only say to enable allow_bucket_creation)."""
    import pyarrow.fs as pafs

    from storage.uri import resolve

    loc = resolve(value)
    bucket = loc.path.split("/", 1)[0]
    try:
        info = loc.fs.get_file_info(bucket)
    except OSError as e:
        first = redact(str(e)).splitlines()[0] if str(e) else type(e).__name__
        return (f"{field}: cannot reach bucket {bucket!r} ({first}); check the name, AWS_ENDPOINT_URL and the "
                "credentials in the environment")
    if info.type == pafs.FileType.NotFound:
        return (f"{field}: bucket {bucket!r} does not exist; create it (e.g. `aws s3 mb s3://{bucket}`) or "
                "check the name (PanelForge never creates buckets)")
    return None


def _writable_problem(field: str, value: str) -> str | None:
    """A local folder that a stage will create or write into: it is a folder (or can be made one
    under the nearest existing folder) and this user may write there."""
    if _is_uri(value):
        if problem := _uri_problem(field, value):
            return problem
        if not value.lower().startswith("file://"):
            return _bucket_problem(field, value)
        value = value[len("file://"):]
    p = Path(value).expanduser()
    if p.exists() and not p.is_dir():
        return f"{field}: {p} is a file, not a folder; choose a folder"
    probe = p
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        return f"{field}: {p} cannot be created: {probe} is a file, not a folder"
    if not os.access(probe, os.W_OK | os.X_OK):
        return f"{field}: {probe} is not writable by this user; choose another folder or fix its permissions"
    return None


def _readable_problem(field: str, value: str | None, want: str, what: str) -> str | None:
    """A local input: present, of the kind wanted ('file', 'dir' or 'any') and readable."""
    if value is None:
        return f"{field}: not set; give {what}"
    if _is_uri(value):
        problem = _uri_problem(field, value)
        if problem or not value.lower().startswith("s3://"):
            return problem
        return _bucket_problem(field, value)
    p = Path(value).expanduser()
    if not p.exists():
        return f"{field}: {p} does not exist; give {what}"
    if want == "dir" and not p.is_dir():
        return f"{field}: {p} is not a folder; give {what}"
    if want == "file" and not p.is_file():
        return f"{field}: {p} is not a file; give {what}"
    if want == "any" and not (p.is_file() or p.is_dir()):
        return f"{field}: {p} is neither a file nor a folder; give {what}"
    if not os.access(p, os.R_OK | (os.X_OK if p.is_dir() else 0)):
        return f"{field}: {p} is not readable by this user"
    return None


def _decoder_problem(field: str, value: str | None,
                     what: str = "a transformers-format decoder folder (config.json + model.safetensors)") -> str | None:
    if problem := _readable_problem(field, value, "dir", what):
        return problem
    if not (Path(value) / "config.json").is_file():
        return f"{field}: {value} has no config.json; give {what}"
    return None


def _source_problems(cfg: PipelineConfig) -> list[str]:
    spec = cfg.panels.source
    kind, out = spec.get("kind"), []
    if kind == "folder":
        out.append(_readable_problem("panels.source.path", spec.get("path"), "dir", "a folder of images"))
        if spec.get("captions"):
            out.append(_readable_problem("panels.source.captions", spec["captions"], "file",
                                         "a captions file (jsonl, csv or parquet)"))
    elif kind in ("edits", "subjects"):
        out.append(_readable_problem("panels.source.path", spec.get("path"), "file", "a jsonl or parquet table"))
    elif kind == "generated":
        uri = spec.get("uri")
        out.append(_uri_problem("panels.source.uri", uri) if _is_uri(uri) else
                   _readable_problem("panels.source.uri", uri, "dir", "a generated dataset folder"))
    elif kind in ("webdataset", "parquet"):
        # A folder, one file or a brace range ("shards/{00000..00099}.tar"): what must exist is the
        # part before the first brace (the range's own members are checked by the listing).
        path = str(spec.get("path"))
        head = path.split("{", 1)[0]
        if "{" in path and not _is_uri(path):
            head = str(Path(head).parent) if not head.endswith("/") else head
        out.append(_readable_problem("panels.source.path", head, "any",
                                     f"{kind} shards: a folder, one file or a brace range"))
    if cfg.panels.depth_model:
        out.append(_decoder_problem("panels.depth_model", cfg.panels.depth_model,
                                    "a local transformers depth-estimation folder (config.json + weights)"))
    return out


def _model_problems(cfg: PipelineConfig, decoder: bool) -> list[str]:
    # Imported here: model/ brings torch, which a config's validation alone does not need.
    from model.decoder import PRESETS as DECODERS
    from model.movqgan import PRESETS as MOVQGANS

    m, out = cfg.models, []
    if m.movqgan_preset not in MOVQGANS:
        out.append(f"models.movqgan_preset: {m.movqgan_preset!r} is not a preset; expected one of {', '.join(MOVQGANS)}")
    if m.decoder_preset not in DECODERS:
        out.append(f"models.decoder_preset: {m.decoder_preset!r} is not a preset; expected one of {', '.join(DECODERS)}")
    if m.movqgan_path:
        out.append(_readable_problem("models.movqgan_path", m.movqgan_path, "file",
                                     "a MoVQGAN checkpoint file (" + ", ".join(MOVQGAN_SUFFIXES) + ")"))
        if not out[-1] and Path(m.movqgan_path).suffix not in MOVQGAN_SUFFIXES:
            out.append(f"models.movqgan_path: {m.movqgan_path} is not a MoVQGAN checkpoint: expected a file ending in "
                       + ", ".join(MOVQGAN_SUFFIXES))
    elif decoder:
        out.append("models.movqgan_path: not set; generation decodes with the MoVQGAN checkpoint file its decoder "
                   "was trained with (" + ", ".join(MOVQGAN_SUFFIXES) + ")")
    elif m.movqgan_preset != "tiny":
        out.append(f"models.movqgan_path: not set, and preset {m.movqgan_preset!r} ships no weights; give the "
                   "MoVQGAN checkpoint file (nothing is downloaded)")
    if m.tokenizer == "hf":
        out.append(_readable_problem("models.tokenizer_path", m.tokenizer_path, "dir",
                                     "a local tokenizer folder with tokenizer.json (models.tokenizer is hf)"))
        if not out[-1] and not (Path(m.tokenizer_path) / "tokenizer.json").is_file():
            out.append(f"models.tokenizer_path: {m.tokenizer_path} has no tokenizer.json")
    elif m.tokenizer_path:
        out.append(_readable_problem("models.tokenizer_path", m.tokenizer_path, "file", "a tokenizer file"))
    if decoder:
        out.append(_decoder_problem("models.decoder_path", m.decoder_path))
    return out


def _generate_problems(cfg: PipelineConfig) -> list[str]:
    spec, out = cfg.generate.inputs, []
    if spec.get("kind") == "file":
        out.append(_readable_problem("generate.inputs.path", spec.get("path"), "any",
                                     "a prompts file (jsonl, csv or parquet) or a folder of <id>.txt prompts"))
    elif spec.get("kind") == "panels" and spec.get("uri") and _is_uri(spec["uri"]):
        out.append(_uri_problem("generate.inputs.uri", spec["uri"]))
    if cfg.generate.rewrite.cache_path:
        out.append(_writable_problem("generate.rewrite.cache_path", str(Path(cfg.generate.rewrite.cache_path).parent)))
    return out


def _output(name: str) -> bool:
    """Whether a dataset field names a place of its own (not a name under the workdir)."""
    return _is_uri(name) or name.startswith("/")


def check_config(cfg: PipelineConfig, stage: str) -> PipelineConfig:
    """The preflight of a stage (one of STAGES; "retrain" is all of them): every path it reads is
    present, readable and of the right kind, every place it writes is writable, every URI is
    well-formed. Raises ConfigError with one line per problem, each naming the config and the
    field; reads only file metadata and writes nothing. Returns cfg."""
    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r}; expected one of {', '.join(STAGES)}")
    every = stage == "retrain"
    problems = [_writable_problem("workdir", cfg.workdir)]
    outputs = []
    if every or stage == "build-panels":
        problems += _source_problems(cfg)
        outputs.append(("panels.output", cfg.panels.output))
    if every or stage == "pretokenize":
        outputs += [("tokenize.input", cfg.tokenize.input), ("tokenize.output", cfg.tokenize.output)]
    if every or stage in ("pretokenize", "generate"):
        # retrain generates with the decoder it trains: the config's own need not exist yet.
        problems += _model_problems(cfg, decoder=stage == "generate")
    if every or stage == "train":
        if not cfg.train.stages:
            problems.append("train.stages: empty; list at least one stage (configs/tiny.yaml has an example)")
        init = cfg.train.init_from or cfg.models.decoder_path
        if init:
            problems.append(_decoder_problem("train.init_from" if cfg.train.init_from else "models.decoder_path", init))
        outputs.append(("train.dataset", cfg.train.dataset))
    if every or stage == "generate":
        problems += _generate_problems(cfg)
        outputs.append(("generate.output", cfg.generate.output))
    if stage == "evaluate":
        outputs.append(("generate.output", cfg.generate.output))
    for field, value in outputs:
        if _output(value):
            problems.append(_writable_problem(field, value))
    problems = [p for p in problems if p]
    if problems:
        where = cfg._source + (" with overrides" if cfg._overrides else "")
        raise ConfigError("\n".join(f"{where}: {p}" for p in dict.fromkeys(problems)))
    return cfg


def run_config(config: PipelineConfig | None, config_path: str | None, overrides: list[str] | None,
               stage: str) -> PipelineConfig:
    """What a flow runs with: its typed `config` parameter, or (deployments written for a YAML file)
    `config_path` with KEY=VALUE `overrides`, read here once; then the stage's preflight."""
    if config is not None and (config_path or overrides):
        raise ConfigError("give a flow either `config` or `config_path`/`overrides`, not both")
    if config is None:
        config = load_config(config_path or "configs/tiny.yaml", list(overrides or []))
    return check_config(config, stage)
