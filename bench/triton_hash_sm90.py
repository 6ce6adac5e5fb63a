"""Compile the step's int32 counter hash to Hopper (sm90) code with triton, on a machine without a GPU.

    pip install --target /tmp/tritonpkg triton && PYTHONPATH=/tmp/tritonpkg:. python -m bench.triton_hash_sm90

../shared/GPU.md: triton's PyPI wheel carries its own ptxas, so triton.compile(...,
GPUTarget("cuda", 90, 32)) runs on a CPU-only machine, and its front end refuses a 64-bit
constant added to a tl.arange index exactly as on the GPU. This compiles counter_hash_kernel,
the arithmetic of model/sampling.py's counter_bits written as a triton kernel (an index from
tl.arange, int32 throughout), and the former splitmix64 step (index + 0xBF58476D1CE4E5B9), which
must fail with "Scalar -4658895280553007687 is out of range for type int32". Not a test: triton
is not a project dependency on CPUs (docs/generate.md, "Compiling for CUDA").
"""
from __future__ import annotations

import sys

import triton
import triton.language as tl


@triton.jit
def _shr(x, s: tl.constexpr):
    return (x >> s) & ((1 << (32 - s)) - 1)


@triton.jit
def _mix(x):
    x = (x ^ _shr(x, 16)) * -0x7A1435B5  # murmur3 fmix32, constants as int32 (sampling._C1, _C2)
    x = (x ^ _shr(x, 13)) * -0x3D4D51CB
    return x ^ _shr(x, 16)


@triton.jit
def counter_hash_kernel(key_ptr, step_ptr, out_ptr, L: tl.constexpr):
    """counter_bits after the (seed, stream) key: step, then the index mixed on its own, 24 bits."""
    row = tl.program_id(0)
    key = tl.load(key_ptr + row)
    step = tl.load(step_ptr + row)
    idx = tl.arange(0, L)
    h = _mix(key + step * -0x7A1435B5)
    h = _mix(h ^ _mix(idx * -0x3D4D51CB + -0x61C88647))
    h = _mix(h + key)
    tl.store(out_ptr + row * L + idx, _shr(h, 8))


@triton.jit
def former_hash_step(out_ptr, L: tl.constexpr):
    idx = tl.arange(0, L)
    tl.store(out_ptr + idx, idx + -4658895280553007687)  # the former `index.long() + _M1`


def main() -> int:
    from triton.backends.compiler import GPUTarget

    target = GPUTarget("cuda", 90, 32)
    src = triton.compiler.ASTSource(fn=counter_hash_kernel, constexprs={"L": 16},
                                    signature={"key_ptr": "*i32", "step_ptr": "*i32", "out_ptr": "*i32",
                                               "L": "constexpr"})
    kernel = triton.compile(src, target=target)
    print(f"counter hash (int32): compiled for sm90, {len(kernel.asm['cubin'])} bytes of cubin")
    try:
        triton.compile(triton.compiler.ASTSource(fn=former_hash_step, constexprs={"L": 16},
                                                 signature={"out_ptr": "*i64", "L": "constexpr"}), target=target)
    except Exception as e:  # noqa: BLE001 - triton raises its CompilationError
        print(f"former hash (64-bit constant): refused, {str(e).strip().splitlines()[-1][:160]}")
        return 0
    print("former hash compiled: this triton no longer reproduces the GPU error")
    return 1


if __name__ == "__main__":
    sys.exit(main())
