"""Joint PCA: one 3-component fit over the tokens of every image together, so a colour means the same
thing across images; each image's tokens projected with it.

The fit is exact, in float64, on the centred fit sample (every token, or a stated number drawn with a
fixed seed when there are more: the projection still covers every token): the top eigenvectors of the
smaller of its two Gram matrices (numpy.linalg.eigh) (dim x dim, or tokens x tokens for attention rows wider than the
sample), which are the sample's top right singular vectors, as an SVD gives them, at a fraction of
the cost of a full SVD (only 3 components are kept). Component signs are fixed:
the entry of largest magnitude of each component is positive. Explained-variance ratios are of the fit
sample's total variance, descending."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

COMPONENTS = 3


@dataclass
class JointPCA:
    mean: np.ndarray  # (dim,)
    components: np.ndarray  # (3, dim), rows unit-norm, signs fixed
    explained_variance_ratio: np.ndarray  # (3,)
    fit_rows: np.ndarray  # indices of the stacked tokens the fit used
    total_rows: int

    def project(self, x: np.ndarray, chunk: int = 4096) -> np.ndarray:
        """Every row of ``x`` projected on the components, centred, in chunks and in ``x``'s own float
        precision (float32 tokens are not copied to float64: attention rows of 4096 tokens are 64 MiB an
        image; the projection then agrees with a float64 one to float32 rounding)."""
        dtype = x.dtype if x.dtype in (np.float32, np.float64) else np.float64
        mean, comps = self.mean.astype(dtype), self.components.astype(dtype)
        out = np.empty((len(x), COMPONENTS))
        for i in range(0, len(x), chunk):
            out[i : i + chunk] = (np.asarray(x[i : i + chunk], dtype=dtype) - mean) @ comps.T
        return out


def fix_signs(components: np.ndarray) -> np.ndarray:
    """Each component multiplied by the sign of its entry of largest magnitude (made positive)."""
    idx = np.argmax(np.abs(components), axis=1)
    signs = np.sign(components[np.arange(len(components)), idx])
    signs[signs == 0] = 1
    return components * signs[:, None]


def fit(x: np.ndarray, max_fit: int = 20_000, seed: int = 0) -> JointPCA:
    """PCA of the rows of ``x`` (tokens x dim), fit on at most ``max_fit`` rows."""
    n = len(x)
    rows = np.arange(n) if n <= max_fit else np.sort(np.random.default_rng(seed).choice(n, max_fit, replace=False))
    sample = np.asarray(x[rows], dtype=np.float64)
    mean = sample.mean(axis=0)
    centred = sample - mean
    s, vt = _top_singular(centred, COMPONENTS)
    var = s**2
    total = float(np.einsum("ij,ij->", centred, centred))  # the sample's total variance (sum of all s**2)
    k = min(COMPONENTS, vt.shape[0])
    comps = np.zeros((COMPONENTS, x.shape[1]))
    comps[:k] = fix_signs(vt[:k])
    ratio = np.zeros(COMPONENTS)
    if total > 0:
        ratio[:k] = var[:k] / total
    return JointPCA(mean=mean, components=comps, explained_variance_ratio=ratio, fit_rows=rows, total_rows=n)


def _top_singular(a: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` largest singular values of ``a`` (descending) and their right singular vectors (rows),
    from the eigen-decomposition of the smaller Gram matrix (numpy's eigh, ascending eigenvalues)."""
    n, d = a.shape
    k = min(k, n, d)
    if k == 0:
        return np.zeros(0), np.zeros((0, d))
    if d <= n:  # dim x dim: eigenvectors are the right singular vectors
        w, v = np.linalg.eigh(a.T @ a)
        order = np.argsort(w)[::-1][:k]
        return np.sqrt(np.clip(w[order], 0, None)), v[:, order].T
    w, u = np.linalg.eigh(a @ a.T)  # tokens x tokens: v = a^T u / s
    order = np.argsort(w)[::-1][:k]
    s = np.sqrt(np.clip(w[order], 0, None))
    vt = (a.T @ u[:, order]).T
    nz = s > s.max(initial=0) * 1e-12
    vt[nz] /= s[nz, None]
    vt[~nz] = 0
    return s, vt


def to_rgb(projections: list[np.ndarray]) -> list[np.ndarray]:
    """Projections (tokens x 3) of several images as uint8 RGB, each component scaled by its range over
    all of them together (so colours compare across images)."""
    stacked = np.concatenate(projections)
    lo, hi = stacked.min(axis=0), stacked.max(axis=0)
    span = np.where(hi > lo, hi - lo, 1.0)
    return [np.clip((p - lo) / span * 255.0 + 0.5, 0, 255).astype(np.uint8) for p in projections]
