"""Frechet distances between generated and real images (FID, Heusel et al. 2017; docs/usage.md, "FID"), and the
per-class kernel distance (KID, Binkowski et al. 2018).

Features come from pytorch-fid's InceptionV3 (2048-d pool features, the standard FID) or from the prototype
classifier's D-d features ("proto-FID", an offline stand-in that is never called FID). Images enter as uint8,
exactly what the PNGs hold. For the all-class FID only sufficient statistics (count, sum, sum of outer products)
travel between ranks; the distance is pytorch-fid's formula and numerics (see `frechet_distance`). Per class, a
few hundred features per class are kept on the host and scored once, on rank 0: KID, which is unbiased at the
50 images a class gets out of 10,000, and, in feature spaces of at most NARROW dimensions (the classifier's),
each class's FID as well.
"""
import os
from typing import Any, Callable, Iterable
from unittest import mock

import numpy as np
import torch
import torch.distributed as dist
from scipy import linalg

from cli import UserError, write_atomic
from datasets import ImageData, to_float
from distributed import any_rank, run_agreed

FEATURES = ("inception", "classifier")
NARROW = 256  # per-class FID too up to this feature width: classes x width^2 statistics stay small (200 x 256^2 x 8 B)
REF_PER_CLASS = 250  # reference features kept per class for KID (200 classes x 250 x 2048 x 2 B: 205 MB on disk)
GEN_PER_CLASS = 1000  # generated features kept per class (the rest still count in the all-class FID)
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


class ClassFeatures:
    """Up to `cap` features of each class in `classes`, the lowest image indices first, on the host: bounded
    (classes x cap x width) whatever the number of images, and gathered to rank 0 for the per-class figures."""

    def __init__(self, classes: Iterable[int], cap: int):
        self.cap = cap
        self.rows: dict[int, list[tuple[int, np.ndarray]]] = {c: [] for c in classes}

    def add(self, feats: torch.Tensor, labels: torch.Tensor, indices: list[int]) -> None:
        """Features [B, F] of the images `indices`, of classes `labels` [B]; other classes' are not kept."""
        f = feats.float().cpu().numpy()
        for row, c, i in zip(f, labels.tolist(), indices):
            if c in self.rows and len(self.rows[c]) < self.cap:
                self.rows[c].append((i, row))

    def gather(self, group: Any = None) -> "ClassFeatures | None":
        """Every rank's features merged on rank 0 (each class: the lowest indices, at most cap); None elsewhere."""
        if group is None or not dist.is_initialized():
            return self
        shares = [None] * dist.get_world_size(group) if dist.get_rank() == 0 else None
        dist.gather_object(self.rows, shares, dst=0, group=group)
        if dist.get_rank() != 0:
            return None
        merged = ClassFeatures(self.rows, self.cap)
        for c in merged.rows:
            merged.rows[c] = sorted((r for share in shares for r in share[c]), key=lambda r: r[0])[:self.cap]
        return merged

    def of(self, c: int) -> np.ndarray:
        """Class c's features [n, F] (n may be 0)."""
        return np.stack([row for _, row in self.rows[c]]) if self.rows[c] else np.zeros((0, 1), np.float32)

    def arrays(self) -> tuple[np.ndarray, np.ndarray]:
        """(features [M, F] as float16, labels [M]) for a cache file."""
        rows = [(c, row) for c in self.rows for _, row in self.rows[c]]
        return np.stack([r for _, r in rows]).astype(np.float16), np.array([c for c, _ in rows])

    @classmethod
    def from_arrays(cls, feats: np.ndarray, labels: np.ndarray, classes: int) -> "ClassFeatures":
        """What arrays() wrote, for `classes` classes."""
        made = cls(range(classes), len(labels))
        for i, (row, c) in enumerate(zip(feats.astype(np.float32), labels.tolist())):
            made.rows[c].append((i, row))
        return made


def kernel_distance(x: np.ndarray, y: np.ndarray) -> float | None:
    """KID: the unbiased estimate of MMD^2 between feature sets x [m, d] and y [n, d] with the cubic polynomial
    kernel k(a, b) = (a.b / d + 1)^3 (Binkowski et al. 2018), over all pairs; None under two images on a side."""
    if len(x) < 2 or len(y) < 2:
        return None
    x, y = x.astype(np.float64), y.astype(np.float64)
    d = x.shape[1]
    kxx, kyy, kxy = ((a @ b.T / d + 1) ** 3 for a, b in ((x, x), (y, y), (x, y)))
    m, n = len(x), len(y)
    return float((kxx.sum() - np.trace(kxx)) / (m * (m - 1)) + (kyy.sum() - np.trace(kyy)) / (n * (n - 1))
                 - 2 * kxy.mean())


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
                  world: int = 1, batch: int = 100, classes: int = 0, group: Any = None
                  ) -> tuple[FeatureStats, ClassFeatures | None]:
    """Feature statistics of a dataset and, with classes > 0, each class's first REF_PER_CLASS features (and, in a
    narrow feature space, each class's statistics: FeatureStats per class); ranks take interleaved batches and sum
    (a failure on any rank of `group` is agreed before the sum). The class features are rank 0's only."""
    stats = FeatureStats(dim, device, classes if 1 < classes and dim <= NARROW else 1)
    kept = ClassFeatures(range(classes), REF_PER_CLASS) if classes else None

    def add_share() -> None:
        for i in range(rank * batch, len(data.labels), batch * world):
            feats, labels = extract(data.images[i:i + batch]), data.labels[i:i + batch]
            stats.add(feats, labels if len(stats.count) > 1 else None)
            if kept is not None:
                kept.add(feats, labels, list(range(i, i + len(labels))))
    run_agreed(add_share, group)
    stats.all_reduce()
    return stats, kept.gather(group) if kept is not None else None


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
    """Save arrays through cli.write_atomic (a reader never sees half a file; a failed write leaves none)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    write_atomic(path, lambda f: np.savez_compressed(f, **arrays))


def class_reference_path(path: str) -> str:
    """Where the per-class statistics sit beside the all-class file `path`."""
    return path[:-4] + "_per_class.npz" if path.endswith(".npz") else path + "_per_class.npz"


def read_reference(path: str, classes: int = 0, features: bool = True) -> tuple[tuple, dict | None] | None:
    """Reference (mu, sigma) from a pytorch-fid .npz and, with classes > 0, the per-class file beside it: its image
    counts, each class's kept features (when `features`: rank 0 scores them) and, in a narrow feature space, each
    class's (mu, sigma) (None for a class of fewer than two images); None when a file is missing."""
    whole = read_npz(path, ("mu", "sigma"))
    if whole is None or not classes:
        return None if whole is None else (whole, None)
    counts = read_npz(class_reference_path(path), ("n",))
    if counts is None:
        return None
    per_class = {"n": counts[0], "features": None, "stats": None}
    if features:
        feats, labels = read_npz(class_reference_path(path), ("features", "labels"))
        per_class["features"] = ClassFeatures.from_arrays(feats, labels, classes)
    if whole[0].shape[0] <= NARROW:
        mu, sigma = read_npz(class_reference_path(path), ("mu", "sigma"))
        per_class["stats"] = [(mu[c], sigma[c]) if counts[0][c] >= 2 else None for c in range(classes)]
    return whole, per_class


def load_or_make_reference(path: str, make: Callable[[int], tuple[FeatureStats, ClassFeatures | None]],
                           is_main: bool, classes: int = 0, group: Any = None) -> tuple[tuple, dict | None]:
    """read_reference's statistics; what is missing (on any rank of `group`: a node may lack a shared filesystem)
    is computed with `make(classes)` (all ranks, one pass over the data) and saved once. Every rank reads before
    any computes, and a file unreadable on one rank fails the evaluation on all of them."""
    cached = run_agreed(lambda: read_reference(path, classes, features=is_main), group)
    if not any_rank(cached is None, group):
        return cached
    stats, kept = make(classes)
    whole = stats.mu_sigma()
    if is_main:
        write_npz(path, mu=whole[0], sigma=whole[1])
    if not classes:
        return whole, None
    counts = stats.count.cpu().numpy() if len(stats.count) > 1 else None
    per_class = {"n": counts, "features": kept, "stats": None}
    if counts is not None:  # a narrow feature space: each class's statistics as well
        per_class["stats"] = [stats.mu_sigma(c) if counts[c] >= 2 else None for c in range(classes)]
    if is_main:
        feats, labels = kept.arrays()
        per_class["features"] = ClassFeatures.from_arrays(feats, labels, classes)  # as a later read gives them
        n = np.bincount(labels, minlength=classes) if counts is None else counts
        per_class["n"] = n
        extra = {} if counts is None else {
            "mu": np.stack([p[0] if p else np.full(whole[0].shape[0], np.nan) for p in per_class["stats"]]),
            "sigma": np.stack([p[1] if p else np.full(whole[1].shape, np.nan) for p in per_class["stats"]])}
        write_npz(class_reference_path(path), n=n, features=feats, labels=labels, **extra)
    return whole, per_class
