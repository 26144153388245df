"""Preservation metrics: how much an erasure method changes images it should leave alone.

* ``ssim`` / ``pixel_error`` compare paired images (same prompt and seed, before vs after erasure).
* ``fid_kid`` compares two unpaired sets of precomputed image features (e.g. Inception pool features
  of reference vs generated images); the caller chooses and computes the features.
"""

from __future__ import annotations

import warnings

import torch
from torch import Tensor, nn

from ...errors import UnguideError

C1, C2 = 0.01**2, 0.03**2  # (K1 * L)^2, (K2 * L)^2 with data range L = 1
INSTALL_HINT = "pip install 'unguide[eval]'"


def _torchmetrics(what: str):
    """The torchmetrics package, or one line saying how to install it (it is the ``eval`` extra)."""
    try:
        import torchmetrics
    except ImportError:
        raise UnguideError(f"{what} needs the package torchmetrics: {INSTALL_HINT}") from None
    return torchmetrics


def ssim(a: Tensor, b: Tensor, window: int = 11, sigma: float = 1.5) -> Tensor:
    """Mean SSIM per image (Wang et al. 2004) for ``[N, C, H, W]`` tensors in [0, 1] -> ``[N]``.

    The SSIM map is torchmetrics' ``structural_similarity_index_measure`` (float64, data range 1): Gaussian window
    11x11, sigma 1.5, C1 = 0.01^2, C2 = 0.03^2, population (co)variances. Its mean is taken over the positions
    where the window lies inside the image ('valid' filtering, as in Wang et al.'s reference code), and over
    channels. torchmetrics reflect-pads the images by half the window, and its own mean (1.9; releases up to 1.4.0
    cut the borders off as here) covers the whole map, mirrored borders included: more than half of a 32x32 map,
    which moves the toy benchmark's figures by up to 0.29. torchmetrics derives the window from sigma
    (2 * int(3.5 sigma + 0.5) + 1), so ``window`` must match it; images need sides of at least ``window`` pixels.
    """
    if a.shape != b.shape or a.dim() != 4:
        raise ValueError(f"expected two [N, C, H, W] tensors of equal shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    size = 2 * int(3.5 * sigma + 0.5) + 1
    if window != size:
        raise ValueError(f"window {window} does not match sigma {sigma}: torchmetrics uses a {size}-px Gaussian window")
    if min(a.shape[-2:]) < size:
        raise ValueError(f"images of {a.shape[-2]}x{a.shape[-1]} px are smaller than SSIM's {size}x{size} window")
    _torchmetrics("SSIM")
    from torchmetrics.functional.image import structural_similarity_index_measure

    _, ssim_map = structural_similarity_index_measure(a.double(), b.double(), gaussian_kernel=True, sigma=sigma,
                                                      kernel_size=window, reduction="none", data_range=1.0,
                                                      return_full_image=True)
    half = size // 2
    return ssim_map[..., half:-half, half:-half].mean(dim=(1, 2, 3)).float()


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
    _torchmetrics("FID and KID")
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
