"""Content digests of a state's arrays: recorded when a checkpoint is saved, checked on restore.

Per array, h = sum_i w_i b_i mod 2^32 over its elements b_i (their bits as unsigned integers),
with odd position weights w_i = (0x9E3779B1 i) | 1, recorded with the array's shape and dtype.
A change of any one element always changes h (an odd weight times a non-zero difference is
non-zero mod 2^32); scattered damage goes unnoticed only by chance (about 2^-32 for random
bytes), and so do values moved to other positions. Integer sums do not depend on the order
of reduction, so the digest is the same on every device, sharding and backend; it runs where the
array lives (one fused pass, no copy to the host). Saves digest the state they hand to orbax, and
restores digest what orbax read back from the files.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

_UNSIGNED = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32}


def _bits(x: jax.Array) -> jax.Array:
    """The elements of `x` as uint32 (their bit patterns, zero-extended), flattened."""
    if x.dtype == jnp.bool_:
        return x.astype(jnp.uint32).ravel()
    size = jnp.dtype(x.dtype).itemsize
    if size not in _UNSIGNED:
        raise TypeError(f"No digest for {x.dtype} arrays (only 8-, 16- and 32-bit elements).")
    return jax.lax.bitcast_convert_type(x, _UNSIGNED[size]).astype(jnp.uint32).ravel()


def _weighted_sum(x: jax.Array) -> jax.Array:
    """uint32 scalar: h of one array."""
    b = _bits(x)
    w = jnp.arange(b.size, dtype=jnp.uint32) * jnp.uint32(0x9E3779B1) | jnp.uint32(1)
    return jnp.sum(b * w)


@jax.jit
def _all_sums(leaves: list[jax.Array]) -> list[jax.Array]:
    return [_weighted_sum(x) for x in leaves]


def _key(path) -> str:
    return "/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)


def state_digest(tree: Any) -> dict[str, str]:
    """{"params/backbone/.../kernel": "<shape> <dtype> <8 hex digits>", ...} for every array."""
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    sums = jax.device_get(_all_sums([jnp.asarray(x) for _, x in flat]))
    return {
        _key(path): f"{'x'.join(map(str, np.shape(x))) or 'scalar'} {np.dtype(x.dtype).name} "
        f"{int(h):08x}"
        for (path, x), h in zip(flat, sums, strict=True)
    }


def first_mismatch(recorded: dict[str, str], restored: dict[str, str]) -> str | None:
    """None when the digests agree, else a short reason naming the first array that differs."""
    for name in sorted(set(recorded) | set(restored)):
        if name not in restored:
            return f"array {name} is recorded but was not restored"
        if name not in recorded:
            return f"array {name} has no recorded digest"
        if recorded[name] != restored[name]:
            return f"digest mismatch in {name}"
    return None
