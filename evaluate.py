"""Score sampled images: FID (Inception) or proto-FID, class accuracy and per-class figures, and the `fid` record.

Each rank samples every world-th image (sampling.py) and only feature statistics (and a grid's few images) travel
between ranks. Used by sample.py (a saved run) and train.py (--fid_every during training, whose failures are
agreed, recorded and skipped).
"""
import argparse
import os
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.distributed as dist
from torch import nn

from cli import UserError, file_digest
from datasets import DatasetError, folder_cache, folder_key, load_dataset, to_float
from diffusion import GaussianDiffusion
from distributed import AgreedFailure, Dist, broadcast_object, run_agreed
from fid import (GEN_PER_CLASS, NARROW, ClassFeatures, FeatureStats, dataset_stats, feature_width, frechet_distance,
                 kernel_distance, load_or_make_reference, make_extractor)
from runlog import RunLog
from sampling import PngWriter, Sampler, generate, image_labels


@dataclass
class Scoring:
    """What the images are scored with: the feature extractor, its reference statistics, and a classifier; the
    extractor and the reference are made at the first evaluation and reused by every later one."""
    features: str  # inception (FID) or classifier (proto-FID)
    reference: str  # pytorch-fid .npz of the training set, computed and saved there when missing
    data_root: str
    classifier: nn.Module | None = None  # proto-FID features and class accuracy
    classifier_file: str | None = None  # where it came from, for the records
    inception_weights: str | None = None
    per_class: bool | list[int] = False  # per-class figures (KID; FID too in a narrow space) of all or these classes
    made: dict = field(default_factory=dict)  # the extractor and the reference, once made

    def classes(self, num_classes: int) -> list[int]:
        """The classes the per-class figures are for (none when per_class is off)."""
        if self.per_class is True:
            return list(range(num_classes))
        return [c for c in self.per_class if c < num_classes] if self.per_class else []

    @property
    def metric(self) -> str:
        """FID for Inception features; proto-FID for the classifier's, never called FID."""
        return "FID" if self.features == "inception" else "proto-FID"

    def extractor(self, device: torch.device) -> tuple[Callable[[torch.Tensor], torch.Tensor], int]:
        """(uint8 images -> features, feature width), made once."""
        if "extractor" not in self.made:
            self.made["extractor"] = make_extractor(self.features, device, self.inception_weights, self.classifier)
        return self.made["extractor"]

    def reference_stats(self, cfg: dict, device: torch.device, rank: int, world: int, group: Any = None) -> tuple:
        """(mu, sigma) of the training set and, with per_class, its per-class figures' references (fid.read_reference),
        made once (by every rank of `group` together, their failures agreed)."""
        if "reference" not in self.made:
            extract, dim = self.extractor(device)

            def read_training_set():
                try:
                    data = load_dataset(cfg["dataset"], "all", self.data_root, cfg["image_size"], False,
                                        cfg.get("tiny_imagenet_path"), crop=cfg.get("crop", False))
                except DatasetError as e:
                    raise UserError(f"reference statistics {self.reference} are missing and the training set "
                                    f"cannot be read: {e}") from None
                if data.classes != cfg.get("classes", data.classes):
                    raise UserError(f"reference statistics {self.reference} are missing and {data.source} no longer "
                                    f"holds the run's classes ({len(cfg['classes'])} when it trained, "
                                    f"{len(data.classes)} now: {', '.join(data.classes[:5])}...)")
                return data

            def from_data(classes: int):
                data = run_agreed(read_training_set, group)
                return dataset_stats(data, extract, dim, device, rank, world, classes=classes, group=group)
            self.made["reference"] = load_or_make_reference(self.reference, from_data, rank == 0,
                                                            cfg["num_classes"] if self.per_class else 0, group)
        return self.made["reference"]


def classifier_for(path: str) -> nn.Module:
    """The prototype classifier of a file written by train_classifier.py or the authors' best_model.pt."""
    from prototypes import load_classifier
    return load_classifier(path)


def reference_path(cfg: dict, features: str, data_root: str, path_proto: str | None) -> str:
    """Cache file of the training set's feature statistics for this (dataset, size, feature extractor)."""
    tag = features
    if features == "classifier":
        tag += "-" + file_digest(path_proto)[:10]
    if cfg["dataset"] != "imagefolder":
        return os.path.join(data_root, "fid_stats", f"{cfg['dataset']}_{cfg['image_size']}_{tag}.npz")
    # outside the class folders, named by what the folder holds now, so a changed folder gets statistics of its own
    resize = "crop" if cfg.get("crop", False) else "squash"
    return os.path.join(folder_cache(data_root), "fid_stats",
                        f"imagefolder_{cfg['image_size']}_{resize}_{folder_key(data_root)}_{tag}.npz")


def evaluate(diffusion: GaussianDiffusion, net: nn.Module, cemblayer: nn.Module, cfg: dict, labels: torch.Tensor,
             sampler: Sampler, scoring: Scoring | None, rank: int = 0, world: int = 1, out_dir: str | None = None,
             keep: frozenset[int] = frozenset(), progress: bool = False, group: Any = None,
             real: torch.Tensor | None = None) -> dict:
    """Generate one image per label (this rank's share), optionally write them, and score them; with `real` (uint8
    images, one per label) score those instead: the real-vs-real floor of the same evaluation.

    Returns FID, n and class accuracy when `scoring` is given, and under "kept" this rank's images whose index is
    in `keep` (for a grid). In a job (`group`: its control group) a failure on any rank, before the statistics are
    summed, raises AgreedFailure on every rank, so that none waits in a sum the failed rank never joins.
    """
    device = diffusion.device
    shape = (cfg["inch"], cfg["image_size"], cfg["image_size"])
    classes = cfg["num_classes"]
    hits = torch.zeros(classes, 2, dtype=torch.float64, device=device)  # per class: correctly classified, classified
    kept = {}

    chosen = scoring.classes(classes) if scoring is not None else []

    def sample_and_extract() -> tuple[FeatureStats, ClassFeatures] | None:
        if scoring is not None:
            extract, dim = scoring.extractor(device)
            stats = FeatureStats(dim, device, classes if chosen and dim <= NARROW else 1)  # per class when narrow
            kept_features = ClassFeatures(chosen, GEN_PER_CLASS)
        writer = PngWriter(out_dir) if out_dir is not None else None
        try:
            mine = list(range(rank, len(labels), world))
            source = generate(diffusion, net, cemblayer, mine, labels, shape, sampler, progress) if real is None \
                else ((mine[i:i + sampler.batch], real[mine[i:i + sampler.batch]])
                      for i in range(0, len(mine), sampler.batch))
            for chunk, u8 in source:
                if writer is not None:
                    writer.write(chunk, u8)
                kept.update({i: img for i, img in zip(chunk, u8) if i in keep})
                if scoring is None:
                    continue
                chunk_labels = labels[chunk].to(device)
                feats = extract(u8)
                stats.add(feats, chunk_labels)
                if chosen:
                    kept_features.add(feats, labels[chunk], chunk)
                if scoring.classifier is not None:
                    with torch.inference_mode():
                        _, logits = scoring.classifier(to_float(u8.to(device)))
                    both = torch.stack([(logits.argmax(1) == chunk_labels).double(),
                                        torch.ones_like(chunk_labels, dtype=torch.float64)], 1)
                    hits.index_add_(0, chunk_labels, both)
        finally:
            if writer is not None:
                writer.close()
        return (stats, kept_features) if scoring is not None else None

    sampled = run_agreed(sample_and_extract, group)
    if scoring is None:
        return {"kept": kept}
    stats, kept_features = sampled
    stats.all_reduce()
    if world > 1:
        dist.all_reduce(hits)
    generated = kept_features.gather(group) if chosen else None
    (mu_ref, sigma_ref), class_refs = scoring.reference_stats(cfg, device, rank, world, group)
    result = {"fid": frechet_distance(*stats.mu_sigma(), mu_ref, sigma_ref), "n": stats.n, "kept": kept}
    if scoring.classifier is not None:
        result["class_accuracy"] = (hits[:, 0].sum() / hits[:, 1].sum()).item()
    if chosen:  # scored once, on rank 0, and handed to the others
        counts = torch.bincount(labels, minlength=classes).tolist()
        figures = run_agreed(lambda: per_class_figures(chosen, counts, stats, generated, class_refs,
                                                       hits if scoring.classifier is not None else None)
                             if rank == 0 else None, group)
        result["per_class"] = broadcast_object(figures, group) if world > 1 else figures
    return result


def per_class_figures(chosen: list[int], counts: list[int], stats: FeatureStats, generated: ClassFeatures,
                      class_refs: dict, hits: torch.Tensor | None) -> dict:
    """For each chosen class (lists indexed by class, None for the others): its image count, KID against its own
    reference features, in a narrow feature space its FID against its own statistics (None: under two images on
    either side, or a covariance product with no real square root) and, with a classifier, class accuracy."""
    classes = len(counts)
    out = {"classes": chosen, "n": [counts[c] if c in chosen else None for c in range(classes)],
           "kid": [None] * classes}
    for c in chosen:
        out["kid"][c] = kernel_distance(generated.of(c), class_refs["features"].of(c))
    if class_refs["stats"] is not None and len(stats.count) > 1:
        out["fid"] = [None] * classes
        for c in chosen:
            try:
                ref = class_refs["stats"][c]
                out["fid"][c] = frechet_distance(*stats.mu_sigma(c), *ref) if ref is not None else None
            except UserError:
                pass
    if hits is not None:
        out["class_accuracy"] = [(hits[c, 0] / hits[c, 1]).item() if c in chosen and hits[c, 1] > 0 else None
                                 for c in range(classes)]
    return out


def real_images(cfg: dict, data_root: str, labels: torch.Tensor, split: str = "test") -> torch.Tensor:
    """One real image per label from a split (test: held out; all: what the diffusion model trains on, the
    reference's own images): for class c, its images in file order, so that n images of balanced labels are the
    first n / classes of each class, the same for every run of a dataset."""
    data = load_dataset(cfg["dataset"], split, data_root, cfg["image_size"], False, cfg.get("tiny_imagenet_path"),
                        crop=cfg.get("crop", False))
    index = torch.zeros_like(labels)
    for c in labels.unique().tolist():
        wanted, have = (labels == c).nonzero()[:, 0], (data.labels == c).nonzero()[:, 0]
        if len(have) < len(wanted):
            raise UserError(f"--real {split} needs {len(wanted)} images of class {c}; the {split} split of "
                            f"{cfg['dataset']} has {len(have)}: lower --genum" +
                            (" or use --real all (the training images)" if split == "test" else ""))
        index[wanted] = have[:len(wanted)]
    return data.images[index]


def few_images_warning(n: int, width: int) -> str | None:
    """A warning line when n images cannot give a full-rank covariance in `width` dimensions."""
    if n > width:
        return None
    return (f"warning: {n} images for {width}-dimensional features: their covariance is singular, so this FID is "
            f"biased (upwards) and not comparable with FIDs of more images; use more than {width}")


def fid_record(result: dict, scoring: Scoring, sampler: Sampler, T: int, epoch: int, step: int | None,
               weights: str, compat: str, label: str = "range") -> dict:
    """The `fid` record of one evaluation, with every setting that moves the number; train.py's periodic records
    and sample.py's have the same fields."""
    features = scoring.features if scoring.features == "inception" else \
        f"classifier {os.path.abspath(scoring.classifier_file)}"
    record = {"event": "fid", "epoch": epoch, "step": step, "metric": scoring.metric, "value": result["fid"],
              "n": result["n"], "sampler": "ddim" if sampler.ddim else "ddpm", "steps": sampler.steps(T),
              "eta": sampler.eta if sampler.ddim else None, "select": sampler.select if sampler.ddim else None,
              "w": sampler.w, "weights": weights, "compat": compat, "label": label, "seed": sampler.seed,
              "reference": os.path.abspath(scoring.reference), "features": features}
    if scoring.features != "inception":  # which classifier, whatever path it is read from later
        record["classifier_sha1"] = file_digest(scoring.classifier_file)[:12]
    record.update({k: result[k] for k in ("class_accuracy", "per_class") if k in result})
    return record


def make_evaluator(args: argparse.Namespace, cfg: dict, diffusion: GaussianDiffusion, d: Dist, sampler: Sampler,
                   say: Callable[[str], None], weights: str = "ema") -> Callable[[nn.Module, nn.Module, int, int], dict]:
    """For train.py --fid_every: (sampling net, class embedding, epoch, step) -> the fid record of --fid_num images
    split across ranks, drawn with the run's sampler (a failure on any rank: AgreedFailure on every rank)."""
    path = args.eval_classifier or args.path_proto
    classifier = classifier_for(path).to(d.device) if path else None
    scoring = Scoring(args.fid_features, reference_path(cfg, args.fid_features, args.data_root, path), args.data_root,
                      classifier, path, per_class=args.per_class)
    labels = image_labels(args.fid_num, cfg["num_classes"], "range", args.seed)
    warning = few_images_warning(args.fid_num, feature_width(args.fid_features, classifier))
    if warning:
        say(f"--fid_num: {warning}")

    def run(net: nn.Module, cemblayer: nn.Module, epoch: int, step: int) -> dict:
        result = evaluate(diffusion, net, cemblayer, cfg, labels, sampler, scoring, d.rank, d.world, group=d.control)
        return fid_record(result, scoring, sampler, diffusion.T, epoch, step, weights, args.compat)
    return run


def evaluate_or_skip(evaluator: Callable[[nn.Module, nn.Module, int, int], dict], net: nn.Module,
                     cemblayer: nn.Module, epoch: int, step: int, log: RunLog) -> None:
    """One periodic evaluation into metrics.jsonl; one that fails (on any rank: the ranks agree before any sum a
    failed rank would miss) is recorded and skipped by every rank, since days of training are worth more."""
    try:
        record = evaluator(net, cemblayer, epoch, step)
    except Exception as e:
        reason = (str(e).strip().splitlines() or [""])[0][:300]
        if not isinstance(e, AgreedFailure):
            reason = f"{type(e).__name__}: {reason}"
        log.record(event="fid_error", epoch=epoch, step=step, error=reason)
        log.line(f"epoch {epoch}: evaluation failed ({reason}); training goes on")
        return
    log.record(**record)
    log.line(f"epoch {epoch}: {record['metric']} {record['value']:.4f}" +
             (f", class accuracy {record['class_accuracy']:.4f}" if "class_accuracy" in record else ""))
