"""Staged training of the decoder on tokens/ with Ray Train (issue 5; docs/train.md).

    python -c "from tasks.config import load_config; from tasks.train.job import train; print(train(load_config('configs/tiny.yaml')))"

The driver checks everything it can before any compute (layout fingerprint, context length,
stages without data, checkpoints of another preset), then runs the pending stages in one Ray
Train TorchTrainer (DDP on gloo on CPUs, FSDP2 on GPUs: model/training.py), or in this
process when train.workers is 0 (a GPU machine without Ray).

On disk, under <workdir>/runs/<run>/ (a local folder or an object store: tasks/train/checkpoints.py):
    run.json                      the architecture and layout this run is bound to
    stage-<k>/ckpt/step-<n>/      model.safetensors + optimizer.safetensors, and trainer.json
                                  (step, loader position, loss history) written last = complete
    stage-<k>/export/             the finished stage in the release's format (model/hf_checkpoint.py)
    stage-<k>/summary.json        written last: the stage is done and is never run again
    tb/                           TensorBoard events: loss, z_loss, lr, tokens_per_s, mfu
    loss.png                      the loss curve of every stage so far

Data: each worker reads its rows (Dataset.partition) of the stage's buckets; every optimizer
step draws the whole global batch from ONE bucket (Lumina-mGPT FP-SFT: similar lengths in a
batch), in an order that is a pure function of (seed, stage, step), so a run resumed from a
checkpoint sees the same batches, CFG drops and losses as an uninterrupted one.
"""
from __future__ import annotations

import json
import logging
import math
import os
import signal
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow.compute as pc

from model.buckets import buckets_for
from model.decoder import ModelArgs
from model.layout import Layout, lower_panel_start
from model.prompts import is_dual
from storage import StorageError, open_dataset
from tasks.train import checkpoints
from tasks.train.checkpoints import Folder
from tasks.train.curve import loss_curve_png
from tasks.config import PipelineConfig, StageConfig, TrainConfig

log = logging.getLogger(__name__)

FORMAT = 1  # bump when run.json / trainer.json change incompatibly
STOPPED = "stopped.json"  # a stage the workers stopped on purpose (non-finite losses): the driver raises it


class TrainError(ValueError):
    """Training cannot start (or continue): the message says what was wrong, where, and what to do."""


# --- the plan: every check before compute ------------------------------------------------------

def dataset_uri(cfg: PipelineConfig, name: str) -> str:
    return name if "://" in name or name.startswith("/") else cfg.dataset_uri(name)


def run_dir(cfg: PipelineConfig) -> str:
    """The run folder's URI (a local path or s3://...): never a pathlib.Path, which would turn
    s3://bucket/x into the local folder s3:/bucket/x."""
    return f"{cfg.workdir.rstrip('/')}/runs/{cfg.train.run}"


def stage_names(cfg: PipelineConfig) -> list[str]:
    return [s.name or f"stage-{k + 1}" for k, s in enumerate(cfg.train.stages)]


def stage_buckets(stage: StageConfig) -> list[str]:
    return list(stage.buckets) if stage.buckets else [f"{w}x{h}" for w, h in buckets_for(stage.px)]


def model_args(cfg: PipelineConfig, layout: Layout) -> ModelArgs:
    try:
        return ModelArgs.from_name(cfg.models.decoder_preset, **{"vocab_size": layout.vocab_size,
                                                                 **cfg.train.model_overrides})
    except (ValueError, TypeError) as e:
        raise TrainError(f"models.decoder_preset / train.model_overrides: {e}") from None


def dataset_fingerprint(meta: dict) -> str | None:
    """The layout fingerprint a tokens manifest records (tasks/tokenize/job.py writes layout.meta())."""
    return meta.get("layout_fingerprint") or meta.get("fingerprint")


def _args_dict(args: ModelArgs) -> dict:
    from dataclasses import asdict

    return asdict(args)


def _check_init(folder: str, args: ModelArgs, layout: Layout) -> None:
    from model.hf_checkpoint import CheckpointError, args_from_hf_config

    cfg_path = Path(folder) / "config.json"
    if not cfg_path.is_file():
        raise TrainError(f"train.init_from {folder!r}: no config.json (expected a transformers-format decoder folder)")
    try:
        theirs = args_from_hf_config(json.loads(cfg_path.read_text()), str(cfg_path))
    except CheckpointError as e:
        raise TrainError(str(e)) from None
    diff = args.matches(theirs)
    if diff:
        raise TrainError(f"{folder}: a checkpoint of another architecture (differs in {diff}: "
                         f"{ {k: getattr(theirs, k) for k in diff} } vs the config's "
                         f"{ {k: getattr(args, k) for k in diff} }); set models.decoder_preset to its preset")
    meta_path = Path(folder) / "panelforge.json"
    fp = dataset_fingerprint(json.loads(meta_path.read_text())) if meta_path.is_file() else None
    if fp and fp != layout.fingerprint:
        raise TrainError(f"{folder}: trained with layout {fp}, the config's layout is {layout.fingerprint}")


def bucket_index(table_buckets: list[str], buckets: list[str]) -> np.ndarray:
    pos = {b: i for i, b in enumerate(buckets)}
    return np.array([pos.get(b, -1) for b in table_buckets], dtype=np.int64)


def rank_index(ds, world: int) -> np.ndarray:
    rank_of = np.full(len(ds), -1, dtype=np.int64)
    for r in range(world):
        rank_of[np.asarray(ds.partition(r, world), dtype=np.int64)] = r
    return rank_of


class StageSchedule:
    """Which rows each rank trains on at each step of a stage: a pure function of the step.

    Per epoch, each (bucket, rank) row list is shuffled; a step takes per_rank rows of one
    bucket on every rank; the bucket order of the epoch is shuffled with a seed all ranks
    share. Rows left over (fewer than per_rank on some rank) wait for a later epoch's shuffle.
    """

    def __init__(self, bucket_of: np.ndarray, rank_of: np.ndarray, n_buckets: int, world: int, per_rank: int,
                 seed: int, stage: int):
        self.world, self.per_rank, self.seed, self.stage = world, per_rank, seed, stage
        self.rows = [[np.flatnonzero((bucket_of == b) & (rank_of == r)) for r in range(world)]
                     for b in range(n_buckets)]
        self.per_bucket = [min(len(rr) for rr in self.rows[b]) // per_rank for b in range(n_buckets)]
        self.steps_per_epoch = sum(self.per_bucket)
        self._epoch: tuple[int, list] | None = None

    def _order(self, epoch: int) -> list[tuple[int, int]]:
        if self._epoch is None or self._epoch[0] != epoch:
            order = [(b, i) for b, n in enumerate(self.per_bucket) for i in range(n)]
            perm = np.random.default_rng([self.seed, self.stage, epoch]).permutation(len(order))
            self._epoch = (epoch, [order[j] for j in perm])
        return self._epoch[1]

    def position(self, step: int) -> dict:
        return {"epoch": step // self.steps_per_epoch, "index": step % self.steps_per_epoch}

    def rows_for(self, step: int, rank: int) -> tuple[int, list[int]]:
        """(bucket index, the rank's per_rank global row indices) of a step."""
        epoch, j = divmod(step, self.steps_per_epoch)
        b, i = self._order(epoch)[j]
        rows = self.rows[b][rank]
        perm = np.random.default_rng([self.seed, self.stage, epoch, b, rank]).permutation(len(rows))
        return b, rows[perm[i * self.per_rank:(i + 1) * self.per_rank]].tolist()


def _pack_length(max_len: int, wanted: int | None) -> int:
    """Row length of a packed stage: room for its longest sample (n tokens take n - 1 input
    positions), at least train.pack_length, a multiple of 128 (FlexAttention's block)."""
    need = max(max_len - 1, wanted or 0)
    return -(-need // 128) * 128


@dataclass
class StagePlan:
    """One stage as the workers run it: checked and resolved from the config and the dataset."""

    index: int
    name: str
    buckets: list[str]
    lr: float
    warmup: int
    decay: str
    min_lr_ratio: float
    steps: int
    accum: int  # micro batches per optimizer step on each worker
    micro_batch: int  # samples (rows when packed) per micro batch
    global_batch: int
    rows: int  # dataset rows in the stage's buckets
    steps_per_epoch: int
    px: int
    max_len: int  # the stage's longest sample, in tokens
    pack_len: int | None  # packed rows' length, or None (padded batches)


@dataclass
class TrainPlan:
    """What the workers receive (Ray Train's train_loop_config): typed, so a misspelt field is an
    AttributeError in the driver's tests, not a KeyError inside a Ray worker."""

    run_dir: str  # URI of the run folder (local path or s3://...)
    dataset: str
    binding: dict  # run.json: preset, args, layout fingerprint, dataset
    layout: dict
    movqgan: dict | None
    image_start: int
    stages: list[StagePlan]  # the stages this run trains (train() keeps the pending ones)
    world: int
    init_from: str | None
    train: TrainConfig  # the config's train section (its stages resolved above)
    device: str
    all_stages: list[str] = field(default_factory=list)  # every stage's name, in order
    threads: int | None = None  # torch threads per CPU worker (Ray)


SUPERVISE_COLUMNS = {"image": [], "lower": ["task", "grid_h", "grid_w"]}  # what supervised_starts reads beside id, loss_start


def supervised_starts(table, supervise: str) -> list[int]:
    """Each row's first supervised token: its loss_start, or with train.supervise lower the lower
    panel's first token for a dual-panel row (t2i rows keep theirs). The table holds id, loss_start
    and SUPERVISE_COLUMNS[supervise]."""
    starts = table.column("loss_start").to_pylist()
    if supervise == "image":
        return starts
    out = []
    for start, rid, task, gh, gw in zip(starts, *(table.column(c).to_pylist() for c in ("id", *SUPERVISE_COLUMNS[supervise]))):
        if not is_dual(task):
            out.append(start)
            continue
        try:
            out.append(lower_panel_start(start, gh, gw))
        except ValueError as e:
            raise TrainError(f"row {rid!r} ({task}): {e}; train.supervise lower cannot find its lower panel") from None
    return out


def plan_training(cfg: PipelineConfig) -> TrainPlan:
    """Check the config, the dataset and the run folder; return the plan the workers run.

    Raises TrainError before any compute for: no stages, a dataset of another layout, a
    sequence longer than the model's context, a stage with no (or too little) data in its
    buckets, a batch that does not divide, an init checkpoint or a run folder of another preset.
    """
    tc = cfg.train
    if not tc.stages:
        raise TrainError("train.stages is empty: list at least one stage (configs/tiny.yaml has an example)")
    layout = Layout.from_config(cfg.models)
    args = model_args(cfg, layout)
    uri = dataset_uri(cfg, tc.dataset)
    try:
        ds = open_dataset(uri, check=True)  # a damaged shard stops training, named
    except StorageError as e:
        raise TrainError(f"train.dataset {uri}: {e}; run pretokenize first") from None
    if ds.kind != "tokens":
        raise TrainError(f"{uri}: a {ds.kind!r} dataset, expected 'tokens' (the pretokenize output)")
    fp = dataset_fingerprint(ds.meta)
    if fp != layout.fingerprint:
        raise TrainError(f"{uri}/manifest.json: tokens made with layout {fp}, the model's layout "
                         f"(models.tokenizer={cfg.models.tokenizer}, movqgan_preset={cfg.models.movqgan_preset}) "
                         f"is {layout.fingerprint}; pretokenize again with this config or point models at the "
                         "tokenizer the dataset was made with")
    world = max(1, tc.workers)
    table = ds.table(columns=["id", "bucket", "loss_start", *SUPERVISE_COLUMNS[tc.supervise]])
    lengths = np.concatenate([pc.list_value_length(b.column(0)).to_numpy(zero_copy_only=False)
                              for b in ds.iter_batches(columns=["tokens"])] or [np.zeros(0, np.int64)])
    max_id = max((pc.max(pc.list_flatten(b.column(0))).as_py() or 0 for b in ds.iter_batches(columns=["tokens"])),
                 default=0)
    if max_id >= args.vocab_size:
        raise TrainError(f"{uri}: token id {max_id} does not fit the model's vocabulary of {args.vocab_size}")
    ids = table.column("id").to_pylist()
    row_buckets = table.column("bucket").to_pylist()
    loss_start = np.asarray(supervised_starts(table, tc.supervise), dtype=np.int64)
    rank_of = rank_index(ds, world)
    found = {b: row_buckets.count(b) for b in sorted(set(row_buckets))}
    stages = []
    for k, (name, st) in enumerate(zip(stage_names(cfg), tc.stages)):
        where = f"train.stages[{k}] ({name})"
        buckets = stage_buckets(st)
        bucket_of = bucket_index(row_buckets, buckets)
        mine = np.flatnonzero(bucket_of >= 0)
        if mine.size == 0:
            raise TrainError(f"{where}: no rows of {uri} fall in its buckets {buckets} (px {st.px}); the dataset "
                             f"has {found}; pretokenize at this stage's size or list buckets in {where}.buckets")
        too_long = mine[lengths[mine] > args.max_seq_len]
        if too_long.size:
            i = int(too_long[0])
            raise TrainError(f"{uri}: row {ids[i]!r} (bucket {row_buckets[i]}) has {int(lengths[i])} tokens, more than "
                             f"the model's context of {args.max_seq_len} ({too_long.size} rows in {where}); "
                             "sequences are never truncated: drop them at pretokenize (tokenize.max_seq) or "
                             "raise max_seq_len in train.model_overrides")
        bad = mine[(loss_start[mine] < 1) | (loss_start[mine] >= lengths[mine])]
        if bad.size:
            i = int(bad[0])
            what = "its lower panel (train.supervise lower) starts at" if tc.supervise == "lower" else "has loss_start"
            raise TrainError(f"{uri}: row {ids[i]!r} {what} {int(loss_start[i])}, outside 1..{int(lengths[i]) - 1}")
        if st.global_batch % (st.micro_batch * world):
            raise TrainError(f"{where}: global_batch {st.global_batch} is not a multiple of micro_batch "
                             f"{st.micro_batch} x {world} workers")
        accum = st.global_batch // (st.micro_batch * world)
        if (st.steps is None) == (st.samples is None):
            raise TrainError(f"{where}: give exactly one of steps or samples")
        steps = st.steps if st.steps is not None else math.ceil(st.samples / st.global_batch)
        sched = StageSchedule(bucket_of, rank_of, len(buckets), world, st.micro_batch * accum, tc.seed, k)
        if sched.steps_per_epoch == 0:
            counts = {buckets[b]: [len(r) for r in sched.rows[b]] for b in range(len(buckets)) if any(map(len, sched.rows[b]))}
            raise TrainError(f"{where}: no bucket holds a whole global batch: each of {world} workers needs "
                             f"{st.micro_batch * accum} rows of one bucket, rows per worker are {counts}; "
                             "lower global_batch or add data")
        stages.append(StagePlan(index=k, name=name, buckets=buckets, lr=st.lr, warmup=st.warmup_steps,
                                decay=st.decay, min_lr_ratio=st.min_lr_ratio, steps=steps, accum=accum,
                                micro_batch=st.micro_batch, global_batch=st.global_batch, rows=int(mine.size),
                                steps_per_epoch=sched.steps_per_epoch, px=st.px, max_len=int(lengths[mine].max()),
                                pack_len=_pack_length(int(lengths[mine].max()), tc.pack_length) if tc.pack else None))
    root = Folder(run_dir(cfg))
    binding = {"format": FORMAT, "preset": cfg.models.decoder_preset, "args": _args_dict(args),
               "layout_fingerprint": layout.fingerprint, "dataset": uri}
    run_json = root.display("run.json")
    if root.is_file("run.json"):
        old = root.read_json("run.json")
        if old.get("args") != binding["args"] or old.get("layout_fingerprint") != binding["layout_fingerprint"]:
            diff = sorted(k for k in set(old.get("args", {})) | set(binding["args"])
                          if old.get("args", {}).get(k) != binding["args"].get(k))
            raise TrainError(f"{run_json}: this run's checkpoints are of preset {old.get('preset')!r} "
                             f"(differs in {diff or ['layout_fingerprint']}), the config asks for "
                             f"{cfg.models.decoder_preset!r}; use another train.run or delete {root.uri}")
    init = tc.init_from
    if init:
        _check_init(init, args, layout)
    return TrainPlan(run_dir=root.uri, dataset=uri, binding=binding, layout=layout.meta(),
                     movqgan=ds.meta.get("movqgan"), image_start=layout.image_start, stages=stages, world=world,
                     init_from=init, train=tc.model_copy(update={"stages": []}),
                     device="cuda" if tc.use_gpu else "cpu", all_stages=[s.name for s in stages])


# --- the worker loop ---------------------------------------------------------------------------

def _dist():
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _barrier():
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _folder(root: Folder | str | os.PathLike) -> Folder:
    return root if isinstance(root, Folder) else Folder(root)


def stage_done(root: Folder | str, name: str) -> dict | None:
    """The stage's summary.json (its done marker), or None; root is a run folder or its URI."""
    stage = _folder(root) / name
    return stage.read_json("summary.json") if stage.is_file("summary.json") else None


def latest_checkpoint(stage_dir: Folder) -> Folder | None:
    """The newest complete checkpoint of a stage (tasks/train/checkpoints.py: its marker exists)."""
    return checkpoints.latest(stage_dir / "ckpt")


def read_run_file(run: str, name: str) -> bytes | None:
    """A file of a run folder (local or object store), or None: flows/train.py reads loss.png so."""
    root = Folder(run)
    return root.read_bytes(name) if root.is_file(name) else None


class Worker:
    """One rank's training of the plan's pending stages (Ray Train calls run(); so can a script)."""

    def __init__(self, plan: TrainPlan):
        import torch

        self.plan, self.tc = plan, plan.train
        self.root = Folder(plan.run_dir)
        self.rank, self.world = _dist()
        if self.world != plan.world:
            raise TrainError(f"plan for {plan.world} workers run on {self.world}")
        if plan.device == "cuda":
            local = int(os.environ.get("LOCAL_RANK", 0))
            self.device = torch.device("cuda", local)
            torch.cuda.set_device(self.device)
        else:
            self.device = torch.device("cpu")
        self.ds = open_dataset(plan.dataset, check=True)
        table = self.ds.table(columns=["bucket"])
        self.row_buckets = table.column("bucket").to_pylist()
        self.rank_of = rank_index(self.ds, self.world)
        self.args = ModelArgs(**plan.binding["args"])

    # -- model ---------------------------------------------------------------------------------
    def _ac_policy(self, stage: StagePlan) -> str:
        """The stage's activation checkpointing: the config's, or on "auto" the least recompute
        that fits this GPU's memory at the stage's longest micro batch (none on CPUs)."""
        import torch

        from model.training import choose_activation_checkpointing

        value = self.tc.activation_checkpointing
        if value != "auto":
            return {True: "full", False: "none"}.get(value, value)
        if self.device.type != "cuda":
            return "none"
        n_params = sum(p.numel() for p in self._n_params_model().parameters())
        memory = torch.cuda.get_device_properties(self.device).total_memory
        tokens = stage.micro_batch * (stage.pack_len or stage.max_len)
        return choose_activation_checkpointing(self.args, tokens, self.world,
                                               memory, n_params, loss_chunk=self.tc.loss_chunk)

    def _n_params_model(self):
        import torch

        from model.decoder import Decoder

        with torch.device("meta"):
            return Decoder(self.args)

    def _build(self, stage: StagePlan):
        import torch

        from model.decoder import Decoder
        from model.training import build_optimizer, parallelize

        torch.manual_seed(self.tc.seed)
        k = stage.index
        if k == 0 and self.plan.init_from:
            from model.hf_checkpoint import load_decoder

            model, _ = load_decoder(self.plan.init_from, dtype=torch.float32, expect=self.args)
            model.train()
        else:
            model = Decoder(self.args)  # stage 1: the seeded init, identical on every rank
        policy = self._ac_policy(stage)
        if self.rank == 0:
            log.info("%s: activation checkpointing %s", stage.name, policy)
        model = parallelize(model, self.device, mixed_precision=self.tc.mixed_precision,
                            activation_checkpointing=policy, compile=self.tc.compile,
                            compile_dynamic=not stage.pack_len)
        optimizer = build_optimizer(model, stage.lr, betas=self.tc.betas, weight_decay=self.tc.weight_decay)
        if k > 0:
            prev = self.plan.all_stages[k - 1]
            ckpt = latest_checkpoint(self.root / prev)
            if ckpt is None:
                raise TrainError(f"{(self.root / prev).uri}: stage {prev} has no final checkpoint to continue from")
            self._load(ckpt, model, None)
        return model, optimizer

    def _load(self, folder: Folder, model, optimizer) -> dict:
        """Every rank reads the full tensors (safetensors, no pickle) and keeps what it holds."""
        try:
            model_state, optim_state, trainer = checkpoints.read(folder, with_optimizer=optimizer is not None)
        except checkpoints.CheckpointError as e:
            raise TrainError(str(e)) from None
        checkpoints.apply_state(model, optimizer, model_state, optim_state)
        return trainer

    def _save(self, stage_dir: Folder, step: int, model, optimizer, trainer: dict) -> None:
        model_state, optim_state = checkpoints.gather_state(model, optimizer)  # every rank (FSDP2 gathers)
        if self.rank == 0:
            checkpoints.save(stage_dir / "ckpt", step, model_state, optim_state, trainer,
                             keep=self.tc.keep_checkpoints)
        _barrier()

    def _export(self, stage: StagePlan, model, history: list[dict]) -> None:
        import torch

        from model.decoder import Decoder
        from model.hf_checkpoint import save_decoder

        full, _ = checkpoints.gather_state(model, None)
        if self.rank == 0:
            with torch.device("meta"):
                plain = Decoder(self.args)
            plain.load_state_dict(full, assign=True)
            meta = {"preset": self.plan.binding["preset"], "args": self.plan.binding["args"],
                    "layout_fingerprint": self.plan.layout["fingerprint"], "layout": self.plan.layout,
                    "stage": stage.name, "stage_index": stage.index, "steps": stage.steps,
                    "px": stage.px, "dataset": self.plan.dataset, "final_loss": _final_loss(history)}
            if self.plan.movqgan:  # whose codes it learned: generate refuses another MoVQGAN
                meta["movqgan"] = self.plan.movqgan
            export = self.root / stage.name / "export"
            dtype = getattr(torch, self.tc.export_dtype)
            if export.local:
                save_decoder(plain, export.path, meta, dtype=dtype)
            else:  # written locally, then copied up file by file
                with tempfile.TemporaryDirectory() as tmp:
                    save_decoder(plain, tmp, meta, dtype=dtype)
                    export.upload(tmp)
        _barrier()

    # -- data ----------------------------------------------------------------------------------
    def _fetch(self, sched: StageSchedule, stage: StagePlan, step: int):
        from model.training import cfg_dropped, drop_context, make_batch, make_packed_batches

        b, rows = sched.rows_for(step, self.rank)
        table = self.ds.take(rows, columns=["id", "tokens", "loss_start", *SUPERVISE_COLUMNS[self.tc.supervise]])
        samples = []
        for rid, ids, start in zip(table.column("id").to_pylist(), table.column("tokens").to_pylist(),
                                   supervised_starts(table, self.tc.supervise)):
            if cfg_dropped(self.tc.seed, stage.index, step, rid, p=self.tc.cfg_drop):
                ids, start = drop_context(ids, start, self.plan.image_start)
            samples.append((ids, start))
        mb = stage.micro_batch
        if stage.pack_len:
            return b, make_packed_batches(samples, stage.pack_len, rows_per_batch=mb, device=self.device)
        return b, [make_batch(samples[i:i + mb], pad_multiple=self.tc.pad_multiple, device=self.device)
                   for i in range(0, len(samples), mb)]

    def _same_count(self, stage: StagePlan, batches: list) -> list:
        """Packed rows: every rank runs as many micro batches as the one with most (FSDP2 gathers
        parameters in each forward: the ranks must meet in every one); empty ones have no loss."""
        import torch
        import torch.distributed as dist

        from model.training import make_packed_batches

        if not stage.pack_len or self.world == 1:
            return batches
        n = torch.tensor([len(batches)], device=self.device)
        dist.all_reduce(n, op=dist.ReduceOp.MAX)
        extra = int(n) - len(batches)
        return batches + make_packed_batches([], stage.pack_len, stage.micro_batch, n_batches=extra,
                                             device=self.device) if extra else batches

    # -- the loop ------------------------------------------------------------------------------
    def run(self) -> None:
        for stage in self.plan.stages:
            if stage_done(self.root, stage.name):
                continue
            if not self.run_stage(stage):
                return

    def run_stage(self, stage: StagePlan) -> bool:
        """Train one stage to its end (True) or until max_nonfinite skips in a row (False)."""
        import torch

        from model.training import flops_per_token, lr_at, peak_flops, train_step

        stage_dir = self.root / stage.name
        if self.rank == 0:
            stage_dir.mkdir()
        _barrier()
        model, optimizer = self._build(stage)
        sched = StageSchedule(bucket_index(self.row_buckets, stage.buckets), self.rank_of, len(stage.buckets),
                              self.world, stage.micro_batch * stage.accum, self.tc.seed, stage.index)
        start, history = 0, []
        ckpt = latest_checkpoint(stage_dir)
        if ckpt is not None:
            trainer = self._load(ckpt, model, optimizer)
            start, history = trainer["step"], trainer["history"]
            log.info("%s: resumed at step %d from %s", stage.name, start, ckpt.uri)
        peak, peak_how = peak_flops(self.device, self.tc.peak_tflops)
        tb = _TensorBoard(self.root, stage.name, start) if self.rank == 0 else None
        fault = self._fault(stage)
        nonfinite = _nonfinite_run(history)
        pool = ThreadPoolExecutor(1)  # reads the next step's rows while this one computes
        pending = pool.submit(self._fetch, sched, stage, start) if start < stage.steps else None
        for step in range(start, stage.steps):
            b, batches = pending.result()
            batches = self._same_count(stage, batches)
            if step + 1 < stage.steps:
                pending = pool.submit(self._fetch, sched, stage, step + 1)
            lr = lr_at(step, peak=stage.lr, total=stage.steps, warmup=stage.warmup, decay=stage.decay,
                       min_ratio=stage.min_lr_ratio)
            torch.manual_seed(hash((self.tc.seed, stage.index, step, self.rank)) & 0x7FFFFFFF)  # dropout
            if self.device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            m = train_step(model, optimizer, batches, lr, z_loss=self.tc.z_loss, loss_chunk=self.tc.loss_chunk,
                           grad_clip=self.tc.grad_clip)
            if self.device.type == "cuda":
                torch.cuda.synchronize()
            dt = time.perf_counter() - t0
            seq = m["seq_tokens"] / (stage.global_batch)
            m.update(step=step + 1, bucket=stage.buckets[b], seconds=dt, tokens_per_s=m["seq_tokens"] / dt,
                     mfu=m["seq_tokens"] / dt * flops_per_token(model, int(seq)) / (peak * self.world))
            entry = {k: m[k] for k in ("step", "loss", "z_loss", "lr", "tokens", "seq_tokens", "bucket",
                                       "grad_norm", "tokens_per_s", "mfu")}
            if m["skipped"]:  # JSON has no NaN: the step is recorded as skipped, its loss as null
                entry.update(loss=None, z_loss=None, grad_norm=None, skipped=True)
                nonfinite += 1
                log.warning("%s step %d: non-finite loss or gradients (loss %s, grad norm %s): step skipped "
                            "(%d in a row, limit %d)", stage.name, step + 1, m["loss"], m["grad_norm"], nonfinite,
                            self.tc.max_nonfinite)
            else:
                nonfinite = 0
            history.append(entry)
            if nonfinite >= self.tc.max_nonfinite:
                # A decision, not a crash: every rank saw the same skips and stops here; the driver
                # raises the error (a Ray Train restart would only meet the same losses again).
                pool.shutdown(wait=True)
                if self.rank == 0:
                    stage_dir.write_json(STOPPED, {"error": (
                        f"{stage.name} step {step + 1}: {nonfinite} optimizer steps in a row with a non-finite "
                        f"loss or gradient (train.max_nonfinite {self.tc.max_nonfinite}); the run stopped. Lower "
                        f"the stage's lr or raise z_loss, then rerun: it resumes from the newest checkpoint under "
                        f"{(stage_dir / 'ckpt').uri}")})
                    tb.close()
                _barrier()
                return False
            if self.rank == 0:
                if not m["skipped"]:
                    log.info("%s step %d/%d loss %.4f lr %.2e %.0f tok/s mfu %.3f", stage.name, step + 1,
                             stage.steps, m["loss"], lr, m["tokens_per_s"], m["mfu"])
                tb.add(stage.name, {k: m[k] for k in ("loss", "z_loss", "lr", "tokens_per_s", "mfu", "grad_norm")
                                       if not (m["skipped"] and k in ("loss", "z_loss", "grad_norm"))}, step + 1)
            last = step + 1 == stage.steps
            if last or (step + 1) % self.tc.checkpoint_every == 0:
                trainer = {"format": FORMAT, "stage": stage.name, "step": step + 1,
                           "loader": sched.position(step + 1), "history": history, "binding": self.plan.binding}
                if self.rank == 0:
                    tb.sync()
                self._save(stage_dir, step + 1, model, optimizer, trainer)
            if fault and fault[0] == step + 1:
                self._inject_fault(stage_dir, fault[1])
        pool.shutdown()
        self._export(stage, model, history)
        if self.rank == 0:
            tb.close()
            ok = [h for h in history if not h.get("skipped")]
            summary = {"stage": stage.name, "index": stage.index, "steps": stage.steps,
                       "final_loss": _final_loss(history), "losses": [h["loss"] for h in history],
                       "skipped_steps": [h["step"] for h in history if h.get("skipped")],
                       "export": (stage_dir / "export").uri, "peak_flops": peak, "peak_flops_from": peak_how,
                       "tokens_per_s": float(np.median([h["tokens_per_s"] for h in ok])) if ok else None,
                       "mfu": float(np.median([h["mfu"] for h in ok])) if ok else None, "history": history}
            stage_dir.write_json("summary.json", summary)
            self.root.write_bytes("loss.png", loss_curve_png(collect_history(self.root, self.plan.all_stages)))
        _barrier()
        return True

    def _fault(self, stage: StagePlan) -> tuple[int, str] | None:
        """train.fault "stage:step[:how]" (tests only): after that step a worker dies, once per run.
        how: "self" (default) the last rank SIGKILLs itself; "announce": it writes its pid to
        <run>/fault-pid and waits there for the test to kill it (tests/tasks/test_train.py)."""
        spec = self.tc.fault
        if not spec or self.root.exists("fault-fired"):
            return None
        name, step, how = (spec.split(":") + ["self"])[:3]
        return (int(step), how) if name in (stage.name, str(stage.index + 1)) else None

    def _inject_fault(self, stage_dir: Folder, how: str) -> None:
        _barrier()
        if self.rank == 0:
            self.root.write_bytes("fault-fired", stage_dir.uri.encode())
        _barrier()
        if self.world > 1 and self.rank == self.world - 1:
            if how == "announce":
                self.root.write_bytes("fault-pid", str(os.getpid()).encode())
                time.sleep(600)  # the test kills this process on the file above; never returns in a test
            os.kill(os.getpid(), signal.SIGKILL)  # a worker dies as in a preemption
        if how == "announce":
            return  # the other ranks go on and meet the dead peer in their next collective
        raise RuntimeError(f"fault injected after {stage_dir.name} step (train.fault)")


def _final_loss(history: list[dict]) -> float | None:
    losses = [h["loss"] for h in history if h.get("loss") is not None]
    return losses[-1] if losses else None


def _nonfinite_run(history: list[dict]) -> int:
    """Skipped steps at the end of a resumed history: the count in a row goes on across a resume."""
    n = 0
    for h in reversed(history):
        if not h.get("skipped"):
            break
        n += 1
    return n


class _TensorBoard:
    """TensorBoard events of a stage under <run>/tb/<stage>/. Written where the run is when it is
    local; for an object-store run, into a local folder copied up at each checkpoint and at the
    end. purge_step drops events past the checkpoint that a killed run had logged."""

    def __init__(self, root: Folder, stage: str, start: int):
        from tensorboardX import SummaryWriter

        self.remote = root / "tb" / stage
        self.tmp = None if root.local else tempfile.TemporaryDirectory(prefix="panelforge-tb-")
        logdir = self.tmp.name if self.tmp else self.remote.path
        self.writer = SummaryWriter(logdir, purge_step=start + 1 if start else None)

    def add(self, stage: str, values: dict, step: int) -> None:
        for key, value in values.items():
            self.writer.add_scalar(f"{stage}/{key}", value, step)
        self.writer.flush()

    def sync(self) -> None:
        if self.tmp:
            self.writer.flush()
            self.remote.upload(self.tmp.name)

    def close(self) -> None:
        self.writer.close()
        self.sync()
        if self.tmp:
            self.tmp.cleanup()


def train_loop_per_worker(plan: TrainPlan) -> None:
    """Ray Train's entry point on each worker (the process group is already set up)."""
    import torch

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    if plan.device == "cpu":
        torch.set_num_threads(plan.threads)
    Worker(plan).run()


# --- metrics on disk ---------------------------------------------------------------------------

def collect_history(root: Folder | str, stages: list[str]) -> list[tuple[str, list[float]]]:
    """(stage, losses) of the finished stages; skipped (non-finite) steps are left out."""
    out = []
    for name in stages:
        s = stage_done(root, name)
        if s:
            out.append((name, [v for v in s["losses"] if v is not None]))
    return out


# --- the driver ----------------------------------------------------------------------------------

def train(cfg: PipelineConfig, stages: list[int] | None = None) -> dict:
    """Run the config's stages (all, or those indices) that are not done yet; return a summary.

    A stage whose summary.json exists is skipped; one with checkpoints resumes from the newest.
    """
    plan = plan_training(cfg)
    names = plan.all_stages
    wanted = [s for s in plan.stages if stages is None or s.index in stages]
    root = Folder(plan.run_dir)
    for s in wanted:  # a later stage starts from the previous one's final checkpoint
        if s.index > 0 and not stage_done(root, names[s.index - 1]) \
                and plan.stages[s.index - 1] not in wanted:
            raise TrainError(f"stage {s.name} needs stage {names[s.index - 1]} finished first")
    root.mkdir()
    if not root.is_file("run.json"):
        root.write_json("run.json", plan.binding)
    pending = [s for s in wanted if not stage_done(root, s.name)]
    for s in pending:  # the error of an earlier stop was raised then; this rerun tries again
        (root / s.name).delete_file(STOPPED)
    plan.stages = pending
    t0 = time.time()
    if pending:
        log.info("train: stages %s of %s on %d %s worker(s) -> %s", [s.name for s in pending], names,
                 plan.world, plan.device, root)
        if cfg.train.workers == 0:
            train_loop_local(plan)
        else:
            _fit_ray(cfg, plan)
    for s in pending:
        if (root / s.name).is_file(STOPPED):
            raise TrainError((root / s.name).read_json(STOPPED)["error"])
    done = {s.name: stage_done(root, s.name) for s in wanted}
    missing = [n for n, s in done.items() if s is None]
    if missing:
        raise TrainError(f"stages {missing} did not finish; rerun to resume from their checkpoints in {root.uri}")
    summaries = [{k: v for k, v in s.items() if k != "history"} for s in done.values()]
    return {"run_dir": root.uri, "stages": summaries, "ran": [s.name for s in pending],
            "loss_curve": root.display("loss.png"), "tensorboard": root.display("tb"),
            "final_loss": summaries[-1]["final_loss"] if summaries else None, "seconds": time.time() - t0}


def train_loop_local(plan: TrainPlan) -> None:
    """The same loop in this process, without Ray or a process group (one CPU, or one GPU with a
    one-rank group that parallelize() needs for FSDP2)."""
    import torch
    import torch.distributed as dist

    if plan.device == "cuda" and not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29511")
        dist.init_process_group("nccl", rank=0, world_size=1)
    Worker(plan).run()
    del torch


def _fit_ray(cfg: PipelineConfig, plan: TrainPlan) -> None:
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from tasks.ray_jobs import ray_started

    plan.threads = 1  # one core per CPU worker: reproducible sums, no oversubscription
    root = Folder(plan.run_dir)
    # Ray Train's own result files (not the checkpoints: those are ours, tasks/train/checkpoints.py) go
    # beside a local run, or into a local temporary folder when the run is on an object store.
    ray_dir = os.path.join(root.path, "ray") if root.local else \
        os.path.join(tempfile.gettempdir(), "panelforge-ray", cfg.train.run)
    with ray_started(cfg.ray):
        trainer = TorchTrainer(
            train_loop_per_worker, train_loop_config=plan,
            scaling_config=ScalingConfig(num_workers=plan.world, use_gpu=cfg.train.use_gpu,
                                         resources_per_worker=None if cfg.train.use_gpu else {"CPU": 1}),
            run_config=RunConfig(name="ray", storage_path=ray_dir,
                                 failure_config=FailureConfig(max_failures=cfg.train.max_failures)),
        )
        try:
            trainer.fit()
        except Exception as e:  # Ray wraps the worker's error; keep its message, say how to resume
            raise TrainError(f"training failed in Ray Train ({type(e).__name__}: {str(e)[:2000]}); rerun to resume "
                             f"from the newest checkpoint under {root.uri}") from e
