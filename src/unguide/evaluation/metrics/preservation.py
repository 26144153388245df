"""Preservation metrics: how much an erasure method changes images it should leave alone.

* ``ssim`` / ``pixel_error`` compare paired images (same prompt and seed, before vs after erasure).
* ``fid_kid`` compares two unpaired sets of precomputed image features (e.g. Inception pool features
  of reference vs generated images); the caller chooses and computes the features.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import Tensor, nn

C1, C2 = 0.01**2, 0.03**2  # (K1 * L)^2, (K2 * L)^2 with data range L = 1


def _gaussian_window(size: int, sigma: float = 1.5) -> Tensor:
    x = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(x**2) / (2 * sigma**2))
    g = g / g.sum()
    return g[:, None] * g[None, :]


def ssim(a: Tensor, b: Tensor, window: int = 11, sigma: float = 1.5) -> Tensor:
    """Mean SSIM per image (Wang et al. 2004) for ``[N, C, H, W]`` tensors in [0, 1] -> ``[N]``.

    Gaussian window 11x11, sigma 1.5, C1 = 0.01^2, C2 = 0.03^2, population (co)variances, 'valid'
    filtering (no padding); computed per channel and averaged over channels and positions. Images
    smaller than the window use the largest odd window that fits, min(11, H, W).
    """
    if a.shape != b.shape or a.dim() != 4:
        raise ValueError(f"expected two [N, C, H, W] tensors of equal shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    n, c, h, w = a.shape
    size = min(window, h, w)
    size -= 1 - size % 2  # make it odd
    kernel = _gaussian_window(size, sigma).to(a.device).expand(c, 1, size, size).contiguous()
    a, b = a.double(), b.double()

    def blur(x: Tensor) -> Tensor:
        return F.conv2d(x, kernel, groups=c)

    mu_a, mu_b = blur(a), blur(b)
    var_a = blur(a * a) - mu_a**2
    var_b = blur(b * b) - mu_b**2
    cov = blur(a * b) - mu_a * mu_b
    luminance = (2 * mu_a * mu_b + C1) / (mu_a**2 + mu_b**2 + C1)
    contrast_structure = (2 * cov + C2) / (var_a + var_b + C2)
    return (luminance * contrast_structure).mean(dim=(1, 2, 3)).float()


def pixel_error(a: Tensor, b: Tensor) -> Tensor:
    """Mean absolute pixel difference per image, in [0, 1] units (inputs in [0, 1]) -> ``[N]``."""
    return (a.double() - b.double()).abs().flatten(1).mean(dim=1).float()


class PrecomputedFeatures(nn.Module):
    """Identity "feature extractor" so torchmetrics' FID/KID can consume precomputed features.

    torchmetrics reads ``num_features`` (so it never probes the module with a dummy image) and calls
    ``forward`` on whatever is passed to ``update``; here that is the ``[N, D]`` feature matrix itself.
    """

    def __init__(self, num_features: int):
        super().__init__()
        self.num_features = int(num_features)

    def forward(self, features: Tensor) -> Tensor:
        return features


def fid_kid(real_features: Tensor, fake_features: Tensor, subset_size: int | None = None, subsets: int = 100,
            seed: int = 0) -> dict:
    """FID and KID between two feature sets ``[N, D]`` and ``[M, D]`` (torchmetrics, float64).

    FID = ||mu_r - mu_f||^2 + Tr(S_r + S_f - 2 (S_r S_f)^{1/2}) with unbiased covariances.
    KID = unbiased MMD^2 with the polynomial kernel (x.y / D + 1)^3, averaged over ``subsets`` random
    subsets of ``subset_size`` (default min(1000, N, M)) samples from each set; kid_std is the
    population std over subsets. Subsets are drawn from a fixed ``seed`` (global RNG left untouched).
    """
    from torchmetrics.image.fid import FrechetInceptionDistance  # submodules: the package only re-exports
    from torchmetrics.image.kid import KernelInceptionDistance  # these when torch-fidelity is installed

    real, fake = real_features.detach().double().cpu(), fake_features.detach().double().cpu()
    if real.dim() != 2 or fake.dim() != 2 or real.shape[1] != fake.shape[1]:
        raise ValueError(f"expected [N, D] and [M, D] features, got {tuple(real.shape)} and {tuple(fake.shape)}")
    subset_size = subset_size or min(1000, len(real), len(fake))
    extractor = PrecomputedFeatures(real.shape[1])
    fid = FrechetInceptionDistance(feature=extractor)
    with warnings.catch_warnings():  # "KID will save all extracted features in buffer"
        warnings.simplefilter("ignore", UserWarning)
        kid = KernelInceptionDistance(feature=extractor, subsets=subsets, subset_size=subset_size)
    for metric in (fid, kid):
        metric.update(real, real=True)
        metric.update(fake, real=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        kid_mean, kid_std = kid.compute()
    return {"fid": float(fid.compute()), "kid_mean": float(kid_mean), "kid_std": float(kid_std)}
