"""Frechet distances between generated and real images (SPEC section 8).

Features come from pytorch-fid's InceptionV3 (2048-d pool features, the standard FID) or from the prototype
classifier's D-d features ("proto-FID", an offline stand-in that is never called FID). Images enter as uint8,
exactly what the PNGs hold. Only sufficient statistics (count, sum, sum of outer products) travel between
ranks; the distance is pytorch-fid's formula and numerics (see `frechet_distance`).
"""
import os
from typing import Callable
from unittest import mock

import numpy as np
import torch
import torch.distributed as dist
from scipy import linalg

from datasets import ImageData, to_float
from runtime import UserError

FEATURES = ("inception", "classifier")
INCEPTION_FILE = "pt_inception-2015-12-05-6726825d.pth"  # pytorch-fid's FID_WEIGHTS_URL names this file

Extractor = Callable[[torch.Tensor], torch.Tensor]


def inception_weights_path() -> str:
    """Where pytorch-fid looks for (and downloads) its Inception weights: $TORCH_HOME/hub/checkpoints/."""
    return os.path.join(torch.hub.get_dir(), "checkpoints", INCEPTION_FILE)


def pytorch_fid_inception():
    """pytorch-fid's inception module, imported only where Inception FID is asked for."""
    try:
        from pytorch_fid import inception
    except ImportError:
        raise UserError("Inception FID needs pytorch-fid: pip install pytorch-fid (or use --fid_features classifier, "
                        "which needs nothing more)") from None
    return inception


def inception_network(weights: str | None, device: torch.device) -> torch.nn.Module:
    """pytorch-fid's InceptionV3 (pool3 block), from `weights` or the torch hub cache (downloaded when online)."""
    pf_inception = pytorch_fid_inception()
    if weights is not None:
        if not os.path.isfile(weights):
            raise UserError(f"--inception_weights {weights} does not exist")
        loader = lambda *a, **k: torch.load(weights, map_location="cpu", weights_only=True)  # noqa: E731
        with mock.patch.object(pf_inception, "load_state_dict_from_url", loader):
            net = pf_inception.InceptionV3([3])
    else:
        try:
            net = pf_inception.InceptionV3([3])
        except (OSError, RuntimeError) as e:
            raise UserError(f"FID needs pytorch-fid's Inception weights {INCEPTION_FILE} and could not get them "
                            f"({type(e).__name__}); download {pf_inception.FID_WEIGHTS_URL} into "
                            f"{os.path.dirname(inception_weights_path())}/ (or pass --inception_weights FILE, or use "
                            "--fid_features classifier)") from None
    return net.eval().requires_grad_(False).to(device)


def feature_width(kind: str, classifier: torch.nn.Module | None) -> int:
    """Width of the feature space: Inception's pool3 (2048) or the prototype classifier's features."""
    return 2048 if kind == "inception" else classifier.reduce_to_hidden.out_features


def make_extractor(kind: str, device: torch.device, inception_weights: str | None = None,
                   classifier: torch.nn.Module | None = None) -> tuple[Extractor, int]:
    """(uint8 images [B, C, H, W] -> features [B, F], F); grayscale is seen as RGB, as PIL's convert does."""
    if kind == "inception":
        net = inception_network(inception_weights, device)

        def extract(u8: torch.Tensor) -> torch.Tensor:
            x = u8.to(device).float() / 255  # what ToTensor gives pytorch-fid for a PNG
            return net(x.expand(-1, 3, -1, -1))[0].flatten(1)
    elif kind == "classifier":
        if classifier is None:
            raise UserError("--fid_features classifier needs a classifier (--path_proto)")
        net = classifier.eval().requires_grad_(False).to(device)

        def extract(u8: torch.Tensor) -> torch.Tensor:
            return net.features(to_float(u8.to(device)))
    else:
        raise UserError(f"unknown --fid_features '{kind}' (choose from {', '.join(FEATURES)})")
    return torch.inference_mode()(extract), feature_width(kind, classifier)


class FeatureStats:
    """Running count, sum and sum of outer products of features, in float64, summable across ranks."""

    def __init__(self, dim: int, device: torch.device | str = "cpu"):
        self.n = 0
        self.sum = torch.zeros(dim, dtype=torch.float64, device=device)
        self.outer = torch.zeros(dim, dim, dtype=torch.float64, device=device)

    def add(self, feats: torch.Tensor) -> None:
        f = feats.double().to(self.sum.device)
        self.n += f.shape[0]
        self.sum += f.sum(0)
        self.outer += f.T @ f

    def all_reduce(self) -> None:
        """Sum the statistics of every rank."""
        if dist.is_initialized():
            n = torch.tensor([float(self.n)], dtype=torch.float64, device=self.sum.device)
            for t in (n, self.sum, self.outer):
                dist.all_reduce(t)
            self.n = int(n.item())

    def mu_sigma(self) -> tuple[np.ndarray, np.ndarray]:
        """Mean and unbiased covariance, as np.mean / np.cov(rowvar=False) would give."""
        if self.n < 2:
            raise UserError(f"FID needs at least 2 images, got {self.n}")
        mu = self.sum / self.n
        sigma = (self.outer - self.n * torch.outer(mu, mu)) / (self.n - 1)
        return mu.cpu().numpy(), sigma.cpu().numpy()


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray,
                     eps: float = 1e-6) -> float:
    """|mu1 - mu2|^2 + tr(sigma1 + sigma2 - 2 (sigma1 sigma2)^(1/2)), with pytorch-fid's numerics.

    Not a call of pytorch-fid's calculate_frechet_distance: version 0.3.0 passes `disp` to scipy's sqrtm, which
    SciPy 1.18 removed (seen failing on a GPU machine). Same steps: an eps ridge if the root is not finite, the real
    part when the imaginary one is rounding noise. Tested equal to pytorch-fid's function where that still runs.
    """
    covmean = linalg.sqrtm(sigma1 @ sigma2)
    if not np.isfinite(covmean).all():  # singular product: pytorch-fid's ridge
        ridge = eps * np.eye(sigma1.shape[0])
        covmean = linalg.sqrtm((sigma1 + ridge) @ (sigma2 + ridge))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise UserError(f"FID is ill-defined here: sqrt(sigma1 sigma2) has an imaginary part of "
                            f"{np.abs(covmean.imag).max():.3g} (too few images for the feature width?)")
        covmean = covmean.real
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def dataset_stats(data: ImageData, extract: Extractor, dim: int, device: torch.device, rank: int = 0,
                  world: int = 1, batch: int = 100) -> tuple[np.ndarray, np.ndarray]:
    """mu, sigma of a dataset's features; ranks take interleaved batches and sum their statistics."""
    stats = FeatureStats(dim, device)
    for i in range(rank * batch, len(data.labels), batch * world):
        stats.add(extract(data.images[i:i + batch]))
    stats.all_reduce()
    return stats.mu_sigma()


def load_or_make_reference(path: str, make: Callable[[], tuple[np.ndarray, np.ndarray]],
                           is_main: bool) -> tuple[np.ndarray, np.ndarray]:
    """Reference mu, sigma from a pytorch-fid .npz, computed with `make` (all ranks) and saved once if missing."""
    if os.path.isfile(path):
        try:
            with np.load(path) as f:
                return f["mu"], f["sigma"]
        except (OSError, KeyError, ValueError) as e:
            raise UserError(f"reference statistics {path} are unreadable ({e}); delete the file to recompute") from None
    mu, sigma = make()
    if is_main:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        tmp = f"{path}.tmp{os.getpid()}.npz"
        np.savez_compressed(tmp, mu=mu, sigma=sigma)
        os.replace(tmp, path)
    return mu, sigma
