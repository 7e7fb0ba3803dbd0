"""Frechet distance between Gaussians fitted to feature sets (the arithmetic of FID), in float64.

FID (Heusel et al., 2017): ``|mu1 - mu2|^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2))``. The trace of the matrix square root is
computed through the symmetric form ``tr((A S2 A)^(1/2))`` with ``A = S1^(1/2)``: both roots are of symmetric
positive semi-definite matrices, so an eigendecomposition is exact and stable (no complex parts to discard).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from snapfusion.errors import SnapFusionError
from snapfusion.weights import load_safetensors, save_safetensors


@dataclass(frozen=True)
class GaussianStats:
    """Mean (D,) and covariance (D, D) of a feature set, float64, plus the number of samples it came from."""

    mu: np.ndarray
    sigma: np.ndarray
    count: int


def _psd_sqrt(m: np.ndarray) -> np.ndarray:
    """Square root of a symmetric positive semi-definite matrix via eigh (negative round-off clipped to 0)."""
    m = (m + m.T) / 2
    w, v = np.linalg.eigh(m)
    return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """Frechet distance between N(mu1, sigma1) and N(mu2, sigma2), computed in float64."""
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    sigma1, sigma2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != (mu1.size, mu1.size):
        raise SnapFusionError(f"Frechet distance: shapes differ: mu {mu1.shape} vs {mu2.shape}, "
                              f"sigma {sigma1.shape} vs {sigma2.shape}")
    root1 = _psd_sqrt(sigma1)
    tr_covmean = np.sqrt(np.clip(np.linalg.eigvalsh(root1 @ sigma2 @ root1), 0.0, None)).sum()
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * tr_covmean)


def gaussian_stats(features: torch.Tensor | np.ndarray) -> GaussianStats:
    """Fit mean and unbiased covariance (float64) to (N, D) features; N >= 2."""
    x = features.detach().cpu().double().numpy() if isinstance(features, torch.Tensor) else np.asarray(features)
    x = x.astype(np.float64, copy=False)
    if x.ndim != 2 or x.shape[0] < 2:
        raise SnapFusionError(f"need (N, D) features with N >= 2 for FID, got shape {x.shape}")
    return GaussianStats(mu=x.mean(0), sigma=np.cov(x, rowvar=False), count=x.shape[0])


def fid_from_features(a: torch.Tensor | np.ndarray, b: torch.Tensor | np.ndarray | GaussianStats) -> float:
    """FID between feature set ``a`` and feature set (or cached stats) ``b``."""
    sa = gaussian_stats(a)
    sb = b if isinstance(b, GaussianStats) else gaussian_stats(b)
    return frechet_distance(sa.mu, sa.sigma, sb.mu, sb.sigma)


def save_stats(stats: GaussianStats, path: str | os.PathLike, *, metadata: dict[str, str] | None = None) -> Path:
    """Write stats as safetensors (float64 ``mu``, ``sigma``; ``count`` in the metadata)."""
    meta = {"count": str(stats.count), **(metadata or {})}
    state = {"mu": torch.from_numpy(stats.mu.copy()), "sigma": torch.from_numpy(stats.sigma.copy())}
    save_safetensors(state, path, max_shard_bytes=None, metadata=meta)
    return Path(path)


def load_stats(path: str | os.PathLike) -> GaussianStats:
    """Read stats written by ``save_stats``; a missing or malformed file raises ``WeightsError`` naming it."""
    from safetensors import safe_open

    state = load_safetensors(path)
    if set(state) != {"mu", "sigma"}:
        raise SnapFusionError(f"{path}: expected tensors 'mu' and 'sigma', found {sorted(state)}")
    with safe_open(str(path), framework="pt") as f:
        count = int((f.metadata() or {}).get("count", "0"))
    return GaussianStats(mu=state["mu"].double().numpy(), sigma=state["sigma"].double().numpy(), count=count)
