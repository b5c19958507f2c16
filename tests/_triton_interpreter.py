"""Fixes for the Triton interpreter used by the CPU tests (not for the kernels themselves).

* bf16 dots. The interpreter stores bfloat16 tensors as raw uint16 bit patterns (numpy has no
  bfloat16), and its `tl.dot` multiplies those integers as they are (seen in triton 3.6 and 3.9),
  so every bf16 dot comes out as garbage on CPU while the same kernel is right on a GPU. We wrap
  the interpreter's dot to decode bf16 operands to float32 first, which is what the GPU's tensor
  cores compute with (bf16 products accumulated in fp32). Casts, loads and stores of bf16 are
  already right there.
* Rounding to fp8 (e4m3). fp8 is stored as uint8 bit patterns, and loads and widening casts
  (e4m3 -> fp16/bf16/fp32) are exact, but the narrowing cast fp32 -> e4m3 rounds ties away from
  zero, can drop the carry of a mantissa that rounds up, and flushes subnormals (seen in triton
  3.9: 7.75 -> 4, 200 -> 208, 2^-9 -> 0). The GPU rounds to nearest even, subnormals included,
  and saturates at +-448 (`cvt.rn.satfinite`). We replace that one conversion by `e4m3_bits`, the
  GPU's rule written out in numpy. It is deliberately not torch's cast: the reference backend
  quantizes with torch, so the tests that compare Triton's fp8 writes with the reference's bit
  for bit compare two independent roundings (tests/kernels/test_fp8.py checks `e4m3_bits` against
  hand-computed values too).

`PredictedSpecializations` (below) is the CPU stand-in for `minivllm.kernels.JitCounter`, and
`LaunchLog` lists the kernels a piece of code launches.
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


def _float32_values(handle) -> np.ndarray:
    import triton.language as tl

    if handle.dtype.scalar == tl.bfloat16:
        return _bf16_bits_to_float32(handle.data)
    return handle.data.astype(np.float32)


E4M3_MAX = 448.0  # 1.75 * 2^8: the largest finite e4m3 value
E4M3_MIN_NORMAL_EXP = -6  # exponents below this are subnormal: steps of 2^-9
E4M3_MANTISSA_BITS = 3
E4M3_BIAS = 7


def e4m3_bits(x: np.ndarray) -> np.ndarray:
    """float32 values -> their e4m3 (float8_e4m3fn) bit patterns, uint8, as a GPU converts them:
    round to nearest, ties to even, subnormals kept, saturated at +-448, NaN to NaN (0x7f).

    Every value is a count of steps of its binade: a step is 2^(e - 3) for |x| in [2^e, 2^(e+1))
    (3 mantissa bits), and 2^-9 for everything below the smallest normal, 2^-6. So rounding is
    rounding that count to an integer, ties to even (`np.rint`); a count that rounds up to 16
    is the next binade's 8, which the encoding below handles like any other value.
    """
    x = np.asarray(x, dtype=np.float32)
    magnitude = np.abs(x).astype(np.float64)  # float64 holds every float32 and every step exactly
    nan = np.isnan(magnitude)
    magnitude[nan] = 0.0
    _, exponent = np.frexp(magnitude)  # magnitude = m * 2^exponent with m in [0.5, 1)
    binade = np.maximum(exponent - 1, E4M3_MIN_NORMAL_EXP)
    step = np.ldexp(1.0, binade - E4M3_MANTISSA_BITS)
    rounded = np.minimum(np.rint(magnitude / step) * step, E4M3_MAX)
    # Encode: subnormals are multiples of 2^-9 with exponent field 0; normals 1.mmm * 2^e.
    _, exponent = np.frexp(rounded)
    normal = rounded >= 2.0 ** E4M3_MIN_NORMAL_EXP
    e = np.where(normal, exponent - 1, E4M3_MIN_NORMAL_EXP)
    mantissa = np.where(normal, np.ldexp(rounded, -e) - 1.0, np.ldexp(rounded, -E4M3_MIN_NORMAL_EXP))
    fields = np.where(normal, e + E4M3_BIAS, 0).astype(np.uint8) << E4M3_MANTISSA_BITS
    bits = fields | np.rint(np.ldexp(mantissa, E4M3_MANTISSA_BITS)).astype(np.uint8)
    bits[nan] = 0x7F
    return bits | (np.signbit(x).astype(np.uint8) << 7)


def patch_fp8_rounding() -> None:
    import triton.language as tl
    from triton.runtime import interpreter

    builder = interpreter.InterpreterBuilder
    if getattr(builder, "_minivllm_fp8_rounding", False):
        return
    original = builder.create_fp_to_fp

    def create_fp_to_fp(self, src, dst_type, rounding_mode):
        if dst_type.scalar == tl.float8e4nv and src.dtype.scalar in (
                tl.float32, tl.float16, tl.bfloat16):
            return interpreter.TensorHandle(e4m3_bits(_float32_values(src)), tl.float8e4nv)
        return original(self, src, dst_type, rounding_mode)

    builder.create_fp_to_fp = create_fp_to_fp
    builder._minivllm_fp8_rounding = True


class PredictedSpecializations:
    """What a GPU would compile, seen from the interpreter: the CPU stand-in for JitCounter.

    The interpreter compiles nothing, so `minivllm.kernels.JitCounter` cannot count there. But the
    key Triton compiles for is computed in Python before any compilation: its binder turns the
    launch arguments into (type, specialization) pairs, honouring `do_not_specialize` and
    `do_not_specialize_on_alignment`, and the launch options join them. While this context is
    active every interpreted launch is also passed through that same binder, built for a Hopper
    target, and the distinct keys are collected per kernel: a key not seen before is a kernel the
    GPU would compile.
    """

    def __init__(self):
        self.keys: dict[str, set] = {}
        self._original_run = None

    def _key(self, function, args, kwargs):
        from triton.backends.compiler import GPUTarget
        from triton.backends.nvidia.compiler import CUDABackend
        from triton.runtime.jit import JITFunction, create_function_from_signature

        options = {k: v for k, v in function.kwargs.items()
                   if k in ("do_not_specialize", "do_not_specialize_on_alignment")}
        jit = JITFunction(function.fn, **options)
        binder = create_function_from_signature(
            jit.signature, jit.params, CUDABackend(GPUTarget("cuda", 90, 32)))
        _, specialization, launch_options = binder(*args, **kwargs)
        return tuple(specialization), tuple(sorted(launch_options.items()))

    def __enter__(self):
        from triton.runtime import interpreter

        self._original_run = original = interpreter.InterpretedFunction.run
        recorder = self

        def run(function, *args, grid, warmup, **kwargs):
            key = recorder._key(function, args, kwargs)
            recorder.keys.setdefault(function.fn.__name__, set()).add(key)
            return original(function, *args, grid=grid, warmup=warmup, **kwargs)

        interpreter.InterpretedFunction.run = run
        return self

    def __exit__(self, *exc):
        from triton.runtime import interpreter

        interpreter.InterpretedFunction.run = self._original_run

    def count(self) -> int:
        return sum(len(keys) for keys in self.keys.values())

    def new_since(self, before: dict[str, set]) -> dict[str, list]:
        """Keys per kernel that were not in `before` (a copy of `keys` taken earlier)."""
        return {name: sorted(map(str, keys - before.get(name, set())))
                for name, keys in self.keys.items() if keys - before.get(name, set())}

    def snapshot(self) -> dict[str, set]:
        return {name: set(keys) for name, keys in self.keys.items()}


class LaunchLog(list):
    """The names of the Triton kernels launched while active, in order. Only the interpreter
    can be watched: on a GPU (TRITON_INTERPRET unset) it stays empty."""

    def __enter__(self):
        import os

        self._run = None
        if os.environ.get("TRITON_INTERPRET") != "1":
            return self
        from triton.runtime import interpreter

        self._run = original = interpreter.InterpretedFunction.run

        def run(function, *args, **kwargs):
            self.append(function.fn.__name__)
            return original(function, *args, **kwargs)

        interpreter.InterpretedFunction.run = run
        return self

    def __exit__(self, *exc):
        if self._run is not None:
            from triton.runtime import interpreter

            interpreter.InterpretedFunction.run = self._run
