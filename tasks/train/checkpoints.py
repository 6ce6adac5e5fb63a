"""Training run folders on any filesystem pyarrow reaches, and checkpoints that load no pickle.

    python -c "from tasks.train.checkpoints import Folder; f = Folder('/tmp/pf-ckpt-demo'); f.write_json('a.json', {'x': 1}); print(f.read_json('a.json'), f.uri)"

A run folder (`<workdir>/runs/<run>/`) may be a local path or an object-store URI (`s3://...`):
every read and write goes through pyarrow.fs (storage/uri.py resolves the URI; credentials
come from the environment), never through pathlib, which turns `s3://b/x` into the local
folder `s3:/b/x`.

A checkpoint `stage-k/ckpt/step-NNNNNNN/` holds
    model.safetensors      the full (unsharded) model state, fp32
    optimizer.safetensors  the optimizer's per-parameter tensors (exp_avg, exp_avg_sq, step)
    trainer.json           step, loader position, loss history, the optimizer's param groups:
                           the completeness marker, written LAST and removed FIRST
so a checkpoint is complete exactly when trainer.json exists, whatever moment a kill lands
on: a save killed before the marker leaves a folder that is ignored (and removed by the next
save); pruning removes the marker before the tensors, so a half-pruned folder is ignored too.
Nothing here unpickles: tensors are safetensors, metadata is JSON; a folder in
torch.distributed.checkpoint's format (a pickled `.metadata`) is refused with a clear error.

On GPUs (FSDP2) the full tensors are gathered with torch's state-dict API (DTensor
full_tensor) and, on load, every rank reads the full tensors and keeps its shard
(distribute_tensor); on CPUs (DDP on gloo) the state dicts are plain.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import uuid

import pyarrow.fs as pafs

from storage.uri import resolve

FORMAT = 2  # 1: torch.distributed.checkpoint (pickled .metadata); 2: safetensors + JSON
MARKER = "trainer.json"
MODEL_FILE = "model.safetensors"
OPTIM_FILE = "optimizer.safetensors"
_STEP = re.compile(r"^step-(\d+)$")

# Test hook: called with the name of each point a save or a prune passes (tests/tasks/
# test_checkpoints.py stops the writer there and kills it). None in normal runs.
POINT_HOOK = None


def _point(name: str) -> None:
    if POINT_HOOK is not None:
        POINT_HOOK(name)


class CheckpointError(ValueError):
    """A checkpoint cannot be read: what, where, what to do."""


class Folder:
    """A folder on a pyarrow filesystem: a local path, file:// or s3:// (storage/uri.py)."""

    def __init__(self, where: str | os.PathLike):
        loc = resolve(where)
        self.fs, self.path, self.uri, self.local = loc.fs, loc.path.rstrip("/"), loc.uri.rstrip("/"), loc.local

    @classmethod
    def _at(cls, fs: pafs.FileSystem, path: str, uri: str, local: bool) -> Folder:
        f = cls.__new__(cls)
        f.fs, f.path, f.uri, f.local = fs, path.rstrip("/"), uri.rstrip("/"), local
        return f

    def __eq__(self, other) -> bool:
        return isinstance(other, Folder) and (self.uri, self.local) == (other.uri, other.local)

    def __repr__(self) -> str:
        return f"Folder({self.uri!r})"

    def __truediv__(self, name: str) -> Folder:
        return Folder._at(self.fs, f"{self.path}/{name}", f"{self.uri}/{name}", self.local)

    def __str__(self) -> str:
        return self.uri

    @property
    def name(self) -> str:
        return self.path.rsplit("/", 1)[-1]

    def _p(self, name: str | None) -> str:
        return self.path if name is None else f"{self.path}/{name}"

    def display(self, name: str | None = None) -> str:
        return self.uri if name is None else f"{self.uri}/{name}"

    def exists(self, name: str | None = None) -> bool:
        return self.fs.get_file_info(self._p(name)).type != pafs.FileType.NotFound

    def is_file(self, name: str | None = None) -> bool:
        return self.fs.get_file_info(self._p(name)).type == pafs.FileType.File

    def mkdir(self) -> None:
        self.fs.create_dir(self.path, recursive=True)

    def read_bytes(self, name: str | None = None) -> bytes:
        with self.fs.open_input_stream(self._p(name)) as f:
            return f.read()

    def read_json(self, name: str | None = None):
        raw = self.read_bytes(name)
        try:
            return json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{self.display(name)}: not JSON ({e})") from None

    def write_bytes(self, name: str, data: bytes) -> None:
        """Readers see the old file or the new one, never half: rename locally, one PUT on S3."""
        self.mkdir()
        if self.local:
            tmp = self._p(f".{name}.{uuid.uuid4().hex}.tmp")
            with self.fs.open_output_stream(tmp) as f:
                f.write(data)
            self.fs.move(tmp, self._p(name))
        else:
            with self.fs.open_output_stream(self._p(name)) as f:
                f.write(data)

    def write_json(self, name: str, data) -> None:
        self.write_bytes(name, json.dumps(data, indent=1, default=str).encode())

    def delete_file(self, name: str) -> None:
        try:
            self.fs.delete_file(self._p(name))
        except FileNotFoundError:
            pass

    def delete(self) -> None:
        if self.exists():
            self.fs.delete_dir(self.path)

    def children(self) -> list[Folder]:
        if not self.exists():
            return []
        infos = self.fs.get_file_info(pafs.FileSelector(self.path, allow_not_found=True))
        return [Folder._at(self.fs, i.path, f"{self.uri}/{i.base_name}", self.local)
                for i in infos if i.type == pafs.FileType.Directory]

    def upload(self, local_dir: str) -> None:
        """Copy a local folder's files into this folder (exports, TensorBoard events)."""
        if self.local and os.path.abspath(local_dir) == os.path.abspath(self.path):
            return
        self.mkdir()
        pafs.copy_files(local_dir, self.path, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=self.fs)

    def download(self, local_dir: str) -> None:
        os.makedirs(local_dir, exist_ok=True)
        pafs.copy_files(self.path, local_dir, source_filesystem=self.fs, destination_filesystem=pafs.LocalFileSystem())


# --- checkpoints ---------------------------------------------------------------------------------

def step_folders(ckpt: Folder) -> list[tuple[int, Folder]]:
    out = []
    for f in ckpt.children():
        m = _STEP.match(f.name)
        if m:
            out.append((int(m.group(1)), f))
    return sorted(out, key=lambda x: x[0])


def latest(ckpt: Folder) -> Folder | None:
    """The newest complete checkpoint (its marker exists) under a stage's ckpt/ folder."""
    done = [f for _, f in step_folders(ckpt) if f.is_file(MARKER)]
    return done[-1] if done else None


def flatten_optimizer(osd: dict) -> tuple[dict, dict]:
    """A full optimizer state dict -> (tensors keyed "<param fqn>/<key>", JSON-able rest)."""
    import torch

    tensors, scalars = {}, {}
    for fqn, state in osd.get("state", {}).items():
        for key, value in state.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{fqn}/{key}"] = value.detach().to("cpu").contiguous()
            else:
                scalars[f"{fqn}/{key}"] = value
    return tensors, {"param_groups": osd.get("param_groups", []), "scalars": scalars}


def unflatten_optimizer(tensors: dict, meta: dict) -> dict:
    state: dict = {}
    for key, value in list(tensors.items()) + list(meta.get("scalars", {}).items()):
        fqn, _, name = key.rpartition("/")
        state.setdefault(fqn, {})[name] = value
    return {"state": state, "param_groups": meta.get("param_groups", [])}


def _write_tensors(folder: Folder, name: str, tensors: dict) -> None:
    from safetensors.torch import save_file

    if folder.local:
        folder.mkdir()
        save_file(tensors, folder._p(name))
        return
    with tempfile.TemporaryDirectory() as tmp:
        save_file(tensors, os.path.join(tmp, name))
        with open(os.path.join(tmp, name), "rb") as src, folder.fs.open_output_stream(folder._p(name)) as dst:
            shutil.copyfileobj(src, dst, 16 * 2**20)


def _read_tensors(folder: Folder, name: str) -> dict:
    from safetensors import SafetensorError
    from safetensors.torch import load, load_file

    where = folder.display(name)
    if not folder.is_file(name):
        raise CheckpointError(f"{where}: missing in a checkpoint marked complete; delete {folder.uri} to resume "
                              "from the checkpoint before it")
    try:
        return load_file(folder._p(name)) if folder.local else load(folder.read_bytes(name))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{where}: not a readable safetensors file ({e}); delete {folder.uri} to resume "
                              "from the checkpoint before it") from None


def save(ckpt: Folder, step: int, model_state: dict, optim_state: dict | None, trainer: dict,
         keep: int = 2) -> Folder:
    """Write step-<step>/ (tensors, then the marker), then prune to the newest `keep` complete ones.

    Call on the rank that holds the full state dicts (rank 0). Returns the new folder.
    """
    folder = ckpt / f"step-{step:07d}"
    if folder.exists():  # a save of a killed run: it has no marker, or a stale one; never half-trusted
        folder.delete_file(MARKER)
        folder.delete()
    folder.mkdir()
    _write_tensors(folder, MODEL_FILE, {k: v.detach().to("cpu").contiguous() for k, v in model_state.items()})
    _point("save:model-written")
    meta = {}
    if optim_state is not None:
        tensors, meta = flatten_optimizer(optim_state)
        _write_tensors(folder, OPTIM_FILE, tensors)
    _point("save:tensors-written")
    folder.write_json(MARKER, {**trainer, "checkpoint_format": FORMAT, "optimizer": meta if optim_state else None})
    _point("save:marker-written")
    prune(ckpt, keep)
    return folder


def prune(ckpt: Folder, keep: int) -> None:
    """Keep the newest `keep` complete checkpoints; remove older ones and any incomplete one
    older than the newest complete (a killed save). Each removal takes the marker first."""
    steps = step_folders(ckpt)
    complete = [(s, f) for s, f in steps if f.is_file(MARKER)]
    if not complete:
        return
    newest = complete[-1][0]
    keep_steps = {s for s, _ in complete[-max(1, keep):]}
    for s, f in steps:
        if s in keep_steps or s > newest:
            continue
        f.delete_file(MARKER)
        _point("prune:marker-removed")
        f.delete()
        _point("prune:folder-removed")


def read(folder: Folder, with_optimizer: bool = True) -> tuple[dict, dict | None, dict]:
    """(model state, optimizer state or None, trainer.json) of a complete checkpoint; no pickle."""
    if not folder.is_file(MARKER):
        raise CheckpointError(f"{folder.uri}: no {MARKER}: not a complete checkpoint")
    trainer = folder.read_json(MARKER)
    fmt = trainer.get("checkpoint_format", 1)
    if fmt != FORMAT or folder.exists(".metadata"):
        raise CheckpointError(
            f"{folder.uri}: a checkpoint in torch.distributed.checkpoint's format (format {fmt}, a pickled "
            ".metadata), which is never loaded because unpickling a file from the workdir can run any code; "
            f"delete this folder (or the whole stage's ckpt/ folder) and rerun: training resumes from an older "
            "checkpoint or restarts the stage")
    model = _read_tensors(folder, MODEL_FILE)
    optim = None
    if with_optimizer:
        if trainer.get("optimizer") is None:
            raise CheckpointError(f"{folder.uri}: a weights-only checkpoint, the optimizer state is missing")
        optim = unflatten_optimizer(_read_tensors(folder, OPTIM_FILE), trainer["optimizer"])
    return model, optim, trainer


# --- state dicts across ranks ------------------------------------------------------------------

def gather_state(model, optimizer) -> tuple[dict, dict | None]:
    """Full state dicts (cpu, unsharded). Every rank calls it (FSDP2 gathers); rank 0 gets them."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_state_dict,
    )

    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    if optimizer is None:
        return get_model_state_dict(model, options=opts), None
    return get_state_dict(model, optimizer, options=opts)


def apply_state(model, optimizer, model_state: dict, optim_state: dict | None) -> None:
    """Load full state dicts on every rank: plain on DDP, each rank keeps its shard on FSDP2."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_model_state_dict,
        set_state_dict,
    )

    opts = StateDictOptions(full_state_dict=True)
    if optimizer is None or optim_state is None:
        set_model_state_dict(model, model_state, options=opts)
    else:
        set_state_dict(model, optimizer, model_state_dict=model_state, optim_state_dict=optim_state, options=opts)
