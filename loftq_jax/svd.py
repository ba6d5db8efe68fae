"""Rank-r factorizations M ≈ A·B with √S split between the factors, by exact or randomized SVD."""

import jax
import jax.numpy as jnp

from loftq_jax.errors import InputError

SVD_METHODS = ("exact", "randomized")

def split_singular_values(u_MxR: jax.Array, s_R: jax.Array, vh_RxN: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Return A = U·diag(√S) and B = diag(√S)·Vᴴ, the balanced factors of U·diag(S)·Vᴴ.

    Each singular pair is only defined up to a common sign, and which sign LAPACK returns can flip with
    rounding differences (for example a different vmap batch size). The sign is fixed so that the largest
    entry in magnitude of each column of U is positive, which makes A and B reproducible, not just A·B.
    """
    peak_R = jnp.take_along_axis(u_MxR, jnp.argmax(jnp.abs(u_MxR), axis=0)[None, :], axis=0)[0]
    sign_R = jnp.where(peak_R < 0, -1.0, 1.0).astype(u_MxR.dtype)
    u_MxR, vh_RxN = u_MxR * sign_R[None, :], sign_R[:, None] * vh_RxN

    root_R = jnp.sqrt(s_R)
    return u_MxR * root_R[None, :], root_R[:, None] * vh_RxN

def exact_low_rank(m_MxN: jax.Array, rank: int) -> tuple[jax.Array, jax.Array]:
    """Return the best rank-`rank` factors of `m_MxN` from a full LAPACK SVD."""
    u, s, vh = jnp.linalg.svd(m_MxN, full_matrices=False)
    return split_singular_values(u[:, :rank], s[:rank], vh[:rank])

def randomized_low_rank(
    m_MxN: jax.Array,
    rank: int,
    *,
    key: jax.Array,
    oversample: int = 16,
    power_iters: int = 2,
) -> tuple[jax.Array, jax.Array]:
    """Return rank-`rank` factors of `m_MxN` by randomized SVD.

    Algorithm 4.4 (randomized subspace iteration) with Algorithm 5.1 of Halko, Martinsson and Tropp, 2011,
    "Finding structure with randomness", SIAM Review 53(2): sample the range of M with a Gaussian test
    matrix of rank + `oversample` columns, sharpen it with `power_iters` rounds of re-orthonormalized power
    iteration, then take the exact SVD of the small projected matrix.
    """
    num_rows, num_cols = m_MxN.shape
    width = min(rank + oversample, num_rows, num_cols)

    omega_NxK = jax.random.normal(key, (num_cols, width), m_MxN.dtype)
    basis_MxK, _ = jnp.linalg.qr(m_MxN @ omega_NxK)
    for _ in range(power_iters):
        co_basis_NxK, _ = jnp.linalg.qr(m_MxN.T @ basis_MxK)
        basis_MxK, _ = jnp.linalg.qr(m_MxN @ co_basis_NxK)

    projected_KxN = basis_MxK.T @ m_MxN
    u_small, s, vh = jnp.linalg.svd(projected_KxN, full_matrices=False)
    return split_singular_values(basis_MxK @ u_small[:, :rank], s[:rank], vh[:rank])

def low_rank(
    m_MxN: jax.Array,
    rank: int,
    method: str = "exact",
    *,
    key: jax.Array | None = None,
    oversample: int = 16,
    power_iters: int = 2,
) -> tuple[jax.Array, jax.Array]:
    """Return rank-`rank` factors A (M x rank) and B (rank x N) of `m_MxN` by `method`."""
    if method == "exact":
        return exact_low_rank(m_MxN, rank)
    if method == "randomized":
        key = jax.random.key(0) if key is None else key
        return randomized_low_rank(m_MxN, rank, key=key, oversample=oversample, power_iters=power_iters)
    raise InputError(f"unknown SVD method {method!r}; expected one of {SVD_METHODS}")
