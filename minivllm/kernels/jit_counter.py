"""Count Triton JIT compilations: did this code compile a kernel it had not compiled before?

A `@triton.jit` kernel is compiled once per *specialization*: the argument types, the value of
every `tl.constexpr`, the launch options (num_warps, num_stages) and what Triton infers from the
runtime values it sees. Unless told otherwise it specializes an integer argument on being 1 and on
being divisible by 16, and a pointer argument on being 16-byte aligned. So an argument whose value
changes from one call to the next (a batch size, a token count) can make an *old* kernel compile
*again*, a second or so on a GPU, in the middle of serving. Listing such arguments in
`@triton.jit(do_not_specialize=[...])` (and pointers in `do_not_specialize_on_alignment`) is the
fix; this counter is how to see that it worked:

    with JitCounter() as jit:
        run_some_steps()
    assert jit.count == 0, jit.summary()

It installs Triton's `knobs.runtime.jit_post_compile_hook` (Triton 3.3 and later, checked on 3.6
and 3.9), which Triton calls after each compilation, a hit in Triton's on-disk cache included:
that is still a new specialization in this process. Under the interpreter (TRITON_INTERPRET=1, the
CPU tests) nothing is compiled and the hook never runs, so the counter says `available = False`
with the reason instead of counting zero.
"""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass


@dataclass(frozen=True)
class Compilation:
    kernel: str  # the kernel's qualified name, e.g. "_merge_splits_kernel"
    specialization: str  # argument types and divisibility, constexpr values, launch options


def unavailable_reason() -> str | None:
    """Why compilations cannot be counted here (None: they can)."""
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        return "Triton runs in the interpreter (TRITON_INTERPRET=1), which compiles nothing"
    try:
        from triton import knobs
    except ImportError:
        return "this Triton has no triton.knobs (it came in Triton 3.3), or Triton is missing"
    if not hasattr(knobs.runtime, "jit_post_compile_hook"):
        return "this Triton has no knobs.runtime.jit_post_compile_hook"
    return None


def _describe(fn, compile: dict) -> str:
    """Readable specialization: `name:type` (+ `/16` when Triton assumed divisibility by 16, which
    for a pointer means 16-byte alignment), `NAME=value` for constexprs, then the launch options."""
    try:
        attrs = compile["configs"][0]
        parts = []
        for i, param in enumerate(fn.jit_function.params):
            kind = compile["signature"][param.name]
            if kind == "constexpr":
                parts.append(f"{param.name}={compile['constants'].get((i,))}")
            else:
                parts.append(f"{param.name}:{kind}" + ("/16" if attrs.get((i,)) else ""))
        parts.append(f"num_warps={compile['num_warps']} num_stages={compile['num_stages']}")
        return ", ".join(parts)
    except (KeyError, IndexError, AttributeError, TypeError):  # another Triton's layout
        return str(compile.get("key", "?"))


class JitCounter:
    """Context manager that records every Triton JIT compilation in this process while active.

    `count`, `compilations` (kernel name + specialization, in order), `by_kernel()`, `summary()`.
    Where compilations cannot be counted (see `unavailable_reason`), `available` is False,
    `reason` says why, and reading `count` raises rather than report a zero it did not measure.
    """

    def __init__(self):
        self.reason = unavailable_reason()
        self.available = self.reason is None
        self.compilations: list[Compilation] = []
        self._previous = None

    def _hook(self, *, key, repr, fn, compile, is_manual_warmup, already_compiled, **kwargs):
        self.compilations.append(Compilation(fn.name, _describe(fn, compile)))
        if self._previous is not None:  # keep whatever hook was installed before us working
            return self._previous(key=key, repr=repr, fn=fn, compile=compile,
                                  is_manual_warmup=is_manual_warmup,
                                  already_compiled=already_compiled, **kwargs)
        return None

    def __enter__(self) -> JitCounter:
        if self.available:
            from triton import knobs

            self._previous = knobs.runtime.jit_post_compile_hook
            knobs.runtime.jit_post_compile_hook = self._hook
        return self

    def __exit__(self, *exc) -> None:
        if self.available:
            from triton import knobs

            knobs.runtime.jit_post_compile_hook = self._previous

    @property
    def count(self) -> int:
        if not self.available:
            raise RuntimeError(f"Triton compilations cannot be counted here: {self.reason}")
        return len(self.compilations)

    def by_kernel(self) -> dict[str, int]:
        return dict(Counter(c.kernel for c in self.compilations))

    def summary(self) -> str:
        if not self.available:
            return f"unavailable: {self.reason}"
        lines = [f"{len(self.compilations)} Triton compilation(s)"]
        lines += [f"  {c.kernel}({c.specialization})" for c in self.compilations]
        return "\n".join(lines)
