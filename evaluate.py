"""Sample a model with per-image seeds and score the images: FID (Inception) or proto-FID, and class accuracy.

Image i starts from noise seeded with `seed + i`, so the images do not depend on the batch size or on the
number of processes; each rank samples every world-th image and only feature statistics travel between ranks.
Used by sample.py (a saved run) and train.py (EMA grids and --fid_every during training).
"""
import argparse
import hashlib
import os
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
import torch.distributed as dist
from torch import nn
from tqdm import tqdm

from datasets import DatasetError, class_grid_labels, load_dataset, save_grid, save_png, to_float, to_uint8
from diffusion import GaussianDiffusion
from fid import FeatureStats, dataset_stats, frechet_distance, load_or_make_reference, make_extractor
from runtime import Dist, FastPath, UserError


@dataclass
class Sampler:
    """How images are drawn: DDIM (steps, eta, timestep selection) or T-step DDPM, guidance w, images per forward
    pass, the base seed, and the precision of the forward passes."""
    ddim: bool
    num_steps: int
    eta: float
    select: str
    w: float
    batch: int
    seed: int
    fast: FastPath | None = None

    @classmethod
    def from_args(cls, args: argparse.Namespace, w: float | None = None, fast: FastPath | None = None) -> "Sampler":
        """The sampler the flags describe (--ddim --num_steps --eta --select --w --genbatch --seed)."""
        return cls(args.ddim, args.num_steps, args.eta, args.select, args.w if w is None else w, args.genbatch,
                   args.seed, fast)

    def steps(self, T: int) -> int:
        """Network evaluations per image (each a guided pair)."""
        return self.num_steps if self.ddim else T

    def name(self, T: int) -> str:
        return f"DDIM-{self.num_steps} ({self.select}, eta {self.eta})" if self.ddim else f"DDPM-{T}"

    def precision(self, device: torch.device):
        """Autocast for the forward passes, as the run's --amp asks."""
        return self.fast.autocast(device) if self.fast is not None else nullcontext()

    def draw(self, diffusion: GaussianDiffusion, net: nn.Module, cemb: torch.Tensor, shape: tuple,
             generator: torch.Generator | list[torch.Generator]) -> torch.Tensor:
        """One batch of samples in [-1, 1]."""
        with self.precision(diffusion.device):
            if self.ddim:
                return diffusion.ddim_sample(net, cemb, shape, self.num_steps, self.eta, self.select, self.w, generator)
            return diffusion.sample(net, cemb, shape, self.w, generator)


@dataclass
class Scoring:
    """What the images are scored with: the feature extractor, its reference statistics, and a classifier."""
    features: str  # inception (FID) or classifier (proto-FID)
    reference: str  # pytorch-fid .npz of the training set, computed and saved there when missing
    data_root: str
    classifier: nn.Module | None = None  # proto-FID features and class accuracy
    inception_weights: str | None = None


def image_labels(n: int, clsnum: int, label: str, seed: int) -> torch.Tensor:
    """Class of every image: `range` is i mod clsnum (exactly balanced), `random` is uniform from a fixed seed."""
    if label == "range":
        return torch.arange(n) % clsnum
    if label == "random":
        return torch.randint(clsnum, (n,), generator=torch.Generator().manual_seed(seed))
    raise UserError(f"unknown --label '{label}' (choose range or random)")


def generate(diffusion: GaussianDiffusion, net: nn.Module, cemblayer: nn.Module, indices: list[int],
             labels: torch.Tensor, shape: tuple[int, int, int], sampler: Sampler,
             progress: bool = False) -> Iterator[tuple[list[int], torch.Tensor]]:
    """Yield (image indices, uint8 images) in batches; image i's noise comes from its own seed `seed + i`."""
    for start in tqdm(range(0, len(indices), sampler.batch), disable=not progress, desc="sampling",
                      dynamic_ncols=True):
        chunk = indices[start:start + sampler.batch]
        gens = [torch.Generator().manual_seed(sampler.seed + i) for i in chunk]
        with torch.inference_mode():
            cemb = cemblayer(labels[chunk].to(diffusion.device))
        yield chunk, to_uint8(sampler.draw(diffusion, net, cemb, (len(chunk),) + tuple(shape), gens))


def classifier_for(path: str) -> nn.Module:
    """The prototype classifier of a file written by train_classifier.py or the authors' best_model.pt."""
    from prototypes import load_classifier
    return load_classifier(path)


def reference_path(cfg: dict, features: str, data_root: str, path_proto: str | None) -> str:
    """Cache file of the training set's feature statistics for this (dataset, size, feature extractor)."""
    tag = features
    if features == "classifier":
        tag += "-" + hashlib.sha1(open(path_proto, "rb").read()).hexdigest()[:10]
    return os.path.join(data_root, "fid_stats", f"{cfg['dataset']}_{cfg['image_size']}_{tag}.npz")


def evaluate(diffusion: GaussianDiffusion, net: nn.Module, cemblayer: nn.Module, cfg: dict, labels: torch.Tensor,
             sampler: Sampler, scoring: Scoring, rank: int = 0, world: int = 1, out_dir: str | None = None,
             progress: bool = False) -> dict:
    """Generate one image per label (this rank's share), optionally write them, and return FID and accuracy."""
    device = diffusion.device
    extract, dim = make_extractor(scoring.features, device, scoring.inception_weights, scoring.classifier)
    shape = (cfg["inch"], cfg["image_size"], cfg["image_size"])
    stats = FeatureStats(dim, device)
    hits = torch.zeros(2, dtype=torch.float64, device=device)  # correctly classified, classified
    for chunk, u8 in generate(diffusion, net, cemblayer, list(range(rank, len(labels), world)), labels, shape,
                              sampler, progress):
        if out_dir is not None:
            for i, img in zip(chunk, u8):
                save_png(img, os.path.join(out_dir, f"{i}.png"))
        stats.add(extract(u8))
        if scoring.classifier is not None:
            with torch.inference_mode():
                _, logits = scoring.classifier(to_float(u8.to(device)))
            hits += torch.tensor([(logits.argmax(1).cpu() == labels[chunk]).sum().item(), len(chunk)],
                                 dtype=torch.float64, device=device)
    stats.all_reduce()
    if world > 1:
        dist.all_reduce(hits)

    def reference():
        try:
            data = load_dataset(cfg["dataset"], "all", scoring.data_root, cfg["image_size"], False,
                                cfg.get("tiny_imagenet_path"))
        except DatasetError as e:
            raise UserError(f"reference statistics {scoring.reference} are missing and the training set cannot be "
                            f"read: {e}") from None
        return dataset_stats(data, extract, dim, device, rank, world)

    mu_ref, sigma_ref = load_or_make_reference(scoring.reference, reference, rank == 0)
    mu, sigma = stats.mu_sigma()
    result = {"fid": frechet_distance(mu, sigma, mu_ref, sigma_ref), "n": stats.n}
    if scoring.classifier is not None:
        result["class_accuracy"] = (hits[0] / hits[1]).item()
    return result


def make_evaluator(args: argparse.Namespace, cfg: dict, diffusion: GaussianDiffusion, d: Dist,
                   fast: FastPath) -> Callable[[nn.Module], dict]:
    """For train.py --fid_every: EMA models -> FID record, sampling --fid_num images split across ranks."""
    path = args.eval_classifier or args.path_proto
    classifier = classifier_for(path).to(d.device) if path else None
    scoring = Scoring(args.fid_features, reference_path(cfg, args.fid_features, args.data_root, path), args.data_root,
                      classifier)
    labels = image_labels(args.fid_num, cfg["num_classes"], "range", args.seed)
    sampler = Sampler.from_args(args, fast=fast)

    def run(models: nn.Module) -> dict:
        r = evaluate(diffusion, models["net"], models["cemblayer"], cfg, labels, sampler, scoring, d.rank, d.world)
        out = {"metric": "FID" if args.fid_features == "inception" else "proto-FID", "value": r["fid"], "n": r["n"],
               "sampler": "ddim" if args.ddim else "ddpm", "steps": sampler.steps(diffusion.T), "w": args.w,
               "weights": "ema", "reference": os.path.abspath(scoring.reference),
               "features": args.fid_features if args.fid_features == "inception"
               else f"classifier {os.path.abspath(path)}"}
        if "class_accuracy" in r:
            out["class_accuracy"] = r["class_accuracy"]
        return out
    return run


@torch.no_grad()
def sample_grid(diffusion: GaussianDiffusion, models: nn.Module, cfg: dict, sampler: Sampler, path: str) -> str:
    """A class-per-row grid of sampler.batch images from one fixed seed, so grids of successive epochs compare."""
    per_class = sampler.batch // cfg["clsnum"]
    labels = class_grid_labels(cfg["clsnum"], per_class).to(diffusion.device)
    with sampler.precision(diffusion.device):
        cemb = models["cemblayer"](labels)
    shape = (len(labels), cfg["inch"], cfg["image_size"], cfg["image_size"])
    x = sampler.draw(diffusion, models["net"], cemb, shape, torch.Generator().manual_seed(sampler.seed))
    save_grid(to_uint8(x), per_class, path)
    return path
