"""Frechet distances between generated and real images (FID, Heusel et al. 2017; docs/usage.md, "FID").

Features come from pytorch-fid's InceptionV3 (2048-d pool features, the standard FID) or from the prototype
classifier's D-d features ("proto-FID", an offline stand-in that is never called FID). Images enter as uint8,
exactly what the PNGs hold. Only sufficient statistics (count, sum, sum of outer products) travel between
ranks; the distance is pytorch-fid's formula and numerics (see `frechet_distance`).
"""
import os
from typing import Any, Callable
from unittest import mock

import numpy as np
import torch
import torch.distributed as dist
from scipy import linalg

from cli import UserError
from datasets import ImageData, to_float
from distributed import any_rank, run_agreed

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
    """Running count, sum and sum of outer products of features, per class (one class unless asked), in float64,
    summable across ranks."""

    def __init__(self, dim: int, device: torch.device | str = "cpu", classes: int = 1):
        self.count = torch.zeros(classes, dtype=torch.float64, device=device)
        self.sum = torch.zeros(classes, dim, dtype=torch.float64, device=device)
        self.outer = torch.zeros(classes, dim, dim, dtype=torch.float64, device=device)

    @property
    def n(self) -> int:
        """Features added, all classes together."""
        return int(self.count.sum().item())

    def add(self, feats: torch.Tensor, labels: torch.Tensor | None = None) -> None:
        """Add features [B, F]; `labels` [B] says each row's class (needed with several classes)."""
        f = feats.double().to(self.sum.device)
        if len(self.count) == 1:
            self.count += f.shape[0]
            self.sum[0] += f.sum(0)
            self.outer[0] += f.T @ f
            return
        labels = labels.to(self.sum.device)
        self.count.index_add_(0, labels, torch.ones_like(labels, dtype=torch.float64))
        self.sum.index_add_(0, labels, f)
        for c in labels.unique().tolist():
            fc = f[labels == c]
            self.outer[c] += fc.T @ fc

    def all_reduce(self) -> None:
        """Sum the statistics of every rank."""
        if dist.is_initialized():
            for t in (self.count, self.sum, self.outer):
                dist.all_reduce(t)

    def mu_sigma(self, c: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Mean and unbiased covariance of class c (None: all classes together), as np.mean / np.cov(rowvar=False)
        would give."""
        n, total, outer = ((self.count.sum(), self.sum.sum(0), self.outer.sum(0)) if c is None
                           else (self.count[c], self.sum[c], self.outer[c]))
        n = int(n.item())
        if n < 2:
            raise UserError(f"FID needs at least 2 images{'' if c is None else f' of class {c}'}, got {n}")
        mu = total / n
        sigma = (outer - n * torch.outer(mu, mu)) / (n - 1)
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
                  world: int = 1, batch: int = 100, classes: int = 1, group: Any = None) -> FeatureStats:
    """Feature statistics of a dataset (per class with classes > 1); ranks take interleaved batches and sum (a
    failure on any rank of `group` is agreed before the sum)."""
    stats = FeatureStats(dim, device, classes)

    def add_share() -> None:
        for i in range(rank * batch, len(data.labels), batch * world):
            stats.add(extract(data.images[i:i + batch]), data.labels[i:i + batch] if classes > 1 else None)
    run_agreed(add_share, group)
    stats.all_reduce()
    return stats


def read_npz(path: str, keys: tuple[str, ...]) -> tuple[np.ndarray, ...] | None:
    """The arrays `keys` of a cached .npz, None when the file does not exist; an unreadable file is one error."""
    if not os.path.isfile(path):
        return None
    try:
        with np.load(path) as f:
            return tuple(f[k] for k in keys)
    except (OSError, KeyError, ValueError) as e:
        raise UserError(f"reference statistics {path} are unreadable ({e}); delete the file to recompute") from None


def write_npz(path: str, **arrays: np.ndarray) -> None:
    """Save arrays atomically (a temporary file in the same folder, then renamed)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}.npz"
    np.savez_compressed(tmp, **arrays)
    os.replace(tmp, path)


def class_reference_path(path: str) -> str:
    """Where the per-class statistics sit beside the all-class file `path`."""
    return path[:-4] + "_per_class.npz" if path.endswith(".npz") else path + "_per_class.npz"


def read_reference(path: str, classes: int = 0) -> tuple[tuple[np.ndarray, np.ndarray], list | None] | None:
    """Reference (mu, sigma) from a pytorch-fid .npz and, with classes > 0, each class's from the file beside it
    (None for a class of fewer than two images); None when a file is missing."""
    whole = read_npz(path, ("mu", "sigma"))
    per_class = read_npz(class_reference_path(path), ("mu", "sigma", "n")) if classes else None
    if whole is None or (classes and per_class is None):
        return None
    return whole, None if per_class is None else [
        (per_class[0][c], per_class[1][c]) if per_class[2][c] >= 2 else None for c in range(classes)]


def load_or_make_reference(path: str, make: Callable[[int], FeatureStats], is_main: bool, classes: int = 0,
                           group: Any = None) -> tuple[tuple[np.ndarray, np.ndarray], list | None]:
    """read_reference's statistics; what is missing (on any rank of `group`: a node may lack a shared filesystem)
    is computed with `make(classes)` (all ranks, one pass over the data) and saved once. Every rank reads before
    any computes, and a file unreadable on one rank fails the evaluation on all of them."""
    cached = run_agreed(lambda: read_reference(path, classes), group)
    if not any_rank(cached is None, group):
        return cached
    stats = make(max(classes, 1))
    whole = stats.mu_sigma()
    counts = stats.count.cpu().numpy()
    per_class = [stats.mu_sigma(c) if counts[c] >= 2 else None for c in range(classes)] if classes else None
    if is_main:
        write_npz(path, mu=whole[0], sigma=whole[1])
        if classes:
            dim = whole[0].shape[0]
            write_npz(class_reference_path(path), n=counts,
                      mu=np.stack([p[0] if p else np.full(dim, np.nan) for p in per_class]),
                      sigma=np.stack([p[1] if p else np.full((dim, dim), np.nan) for p in per_class]))
    return whole, per_class
