"""Least-squares scales, the residual and its SVD (HALRP.md section 3, steps 3-4).

All functions take canonical weights of shape (out, in_per_group, kernel_area) and work in
float32 (float64 in, float64 out), vectorised over rows and columns.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

EPS = 1e-20


def fit_scales(w_free: Tensor, w_base: Tensor, groups: int = 1) -> tuple[Tensor, Tensor]:
    """Fit r (out,) then s (in,) so that diag(r) W0 diag(s) is closest to W_free.

    `r[j] = <W_free[j], W0[j]> / ||W0[j]||^2` over each output row (kernel included), then
    `s[i] = <r * W0[:, i], W_free[:, i]> / ||r * W0[:, i]||^2` over each input column. For a
    grouped conv, input column i meets only the output rows of its own group.

    Example:
        >>> w0 = torch.tensor([[1., 2.], [3., 4.]]).unsqueeze(-1)
        >>> r, s = fit_scales(2 * w0, w0)
        >>> r.tolist(), s.tolist()
        ([2.0, 2.0], [1.0, 1.0])
    """
    if w_free.shape != w_base.shape or w_base.dim() != 3:
        raise ValueError(
            f"canonical weights must share an (out, in, kernel) shape, got "
            f"{tuple(w_free.shape)} and {tuple(w_base.shape)}."
        )
    w_free, w_base = _as_float(w_free), _as_float(w_base)
    r = (w_free * w_base).sum(dim=(1, 2)) / (w_base**2).sum(dim=(1, 2)).clamp(min=EPS)
    m, per_group, k = w_base.shape
    rw = (r[:, None, None] * w_base).view(groups, m // groups, per_group, k)
    wf = w_free.view(groups, m // groups, per_group, k)
    s = (rw * wf).sum(dim=(1, 3)) / (rw**2).sum(dim=(1, 3)).clamp(min=EPS)
    return r, s.reshape(-1)


def residual(w_free: Tensor, w_base: Tensor, r: Tensor, s: Tensor) -> Tensor:
    """`W_free - diag(r) W0 diag(s)`, averaged over kernel positions: an (out, in) matrix."""
    w_free, w_base = _as_float(w_free), _as_float(w_base)
    d = w_free - r[:, None, None] * w_base * s[None, :, None]
    return d.mean(dim=2)


class Spectrum(NamedTuple):
    """Leading singular triplets of a residual, and its total energy ||D||_F^2."""

    U: Tensor
    S: Tensor
    Vh: Tensor
    energy: float


def decompose(
    d: Tensor,
    method: str = "full",
    rank_cap: int | None = None,
    oversample: int = 10,
    niter: int = 4,
) -> Spectrum:
    """SVD of the residual `d`: full (`torch.linalg.svd`) or randomized (`torch.svd_lowrank`).

    The randomized form returns only the leading `rank_cap + oversample` triplets; the energy
    is still exact, so explained shares stay measured against the whole residual.
    """
    energy = float((d.double() ** 2).sum())
    smallest = min(d.shape)
    if method == "randomized" and rank_cap is not None and rank_cap + oversample < smallest:
        q = rank_cap + oversample
        U, S, V = torch.svd_lowrank(d, q=q, niter=niter)
        return Spectrum(U, S, V.mT, energy)
    U, S, Vh = torch.linalg.svd(d, full_matrices=False)
    return Spectrum(U, S, Vh, energy)


def decompose_product(B: Tensor, A: Tensor) -> Spectrum:
    """The exact SVD of `B @ A` (B out x k, A k x in) without forming it: QR of each factor,
    then the SVD of the k x k core, in float64. Its rank is at most k.

    Example:
        >>> B, A = torch.randn(5, 2), torch.randn(2, 4)
        >>> s = decompose_product(B, A)
        >>> bool(torch.allclose((s.U * s.S) @ s.Vh, (B @ A).double()))
        True
    """
    qb, rb = torch.linalg.qr(B.double())
    qa, ra = torch.linalg.qr(A.double().T)
    u, S, vh = torch.linalg.svd(rb @ ra.T, full_matrices=False)
    return Spectrum(qb @ u, S, vh @ qa.T, float((S**2).sum()))


def factors_from_svd(spectrum: Spectrum, rank: int) -> tuple[Tensor, Tensor]:
    """`B = U_k sqrt(S_k)` (out x k) and `A = sqrt(S_k) V_k^T` (k x in)."""
    root = spectrum.S[:rank].clamp(min=0).sqrt()
    B = spectrum.U[:, :rank] * root[None, :]
    A = root[:, None] * spectrum.Vh[:rank]
    return A, B


def _as_float(t: Tensor) -> Tensor:
    return t.double() if t.dtype == torch.float64 else t.float()
