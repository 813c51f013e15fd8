"""Row max / row sum for the attention kernels: `tl.reduce` with combine functions defined here.

Same code as `tl.max` / `tl.sum` once compiled. Why not those: `tl.max`, `tl.sum` and `tl.zeros` are @triton.jit
functions of triton.language.standard, and @triton.jit decides compiled vs interpreted when its module is imported.
A process that imported Triton before turning the interpreter on (a test session) could not interpret them; these
kernel modules are re-imported with the interpreter on, so everything they call is interpreted too (hence also
`tl.full(shape, 0.0, ...)` instead of `tl.zeros` in the kernels).
"""
import triton
import triton.language as tl


@triton.jit
def _max_fn(a, b):
    return tl.maximum(a, b)


@triton.jit
def _add_fn(a, b):
    return a + b


@triton.jit
def row_max(x):
    return tl.reduce(x, 1, _max_fn)


@triton.jit
def row_sum(x):
    return tl.reduce(x, 1, _add_fn)
