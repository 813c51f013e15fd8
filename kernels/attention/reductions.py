"""Shared @triton.jit helpers of the attention kernels: row max / row sum (`tl.reduce` with combine functions defined
here) and the visibility mask every kernel applies to its score tile.

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


@triton.jit
def visible(ok, pos, cols, kv0, window, HAS_KV_START: tl.constexpr, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr):
    """Which scores of a tile count: key `cols` is visible to the query at absolute position `pos` iff it is in
    range (`ok`, rows and columns together), not left padding (cols >= kv0), not in the future (cols <= pos) and
    inside the window (pos - cols < window). `pos` and `cols` come broadcast to the tile's layout ([M, 1] and
    [1, N], or transposed in the dK/dV kernel)."""
    vis = ok
    if HAS_KV_START:
        vis = vis & (cols >= kv0)
    if CAUSAL:
        vis = vis & (cols <= pos)
    if HAS_WINDOW:
        vis = vis & (pos - cols < window)
    return vis
