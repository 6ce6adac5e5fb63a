"""Weight-only quantization of the decoder with torchao: int4 (group 128) on CUDA, int8 on CPU.

    python -c "from model.decoder import *; from model.quantize import quantize_decoder; print(quantize_decoder(Decoder(ModelArgs.from_name('tiny', vocab_size=512)), 'int8').layers[0].attention.wqkv.weight)"

Paper 4.3.2: int4 weight-only, group size 128, bf16 activations (-48% time, -47% memory).
torchao 0.18's default int4 packing needs a package not on PyPI (mslk); the tile_packed_to_4d
format works on H100 (REFERENCE.md, "Measured here"). Int4 kernels are CUDA-only, so CPUs use
int8 weight-only, the path the tests exercise. Only the transformer blocks' linear layers are
quantized: the embedding is a lookup, and the engine keeps just the image rows of the output
head (model/engine.py), in the model's own dtype. q/k/v and gate/up are fused first
(Decoder.fuse_projections): one quantized GEMM where there were three.
"""
from __future__ import annotations

import torch
from torch import nn

MODES = ("none", "int8", "int4")


def _block_linear(module: nn.Module, fqn: str) -> bool:
    return isinstance(module, nn.Linear) and fqn.startswith("layers.")


def quantize_decoder(model: nn.Module, mode: str, group_size: int = 128) -> nn.Module:
    """Quantize the model in place ('none', 'int8' weight-only, 'int4' weight-only on CUDA)."""
    if mode not in MODES:
        raise ValueError(f"quantization {mode!r}: expected one of {MODES}")
    if mode == "none":
        return model
    from torchao.quantization import Int4WeightOnlyConfig, Int8WeightOnlyConfig, quantize_

    device = next(model.parameters()).device
    if hasattr(model, "fuse_projections"):
        model.fuse_projections()  # before quantizing: the fused weight is quantized as one
    if mode == "int4":
        if device.type != "cuda":
            raise ValueError("int4 weight-only needs the model on a CUDA GPU (torchao has no CPU int4 kernel); "
                             "use 'int8' on CPU")
        for name, lin in model.named_modules():
            if _block_linear(lin, name) and lin.in_features % group_size:
                raise ValueError(f"int4 group size {group_size} does not divide {name}.in_features {lin.in_features}")
        model.to(torch.bfloat16)  # int4 kernels take bf16 activations
        config = Int4WeightOnlyConfig(group_size=group_size, int4_packing_format="tile_packed_to_4d")
    else:
        config = Int8WeightOnlyConfig()
    quantize_(model, config, filter_fn=_block_linear)
    return model


def weight_bytes(model: nn.Module) -> int:
    """Bytes held by the parameters (quantized tensors count their packed storage)."""
    total = 0
    for p in model.parameters():
        t = p.data if hasattr(p, "data") else p
        inner = getattr(t, "__tensor_flatten__", None)
        if inner is not None:
            names, _ = t.__tensor_flatten__()
            total += sum(getattr(t, n).numel() * getattr(t, n).element_size() for n in names
                         if isinstance(getattr(t, n), torch.Tensor))
        else:
            total += t.numel() * t.element_size()
    return total
