"""Global placement: tile positions that agree best with the accepted pairwise shifts.

Weighted least squares over the links, each weighted by the inverse covariance of its shift (plus
a floor for what no covariance sees: distortion, interpolation), one sparse solve per round; the
worst link is dropped while its residual, in units of its own uncertainty, is too large.

The stage positions enter as a weak prior (standard deviation ``prior_sigma``, the search radius):
far too weak to bend what the links determine, it holds every tile along the directions the
links leave free. Each connected group of tiles (component) therefore ends with a mean offset
of zero from its stage positions: tiles and islands without an accepted link keep their stage
positions relative to the rest, and the main group stays centred on the stage coordinates.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp
from scipy.sparse.csgraph import connected_components
from scipy.sparse.linalg import spsolve

__all__ = ["Solution", "link_weights", "solve_positions"]

log = logging.getLogger(__name__)

RESIDUAL_SIGMAS = 5.0
RESIDUAL_FACTOR = 2.5
SIGMA_FLOOR = 0.1


@dataclass(frozen=True)
class Solution:
    """Solved positions and what became of each link.

    Attributes
    ----------
    positions : numpy.ndarray, shape (n_tiles, ndim)
    component : numpy.ndarray, shape (n_tiles,), int
        Connected component of each tile over the kept links; 0 is the largest.
    kept : numpy.ndarray, shape (n_links,), bool
        Links still used by the final solve.
    removed : dict of int to str
        Links dropped by the solve, with the reason.
    residuals : numpy.ndarray, shape (n_links,)
        ``|p[j] - p[i] - shift|`` for every link at the final positions, pixels.
    limit : float
        Normalised residual (in units of the link's standard deviation) above which the worst
        link was dropped.
    """

    positions: np.ndarray
    component: np.ndarray
    kept: np.ndarray
    removed: dict
    residuals: np.ndarray
    limit: float


def link_weights(covs: np.ndarray) -> np.ndarray:
    """Weight matrices from shift covariances: ``inv(cov + SIGMA_FLOOR**2 * I)``.

    Parameters
    ----------
    covs : array, shape (n_links, ndim, ndim)

    Returns
    -------
    numpy.ndarray, shape (n_links, ndim, ndim)
    """
    covs = np.asarray(covs, dtype=np.float64)
    eye = np.eye(covs.shape[-1])
    sym = (covs + np.swapaxes(covs, 1, 2)) / 2
    return np.linalg.inv(sym + SIGMA_FLOOR**2 * eye)


def _components(n: int, edges: np.ndarray) -> np.ndarray:
    """Component label per tile, 0 for the largest (ties: the one holding the lowest tile)."""
    graph = sp.coo_matrix((np.ones(len(edges)), (edges[:, 0], edges[:, 1])), shape=(n, n))
    _, labels = connected_components(graph, directed=False)
    sizes = np.bincount(labels)
    first = np.full(sizes.size, n)
    np.minimum.at(first, labels, np.arange(n))
    order = np.lexsort((first, -sizes))
    rank = np.empty_like(order)
    rank[order] = np.arange(order.size)
    return rank[labels]


def _solve_once(stage, edges, shifts, weights, component, prior_sigma) -> np.ndarray:
    """Least-squares positions under the stage prior, re-centred per component."""
    n, ndim = stage.shape
    prior = 1.0 / prior_sigma**2
    rhs = prior * stage.copy()
    rows, cols = np.arange(n), np.arange(n)
    blocks = np.broadcast_to(prior * np.eye(ndim), (n, ndim, ndim))
    if len(edges):
        i, j = edges[:, 0], edges[:, 1]
        wd = np.einsum("mkl,ml->mk", weights, shifts)
        np.add.at(rhs, i, -wd)
        np.add.at(rhs, j, wd)
        rows = np.concatenate([rows, i, j, i, j])
        cols = np.concatenate([cols, i, j, j, i])
        blocks = np.concatenate([blocks, weights, weights, -weights, -weights])
    positions = _sparse_solve(rows, cols, blocks, rhs, ndim)
    for c in np.unique(component):
        members = component == c
        positions[members] += (stage[members] - positions[members]).mean(axis=0)
    return positions


def _sparse_solve(rows, cols, blocks, rhs, ndim) -> np.ndarray:
    """Solve the block normal equations: ``blocks[t]`` sits at block ``(rows[t], cols[t])``."""
    k, m = np.meshgrid(np.arange(ndim), np.arange(ndim), indexing="ij")
    r = (rows[:, None, None] * ndim + k).ravel()
    c = (cols[:, None, None] * ndim + m).ravel()
    size = rhs.size
    matrix = sp.csc_matrix((blocks.ravel(), (r, c)), shape=(size, size))
    return np.asarray(spsolve(matrix, rhs.ravel())).reshape(rhs.shape)


def _residuals(positions, edges, shifts, weights) -> tuple[np.ndarray, np.ndarray]:
    """Residual length (pixels) and normalised residual ``sqrt(r.T @ W @ r)`` per link."""
    if len(edges) == 0:
        return np.zeros(0), np.zeros(0)
    diff = positions[edges[:, 1]] - positions[edges[:, 0]] - shifts
    normalised = np.sqrt(np.maximum(np.einsum("mk,mkl,ml->m", diff, weights, diff), 0))
    return np.linalg.norm(diff, axis=1), normalised


def _limit(normalised: np.ndarray) -> float:
    median = float(np.median(normalised)) if normalised.size else 0.0
    return max(RESIDUAL_SIGMAS, RESIDUAL_FACTOR * median)


def solve_positions(
    stage: np.ndarray,
    edges: np.ndarray,
    shifts: np.ndarray,
    weights: np.ndarray,
    prior_sigma: float,
) -> Solution:
    """Positions that best satisfy ``p[j] - p[i] = shift`` over the links, dropping outliers.

    Parameters
    ----------
    stage : array, shape (n_tiles, ndim)
        Stage (nominal) positions: the weak prior, and each component's mean position.
    edges : array, shape (n_links, 2), int
        Tile indices ``(i, j)`` of each link.
    shifts : array, shape (n_links, ndim)
        Measured ``p[j] - p[i]`` per link, pixels.
    weights : array, shape (n_links, ndim, ndim)
        Symmetric positive-definite weight matrix per link (inverse covariance).
    prior_sigma : float
        Standard deviation of the stage prior, pixels.

    Returns
    -------
    Solution
    """
    stage = np.asarray(stage, dtype=np.float64)
    ndim = stage.shape[1]
    edges = np.asarray(edges, dtype=np.int64).reshape(-1, 2)
    shifts = np.asarray(shifts, dtype=np.float64).reshape(len(edges), ndim)
    weights = np.asarray(weights, dtype=np.float64).reshape(len(edges), ndim, ndim)
    kept = np.ones(len(edges), dtype=bool)
    removed: dict[int, str] = {}
    while True:
        component = _components(len(stage), edges[kept])
        positions = _solve_once(stage, edges[kept], shifts[kept], weights[kept], component,
                                prior_sigma)
        residuals, normalised = _residuals(positions, edges, shifts, weights)
        limit = _limit(normalised[kept])
        if not kept.any():
            break
        worst = int(np.flatnonzero(kept)[np.argmax(normalised[kept])])
        if normalised[worst] <= limit:
            break
        kept[worst] = False
        removed[worst] = (
            f"removed by the global solve: residual {residuals[worst]:.2f} px "
            f"({normalised[worst]:.1f} sigma, limit {limit:.1f})"
        )
        log.debug("dropping link %s: residual %.2f px, %.1f sigma > %.1f", edges[worst],
                  residuals[worst], normalised[worst], limit)
    return Solution(positions, component, kept, removed, residuals, limit)
