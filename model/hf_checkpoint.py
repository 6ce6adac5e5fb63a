"""Decoder checkpoints in the release's format: a transformers ChameleonForConditionalGeneration folder.

    python -c "from model.hf_checkpoint import load_decoder; m, meta = load_decoder('path/to/Lumina-mGPT-2.0'); print(m.args, meta)"

A folder holds config.json plus model.safetensors, or shards model-0000k-of-0000n.safetensors
with model.safetensors.index.json (the released 7B). The state-dict adapter below is the only
place that knows the transformers key names, so model/decoder.py never bends to a file format
(STYLE.md: torchtitan). Our own checkpoints add panelforge.json (preset, layout fingerprint,
training stage ...), which transformers ignores; transformers loads what we save
(tests/model/test_hf_checkpoint.py).
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from model.decoder import Decoder, ModelArgs, rope_tables

META_FILE = "panelforge.json"
INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"

# ours -> transformers, per layer (the {} is the layer number).
_LAYER_KEYS = {
    "attention.wq.weight": "self_attn.q_proj.weight",
    "attention.wk.weight": "self_attn.k_proj.weight",
    "attention.wv.weight": "self_attn.v_proj.weight",
    "attention.wo.weight": "self_attn.o_proj.weight",
    "attention.q_norm.weight": "self_attn.q_norm.weight",
    "attention.q_norm.bias": "self_attn.q_norm.bias",
    "attention.k_norm.weight": "self_attn.k_norm.weight",
    "attention.k_norm.bias": "self_attn.k_norm.bias",
    "feed_forward.w1.weight": "mlp.gate_proj.weight",
    "feed_forward.w3.weight": "mlp.up_proj.weight",
    "feed_forward.w2.weight": "mlp.down_proj.weight",
    "attention_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
}
_TOP_KEYS = {
    "tok_embeddings.weight": "model.embed_tokens.weight",
    "norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_HF_LAYER_KEYS = {v: k for k, v in _LAYER_KEYS.items()}
_HF_TOP_KEYS = {v: k for k, v in _TOP_KEYS.items()}
# Chameleon's own image tokenizer lives in the same folder in transformers' layout; Lumina-mGPT
# uses MoVQGAN instead, so these keys are skipped on load (and counted in the meta).
_IGNORED_PREFIXES = ("model.vqmodel.",)
_LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.(.+)$")


class CheckpointError(ValueError):
    """A checkpoint folder that cannot be loaded as a decoder; the message says which file and why."""


def to_hf_state_dict(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in state_dict.items():
        if key in _TOP_KEYS:
            out[_TOP_KEYS[key]] = value
            continue
        m = re.match(r"^layers\.(\d+)\.(.+)$", key)
        if not m or m.group(2) not in _LAYER_KEYS:
            raise KeyError(f"to_hf_state_dict: no transformers name for {key!r}")
        out[f"model.layers.{m.group(1)}.{_LAYER_KEYS[m.group(2)]}"] = value
    return out


def hf_key_to_ours(key: str) -> str | None:
    """The decoder's name for a transformers key; None for keys we skip (the VQ model)."""
    if key.startswith(_IGNORED_PREFIXES):
        return None
    if key in _HF_TOP_KEYS:
        return _HF_TOP_KEYS[key]
    m = _LAYER_RE.match(key)
    if m and m.group(2) in _HF_LAYER_KEYS:
        return f"layers.{m.group(1)}.{_HF_LAYER_KEYS[m.group(2)]}"
    raise KeyError(key)


def _fit_qk_norm(key: str, value: torch.Tensor, args: ModelArgs) -> torch.Tensor:
    # transformers stores the qk-norm as [heads, head_dim]; accept a flat or shared-per-head copy too.
    if ".q_norm." in key or ".k_norm." in key:
        heads = args.n_heads if ".q_norm." in key else args.n_kv_heads
        if value.numel() == heads * args.head_dim:
            return value.reshape(heads, args.head_dim)
        if value.numel() == args.head_dim:
            return value.reshape(1, args.head_dim).expand(heads, args.head_dim).clone()
    return value


def args_to_hf_config(args: ModelArgs, dtype: torch.dtype) -> dict:
    return {
        "architectures": ["ChameleonForConditionalGeneration"],
        "model_type": "chameleon",
        "vocab_size": args.vocab_size,
        "hidden_size": args.dim,
        "intermediate_size": args.intermediate_size,
        "num_hidden_layers": args.n_layers,
        "num_attention_heads": args.n_heads,
        "num_key_value_heads": args.n_kv_heads,
        "hidden_act": "silu",
        "max_position_embeddings": args.max_seq_len,
        "rms_norm_eps": args.norm_eps,
        "rope_theta": args.rope_theta,  # transformers 4.x reads this
        "rope_parameters": {"rope_type": "default", "rope_theta": args.rope_theta},  # 5.x
        "attention_bias": False,
        "attention_dropout": args.attn_dropout,
        "mlp_bias": False,
        "swin_norm": False,
        "tie_word_embeddings": False,
        "model_parallel_size": 1,
        "torch_dtype": str(dtype).removeprefix("torch."),
        # transformers' ChameleonModel needs a vocabulary map and builds Chameleon's VQ-GAN; neither
        # is used here (MoVQGAN codes are plain ids), so both are minimal placeholders.
        "vocabulary_map": {},
        "vq_config": {"embed_dim": 4, "num_embeddings": 16, "latent_channels": 4, "resolution": 32,
                      "base_channels": 32, "channel_multiplier": [1], "num_res_blocks": 1,
                      "attn_resolutions": []},
    }


def args_from_hf_config(cfg: dict, source: str = "config.json") -> ModelArgs:
    if cfg.get("swin_norm"):
        raise CheckpointError(f"{source}: swin_norm=true (post-norm) is not supported; the release uses false")
    for flag in ("attention_bias", "mlp_bias", "tie_word_embeddings"):
        if cfg.get(flag):
            raise CheckpointError(f"{source}: {flag}=true is not the Lumina-mGPT 2.0 architecture")
    rope = cfg.get("rope_parameters") or {}
    theta = rope.get("rope_theta", cfg.get("rope_theta", 10000.0))
    if rope.get("rope_type", "default") != "default" or cfg.get("rope_scaling"):
        raise CheckpointError(f"{source}: rope scaling is not supported (got {rope or cfg.get('rope_scaling')})")
    try:
        return ModelArgs(
            vocab_size=int(cfg["vocab_size"]), dim=int(cfg["hidden_size"]), n_layers=int(cfg["num_hidden_layers"]),
            n_heads=int(cfg["num_attention_heads"]),
            n_kv_heads=int(cfg.get("num_key_value_heads") or cfg["num_attention_heads"]),
            intermediate_size=int(cfg["intermediate_size"]),
            max_seq_len=int(cfg.get("max_position_embeddings", 10240)), rope_theta=float(theta),
            norm_eps=float(cfg.get("rms_norm_eps", 1e-5)), attn_dropout=float(cfg.get("attention_dropout") or 0.0))
    except KeyError as e:
        raise CheckpointError(f"{source}: missing field {e.args[0]!r}") from None


def save_decoder(model: Decoder, folder: str | Path, meta: dict | None = None,
                 max_shard_bytes: int = 5 * 2**30, dtype: torch.dtype | None = None) -> Path:
    """Write config.json, the weights (sharded above max_shard_bytes, with the index) and panelforge.json."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    sd = {k: v.detach() for k, v in model.state_dict().items()}
    dtype = dtype or sd["output.weight"].dtype
    hf = {k: v.to("cpu", dtype).contiguous() for k, v in to_hf_state_dict(sd).items()}
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for key in sorted(hf, key=_natural_key):
        nbytes = hf[key].numel() * hf[key].element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = hf[key]
        size += nbytes
    for stale in list(folder.glob("model*.safetensors")) + [folder / INDEX_FILE]:
        stale.unlink(missing_ok=True)
    if len(shards) == 1:
        save_file(shards[0], str(folder / SINGLE_FILE), metadata={"format": "pt"})
    else:
        weight_map = {}
        for i, shard in enumerate(shards, 1):
            name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, str(folder / name), metadata={"format": "pt"})
            weight_map.update({k: name for k in shard})
        total = sum(v.numel() * v.element_size() for v in hf.values())
        (folder / INDEX_FILE).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map},
                                                    indent=2))
    (folder / "config.json").write_text(json.dumps(args_to_hf_config(model.args, dtype), indent=2))
    (folder / META_FILE).write_text(json.dumps(meta or {}, indent=2, sort_keys=True))
    return folder


def _natural_key(key: str):
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", key)]


def weight_files(folder: Path) -> list[Path]:
    index = folder / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (ValueError, KeyError) as e:
            raise CheckpointError(f"{index}: not a safetensors index ({e})") from None
        files = [folder / n for n in sorted(set(weight_map.values()))]
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise CheckpointError(f"{index}: shard files listed but absent: {missing}")
        return files
    if (folder / SINGLE_FILE).is_file():
        return [folder / SINGLE_FILE]
    raise CheckpointError(f"{folder}: no {SINGLE_FILE} or {INDEX_FILE} (is this a transformers model folder?)")


def cpu_has_fast_bf16() -> bool:
    """Whether this CPU's oneDNN has bf16 kernels (AVX-512 BF16 / AMX, or AVX-512 emulation). Without
    them (AVX2 machines: most laptops and many cloud VMs) a bf16 matmul is emulated element by element,
    about 10x slower than float32 (`python -m bench.cpu_dtype`)."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a torch without the probe: assume the slow case
        return False


def generation_dtype(device: str | torch.device) -> torch.dtype | None:
    """The dtype to load a decoder in for generating on `device`: None (the checkpoint's own, bf16
    for the release and the shipped tiny one) on a GPU and on a CPU with bf16 kernels; float32 on a
    CPU without them, where it is several times faster and twice the weights' memory."""
    if torch.device(device).type != "cpu" or cpu_has_fast_bf16():
        return None
    return torch.float32


def load_decoder(folder: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
                 expect: ModelArgs | None = None) -> tuple[Decoder, dict]:
    """Load a transformers-format folder into a Decoder -> (model in eval mode, meta).

    meta is panelforge.json ({} for the release's own folder) plus "skipped_keys" (the count of
    Chameleon VQ-GAN tensors ignored). expect: fail unless the folder has this architecture
    (a checkpoint from another preset).
    """
    folder = Path(folder)
    cfg_path = folder / "config.json"
    if not cfg_path.is_file():
        raise CheckpointError(f"{folder}: no config.json (expected a transformers Chameleon folder)")
    args = args_from_hf_config(json.loads(cfg_path.read_text()), str(cfg_path))
    if expect is not None and (diff := expect.matches(args)):
        raise CheckpointError(f"{folder}: architecture differs from the expected one in {diff}: "
                              f"another preset's checkpoint?")
    sd, skipped, unexpected = {}, 0, []
    for path in weight_files(folder):
        with safe_open(str(path), framework="pt", device="cpu") as f:
            for key in f.keys():
                try:
                    ours = hf_key_to_ours(key)
                except KeyError:
                    unexpected.append(f"{path.name}:{key}")
                    continue
                if ours is None:
                    skipped += 1
                    continue
                t = f.get_tensor(key)
                sd[ours] = _fit_qk_norm(ours, t.to(dtype) if dtype else t, args).to(device)
    with torch.device("meta"):
        model = Decoder(args)
    expected = set(model.state_dict())
    missing = sorted(expected - set(sd))
    if missing or unexpected:
        raise CheckpointError(f"{folder}: weights do not match the decoder: missing {missing[:8]}"
                              f"{' ...' if len(missing) > 8 else ''}, unexpected {unexpected[:8]}")
    for key, t in sd.items():
        want = model.state_dict()[key].shape
        if t.shape != want:
            raise CheckpointError(f"{folder}: {key} has shape {tuple(t.shape)}, expected {tuple(want)}")
    model.load_state_dict(sd, strict=True, assign=True)
    cos, sin = rope_tables(args.head_dim, args.max_seq_len, args.rope_theta)
    model.rope_cos, model.rope_sin = cos.to(device), sin.to(device)
    meta_path = folder / META_FILE
    meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
    meta["skipped_keys"] = skipped
    return model.eval(), meta
