"""Shared @triton.jit helpers of the attention kernels: row max / row sum (`tl.reduce` with combine functions defined
here), the visibility mask every kernel applies to its score tile, and the online-softmax step of the forward and
decode loops.

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


@triton.jit
def online_softmax(s, m_i, l_i):
    """One key block of the online softmax (base 2): s [M, N] scores (-inf where hidden), m_i / l_i the running row
    max and sum. Returns (p, alpha, m_new, l_new): the block's unnormalised probabilities, the factor that rescales
    what was accumulated so far, and the updated max and sum. Rows with nothing visible yet keep p = 0, alpha = 1."""
    m_new = tl.maximum(m_i, row_max(s))
    m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m_i - m_use)
    p = tl.exp2(s - m_use[:, None])
    return p, alpha, m_new, l_i * alpha + row_sum(p)
