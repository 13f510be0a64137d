"""SparseGPT (Frantar & Alistarh 2023): one-shot pruning of a layer with OBS error compensation.

    result = pruning.sparsegpt(kernel, hessian, sparsity=0.5)   # or n=2, m=4
    result.kernel, result.mask, result.error

`hessian` is the Gram matrix of the layer's inputs, X^T X over the calibration tokens. Each pruned
weight's error is spread over the input features not yet visited, through the upper Cholesky
factor of the inverse Hessian, so that X @ kernel changes as little as the greedy order allows.
Every function here is pure. `sparsegpt` runs two jitted programs: U, compiled once per input
size, and the pruning, once per kernel shape, dtype and setting.
"""

from __future__ import annotations

import functools
import numbers
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import NamedSharding, PartitionSpec

from es_jax.pruning.masks import group_kept, is_number
from es_jax.pruning.select import sortable_keys

Array = jax.Array
HIGHEST = lax.Precision.HIGHEST
# Columns of a block updated one at a time before the block's later columns catch up through one
# matrix product (the same arithmetic as one column at a time, in a different order).
SUB_BLOCK = 16


class Reconstruction(NamedTuple):
    """The result of `sparsegpt` on one kernel."""

    kernel: Array
    """The pruned, error-compensated kernel, (in, out), in the input kernel's dtype."""
    mask: Array
    """bool (in, out), True where a weight is kept."""
    error: Array
    """float32 scalar: `reconstruction_error(original kernel, pruned kernel, hessian)`."""


def reconstruction_error(kernel: Any, pruned: Any, hessian: Any) -> Array:
    """trace(D^T H D) with D = kernel - pruned, in float32: the layer's squared output error.

    kernel and pruned are (in, out) Flax kernels and `hessian` the (in, in) Gram matrix X^T X of
    the layer's inputs, so the value is ||X @ kernel - X @ pruned||_F^2 over the calibration
    tokens (or its mean, if H is averaged). Refuses mismatched shapes.
    """
    kernel, pruned, hessian = jnp.asarray(kernel), jnp.asarray(pruned), jnp.asarray(hessian)
    if kernel.ndim != 2 or pruned.shape != kernel.shape:
        raise ValueError(f"kernel and pruned must be 2-D (in, out) arrays of one shape, got "
                         f"{kernel.shape} and {pruned.shape}")
    if hessian.shape != (kernel.shape[0],) * 2:
        raise ValueError(f"hessian has shape {hessian.shape}, expected (in, in) = "
                         f"{(kernel.shape[0],) * 2} for a kernel of shape {kernel.shape}")
    return _error_jit(kernel, pruned, hessian)


def _error(kernel: Array, pruned: Array, hessian: Array) -> Array:
    """`reconstruction_error` without the checks."""
    difference = kernel.astype(jnp.float32) - pruned.astype(jnp.float32)
    product = jnp.matmul(hessian.astype(jnp.float32), difference, precision=HIGHEST)
    return jnp.sum(difference * product)


_error_jit = jax.jit(_error)


def sparsegpt(kernel: Any, hessian: Any, sparsity: float | None = None, n: int | None = None,
              m: int | None = None, block_size: int = 128,
              dampening: float = 0.01) -> Reconstruction:
    """Prunes a Flax kernel (in, out) with SparseGPT, compensating each pruned weight's error.

    Give either `sparsity` in [0, 1) (unstructured, chosen per block) or `n` and `m` (N:M: keep n
    of every m consecutive input features of each output; 2:4 keeps 2 of every 4).

    The algorithm works on W = kernel.T (rows = outputs, columns = input features), all arithmetic
    in float32 whatever the kernel's dtype (bf16 too); the result is cast back to that dtype.

    - `hessian` (in, in) is the Gram matrix of the layer's inputs, X^T X summed (or averaged) over
      the calibration tokens. Scaling H by c > 0 scales lambda (below) and U^-2 by c, so every
      score by c and no selection or update changes: the kernel and mask are the same up to
      rounding, and `error` scales by c. This holds while no input is dead: a dead input's
      H[i, i] = 1 does not scale.
    - Dead inputs: where diag(H) == 0, H[i, i] = 1, so that H is invertible. Unlike the reference
      code, their weights are not zeroed: they multiply inputs that were zero on every calibration
      token (so they add nothing to the error), and they take part in the selection with their
      finite scores.
    - Dampening: H + lambda I with lambda = dampening * mean(diag(H)), after the dead-input fix.
    - U is the upper Cholesky factor of (H + lambda I)^-1: U^T U = (H + lambda I)^-1, U upper
      triangular. If it is not finite (H is not positive definite even after dampening), an eager
      call raises ValueError; under jit the result is then non-finite.
    - The columns are processed in blocks of `block_size` (the last may be shorter). In each
      block, with W1 its current columns (after the updates of the earlier blocks):
      - unstructured (`sparsity`): the score of a weight is W1[r, c]^2 / U[c, c]^2 (c the global
        column), and exactly round(sparsity * rows * block_columns) weights of the block are
        pruned: the lowest scores, ties broken by flat position (row-major over the block's
        rows x columns; the lower position is pruned first). The block's mask is chosen at the
        start of the block.
      - N:M (`n`, `m`): at every column index of the block that is a multiple of m, each row
        keeps the n highest scores W1[r, c]^2 / U[c, c]^2 among the next m columns, computed on
        the current (already updated) W1; equal scores keep the lower column (as
        `pruning.n_of_m`). `block_size` and `in` must be multiples of m.
      - then column by column (i = 0 .. block_columns - 1): w = W1[:, i], q = w where kept and 0
        where pruned, err = (w - q) / U[i, i] (global index), W1[:, i:] -= outer(err, U[i, i:]),
        Err[:, i] = err. The column's final value is q: pruned weights end exactly 0.
      - after the block, the later columns are updated lazily: W[:, end:] -= Err @ U[block, end:].
      Inside a block, the update of W1[:, i:] is applied lazily too (one column at a time within
      `SUB_BLOCK` columns, then one matrix product for the block's later columns): the same sums
      in another order.
    - Sparsity 0 (or n = m) prunes nothing: every err is 0, so the kernel comes back unchanged,
      the mask all True and the error 0.

    `error` is `reconstruction_error(kernel, result kernel, hessian)`, with the hessian as given.
    `sparsity`, `n`, `m` and `block_size` are static (Python numbers): one compile per kernel
    shape, dtype and setting (and one for U per input size). `dampening` may be traced.

    Sharding. The Hessian and U, (in, in), are replicated on every device. The algorithm walks
    the input features one after another, so the kernel is gathered along its input axis; its
    output axis stays sharded, since each output row of W is processed on its own: N:M needs no
    communication but the final error's sum, and the unstructured selection sums its counts
    across devices (and gathers the tie flags of a block whose threshold is tied, for their
    running count). Called eagerly on a kernel with a `NamedSharding`, the kernel is resharded to
    `P(None, <its output axes>)` (an all-gather along `in`; devices that held different input
    rows then repeat each other's work), the Hessian is replicated on the same mesh, and the
    pruned kernel and mask come back with the kernel's own sharding. Under a caller's jit, the
    compiler places the program from the shardings it is given.

    Called eagerly, refuses (ValueError) a kernel that is not 2-D floating point, a hessian not
    (in, in), NaN or inf in either (naming which), a sparsity outside [0, 1), not a number or
    traced, n and m other than Python ints 1 <= n <= m with `in` and `block_size` multiples of m,
    neither or both of sparsity and (n, m), a block_size below 1, and a negative or non-finite
    dampening.
    NaN or inf are found by the programs that prune, so a refused call costs one run.
    """
    kernel, hessian = jnp.asarray(kernel), jnp.asarray(hessian)
    if kernel.ndim != 2 or not jnp.issubdtype(kernel.dtype, jnp.floating):
        raise ValueError(f"kernel must be a 2-D floating-point (in, out) Flax kernel, got shape "
                         f"{kernel.shape} and dtype {kernel.dtype}")
    if hessian.shape != (kernel.shape[0],) * 2:
        raise ValueError(f"hessian has shape {hessian.shape}, expected (in, in) = "
                         f"{(kernel.shape[0],) * 2} for a kernel of shape {kernel.shape}")
    block_size = _positive_int(block_size, "block_size")
    sparsity, n, m = _setting(sparsity, n, m, kernel.shape[0], block_size)
    _check_dampening(dampening)
    traced = any(isinstance(x, jax.core.Tracer) for x in (kernel, hessian, dampening))
    sharding = None if traced else _named_sharding(kernel)
    if sharding is not None:
        spec = (*sharding.spec, None, None)
        kernel = jax.device_put(kernel, NamedSharding(sharding.mesh, PartitionSpec(None, spec[1])))
        hessian = jax.device_put(hessian, NamedSharding(sharding.mesh, PartitionSpec()))
    factor, hessian_finite, factor_finite = _factor(hessian, jnp.asarray(dampening, jnp.float32))
    result, kernel_finite = _reconstruct(kernel, factor, hessian, sparsity=sparsity, n=n, m=m,
                                         block_size=block_size)
    if traced:
        return result
    kernel_finite, hessian_finite, factor_finite = (bool(f) for f in jax.device_get(
        (kernel_finite, hessian_finite, factor_finite)))
    for name, ok in (("kernel", kernel_finite), ("hessian", hessian_finite)):
        if not ok:
            raise ValueError(f"the {name} contains NaN or inf: SparseGPT needs finite weights and "
                             f"a finite Hessian")
    if not factor_finite:
        raise ValueError(f"the Hessian is not positive definite even after dampening "
                         f"(lambda = {dampening} * mean(diag(H))): the Cholesky factor of its "
                         f"inverse is not finite; pass a larger `dampening`")
    if sharding is not None:
        result = result._replace(kernel=jax.device_put(result.kernel, sharding),
                                 mask=jax.device_put(result.mask, sharding))
    return result


def _named_sharding(kernel: Array) -> NamedSharding | None:
    """The kernel's sharding if it is a `NamedSharding` over more than one device, else None."""
    sharding = getattr(kernel, "sharding", None)
    if isinstance(sharding, NamedSharding) and sharding.mesh.size > 1:
        return sharding
    return None


def _finite(x: Array) -> Array:
    """Whether x is free of NaN and inf: its sum times 0 is 0, or NaN (see `scores`)."""
    return jnp.isfinite(jnp.sum(x * 0, dtype=jnp.float32))


@jax.jit
def _factor(hessian: Array, dampening: Array) -> tuple[Array, Array, Array]:
    """U (`_inverse_factor`), and whether the hessian and U are free of NaN and inf."""
    factor = _inverse_factor(hessian, dampening)
    return factor, _finite(hessian), _finite(factor)


@functools.partial(jax.jit, static_argnames=("sparsity", "n", "m", "block_size"))
def _reconstruct(kernel: Array, factor: Array, hessian: Array, sparsity: float | None,
                 n: int | None, m: int | None, block_size: int) -> tuple[Reconstruction, Array]:
    """`sparsegpt` from U, without the checks, and whether the kernel is free of NaN and inf.

    A program of its own (not one with `_factor`), which on XLA:CPU runs faster.
    """
    pruned, mask = _prune(kernel, factor, sparsity, n, m, block_size)
    return Reconstruction(pruned, mask, _error(kernel, pruned, hessian)), _finite(kernel)


def _positive_int(value: Any, name: str) -> int:
    """`value` as a Python int >= 1; refuses anything else (a bool, a float, a traced value)."""
    if not isinstance(value, numbers.Integral) or isinstance(value, bool | np.bool_):
        raise ValueError(f"{name} must be a Python int (static), got {value!r}")
    if value < 1:
        raise ValueError(f"{name} must be at least 1, got {value}")
    return int(value)


def _setting(sparsity: Any, n: Any, m: Any, inputs: int,
             block_size: int) -> tuple[float | None, int | None, int | None]:
    """The checked (sparsity, n, m): exactly one of a sparsity in [0, 1) or an N:M pair."""
    if (sparsity is None) == (n is None and m is None):
        raise ValueError(f"give exactly one of `sparsity` or the pair (n, m), got "
                         f"sparsity={sparsity!r}, n={n!r}, m={m!r}")
    if sparsity is not None:
        if isinstance(sparsity, jax.core.Tracer):
            raise ValueError("sparsity is traced, but the count pruned per block fixes the "
                             "program: pass a Python float (a static argument)")
        if not is_number(sparsity):
            raise ValueError(f"sparsity must be a number in [0, 1), got {sparsity!r}")
        if not 0.0 <= float(sparsity) < 1.0:
            raise ValueError(f"sparsity {float(sparsity)} is outside [0, 1)")
        return float(sparsity), None, None
    if n is None or m is None:
        raise ValueError(f"N:M needs both n and m, got n={n!r}, m={m!r}")
    n, m = _positive_int(n, "n"), _positive_int(m, "m")
    if n > m:
        raise ValueError(f"N:M keeps n of every m weights: 1 <= n <= m, got n={n}, m={m}")
    if inputs % m or block_size % m:
        raise ValueError(f"N:M with m={m} needs the kernel's input size ({inputs}) and "
                         f"block_size ({block_size}) to be multiples of m")
    return None, n, m


def _check_dampening(dampening: Any) -> None:
    """Refuses a concrete dampening that is negative, non-finite or not a number."""
    if isinstance(dampening, jax.core.Tracer):
        return
    value = np.asarray(dampening)
    if value.ndim or not np.issubdtype(value.dtype, np.number) or value.dtype == np.bool_:
        raise ValueError(f"dampening must be a number, got {dampening!r}")
    if not np.isfinite(value) or value < 0:
        raise ValueError(f"dampening must be finite and >= 0, got {dampening!r}")


def _inverse_factor(hessian: Array, dampening: Array) -> Array:
    """U, upper triangular with U^T U = (H + lambda I)^-1, after the dead-input fix.

    With J the reversal permutation, J H J = L L^T (lower Cholesky), so H = R R^T with
    R = J L J upper, and H^-1 = R^-T R^-1: U = R^-1 = J L^-1 J. One factorisation and one
    triangular solve, without forming H^-1.
    """
    h = hessian.astype(jnp.float32)
    diagonal = jnp.diagonal(h)
    h = h + jnp.diag(jnp.where(diagonal == 0, 1.0, 0.0))
    damp = dampening * jnp.mean(jnp.diagonal(h))
    h = h + damp * jnp.eye(h.shape[0], dtype=jnp.float32)
    lower = lax.linalg.cholesky(h[::-1, ::-1], symmetrize_input=False)
    identity = jnp.eye(h.shape[0], dtype=jnp.float32)
    inverse = lax.linalg.triangular_solve(lower, identity, left_side=True, lower=True)
    return jnp.triu(inverse[::-1, ::-1])


def _prune(kernel: Array, factor: Array, sparsity: float | None, n: int | None, m: int | None,
           block_size: int) -> tuple[Array, Array]:
    """The pruned kernel and its mask from U (`_inverse_factor`): `sparsegpt`'s loop.

    Works in the kernel's (in, out) layout, so that W's column i is the contiguous row i. The
    full blocks run in one `fori_loop` (the program does not grow with the kernel), the short
    last block after it; each block's lazy update goes to each later block in turn, so no work
    is spent on earlier columns.
    """
    rows = kernel.astype(jnp.float32)
    inputs = rows.shape[0]
    full, tail = divmod(inputs, block_size)
    tail_start = full * block_size
    # Sub-blocks hold whole N:M groups, so a group's scores see every earlier update.
    width = SUB_BLOCK if m is None else m * max(1, SUB_BLOCK // m)

    def run(rows: Array, kept: Array, start: int | Array, size: int) -> tuple[Array, Array, Array]:
        block = lax.dynamic_slice_in_dim(rows, start, size)
        local = lax.dynamic_slice(factor, (start, start), (size, size))
        keep = None
        if sparsity is not None:
            keep = _block_keep(block, jnp.diagonal(local), round(sparsity * block.size))
        block, errors, keep = _block(block, keep, local, n, m, width)
        rows = lax.dynamic_update_slice_in_dim(rows, block, start, 0)
        return rows, lax.dynamic_update_slice_in_dim(kept, keep, start, 0), errors

    def full_block(b: Array, carry: tuple[Array, Array]) -> tuple[Array, Array]:
        start = b * block_size
        rows, kept, errors = run(*carry, start, block_size)

        def later(c: Array, rows: Array) -> Array:
            other = c * block_size
            coupling = lax.dynamic_slice(factor, (start, other), (block_size, block_size))
            current = lax.dynamic_slice_in_dim(rows, other, block_size)
            update = jnp.matmul(coupling.T, errors, precision=HIGHEST)
            return lax.dynamic_update_slice_in_dim(rows, current - update, other, 0)

        rows = lax.fori_loop(b + 1, full, later, rows)
        if tail:
            coupling = lax.dynamic_slice(factor, (start, tail_start), (block_size, tail))
            rows = rows.at[tail_start:].add(-jnp.matmul(coupling.T, errors, precision=HIGHEST))
        return rows, kept

    carry = (rows, jnp.ones(rows.shape, jnp.bool_))
    rows, kept = lax.fori_loop(0, full, full_block, carry) if full else carry
    if tail:
        rows, kept, _ = run(rows, kept, tail_start, tail)
    return rows.astype(kernel.dtype), kept


def _scores(block: Array, diagonal: Array) -> Array:
    """W1[r, c]^2 / U[c, c]^2 in the kernel's layout (block columns x rows)."""
    return jnp.square(block) / jnp.square(diagonal)[:, None]


def _block_keep(block: Array, diagonal: Array, count: int) -> Array:
    """Kept flags (block columns x rows) pruning exactly `count` lowest scores of the block, ties
    by flat position over W's rows x columns (the transpose of this layout), lower first."""
    if count == 0:
        return jnp.ones(block.shape, jnp.bool_)
    keys = sortable_keys(_scores(block, diagonal))
    threshold, at_most = _threshold(keys, count)

    def split_ties() -> Array:
        order = keys.T.reshape(-1)  # W's flat order
        below = order < threshold
        ties = order == threshold
        needed = count - jnp.sum(below, dtype=jnp.int32)
        pruned = below | (ties & (jnp.cumsum(ties, dtype=jnp.int32) <= needed))
        return pruned.reshape(block.shape[::-1]).T

    pruned = lax.cond(at_most == count, lambda: keys <= threshold, split_ties)
    return ~pruned


def _threshold(keys: Array, k: int) -> tuple[Array, Array]:
    """A key t with k keys or more at most t, and that count: exactly k if some t splits the keys
    there, else t is the k-th smallest key (1-based) and ties at t straddle the k-th position.

    Bisection on the count of keys at most a bound, stopping as soon as a bound counts k.
    """
    def open_(state: tuple[Array, Array, Array]) -> Array:
        low, high, at_most = state
        return (low < high) & (at_most != k)

    def halve(state: tuple[Array, Array, Array]) -> tuple[Array, Array, Array]:
        low, high, at_most = state
        middle = low + (high - low) // 2
        count = jnp.sum(keys <= middle, dtype=jnp.int32)
        enough = count >= k
        return (jnp.where(enough, low, middle + 1), jnp.where(enough, middle, high),
                jnp.where(enough, count, at_most))

    state = (jnp.min(keys), jnp.max(keys), jnp.asarray(keys.size, jnp.int32))
    _, high, at_most = lax.while_loop(open_, halve, state)
    return high, at_most


def _block(block: Array, keep: Array | None, local: Array, n: int | None, m: int | None,
           width: int) -> tuple[Array, Array, Array]:
    """One block's final columns, errors and kept flags (each block columns x rows).

    `keep` is the unstructured mask, or None for N:M (chosen group by group). Column by column,
    err = (w - q) / U[i, i] and W1[:, i:] -= outer(err, U[i, i:]), on a sub-block of `width`
    columns; the block's columns past the sub-block then receive its updates as one matrix
    product (computed for the whole block, kept for the later columns).
    """
    columns = block.shape[0]
    subs, rest = divmod(columns, width)
    index = lax.broadcasted_iota(jnp.int32, (columns, 1), 0)

    def sub_block(s: Array | int, carry: tuple[Array, Array, Array],
                  size: int = width) -> tuple[Array, Array, Array]:
        current, errors, kept = carry
        start = s * width
        sub_local = lax.dynamic_slice(local, (start, start), (size, size))
        sub_keep = None if keep is None else lax.dynamic_slice_in_dim(kept, start, size)
        sub, sub_errors, sub_kept = _sequential(lax.dynamic_slice_in_dim(current, start, size),
                                                sub_keep, sub_local, n, m)
        if size == width and (subs > 1 or rest):
            coupling = lax.dynamic_slice_in_dim(local, start, size)
            update = jnp.matmul(coupling.T, sub_errors, precision=HIGHEST)
            current = jnp.where(index >= start + size, current - update, current)
        current = lax.dynamic_update_slice_in_dim(current, sub, start, 0)
        errors = lax.dynamic_update_slice_in_dim(errors, sub_errors, start, 0)
        return current, errors, lax.dynamic_update_slice_in_dim(kept, sub_kept, start, 0)

    carry = (block, jnp.zeros_like(block),
             jnp.ones(block.shape, jnp.bool_) if keep is None else keep)
    if subs:
        carry = lax.fori_loop(0, subs, sub_block, carry)
    if rest:
        carry = sub_block(subs, carry, rest)
    return carry


def _sequential(block: Array, keep: Array | None, local: Array, n: int | None,
                m: int | None) -> tuple[Array, Array, Array]:
    """The column loop on a sub-block: final columns, errors and kept flags (columns x rows).

    With `keep` None, N:M: at every m-th column each row keeps the n highest current scores of
    the next m columns (ties: the lower column).
    """
    diagonal = jnp.diagonal(local)
    columns = block.shape[0]

    def column(i: Array, carry: tuple[Array, Array, Array]) -> tuple[Array, Array, Array]:
        current, errors, kept = carry
        w = current[i]
        q = jnp.where(kept[i], w, 0.0)
        err = (w - q) / diagonal[i]
        current = current - local[i][:, None] * err[None, :]
        return current.at[i].set(q), errors.at[i].set(err), kept

    def group(g: Array, carry: tuple[Array, Array, Array]) -> tuple[Array, Array, Array]:
        current, errors, kept = carry
        start = g * m
        scores = _scores(lax.dynamic_slice_in_dim(current, start, m),
                         lax.dynamic_slice_in_dim(diagonal, start, m))
        kept = lax.dynamic_update_slice_in_dim(kept, group_kept(scores.T, n).T, start, 0)
        return lax.fori_loop(start, start + m, column, (current, errors, kept))

    carry = (block, jnp.zeros_like(block),
             jnp.ones(block.shape, jnp.bool_) if keep is None else keep)
    if keep is None:
        return lax.fori_loop(0, columns // m, group, carry)
    return lax.fori_loop(0, columns, column, carry)
