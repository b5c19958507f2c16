"""A fix for the Triton interpreter used by the CPU tests (not for the kernels themselves).

The interpreter stores bfloat16 tensors as raw uint16 bit patterns (numpy has no bfloat16), and
its `tl.dot` multiplies those integers as they are (seen in triton 3.6 and 3.9), so every bf16 dot
comes out as garbage on CPU while the same kernel is right on a GPU. We wrap the interpreter's dot
to decode bf16 operands to float32 first, which is what the GPU's tensor cores compute with
(bf16 products accumulated in fp32). Casts, loads and stores of bf16 are already right there.
"""

import numpy as np


def _bf16_bits_to_float32(bits: np.ndarray) -> np.ndarray:
    # A bfloat16 is the upper half of a float32: shift its 16 bits back into place.
    return (bits.astype(np.uint32) << 16).view(np.float32)


def patch_bf16_dot() -> None:
    import triton.language as tl
    from triton.runtime import interpreter

    builder = interpreter.InterpreterBuilder
    if getattr(builder, "_minivllm_bf16_dot", False):
        return
    original = builder.create_dot

    def create_dot(self, a, b, d, *args, **kwargs):
        if a.dtype.scalar == tl.bfloat16 or b.dtype.scalar == tl.bfloat16:
            a = interpreter.TensorHandle(_bf16_bits_to_float32(a.data), tl.float32)
            b = interpreter.TensorHandle(_bf16_bits_to_float32(b.data), tl.float32)
        return original(self, a, b, d, *args, **kwargs)

    builder.create_dot = create_dot
    builder._minivllm_bf16_dot = True
