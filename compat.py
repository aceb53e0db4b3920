"""`--compat`: the original code's behaviours that this repo changed on purpose, restored to run what the authors ran.

The flag is resolved here, once, into a `Compat`; each behaviour is read where it lives: the class table
(`embedding.ConditionalEmbedding`'s padding_idx), the LR schedule (`lr_schedule.make_lr_schedule`), the weights grids and
FID use, and the conversions between uint8 images and the model's floats (`datasets.Pixels`).
"""
from dataclasses import dataclass

from datasets import CIFAR10_MEAN, CIFAR10_STD, Pixels
from cli import Rule

BEHAVIOURS = {  # name -> what restoring it does
    "padding_idx": "class 0's table row at zero with no gradient (nn.Embedding padding_idx=0)",
    "lr_schedule": "warm-up to lr x multiplier, then back to lr and a cosine over all epochs from there",
    "raw_weights": "grids and FID from the raw weights (the original had no EMA)",
    "png_stretch": "every sample stretched to its own min-max range when turned into uint8 (PNGs, grids, FID)",
    "stl10_norm": "STL10 normalised with CIFAR10's mean and std, samples mapped back and clamped to [0, 1]",
}
NOT_RESTORED = ("the original's RNG streams (noise, timesteps, label drops, data order), its 3-channel sampling of "
                "one-channel data and its crash below 20 epochs (the warm-up then lasts one epoch)")


def parse_compat(spec: str) -> tuple[str, ...]:
    """The behaviours --compat names, in BEHAVIOURS' order: none, original (all) or a comma list; ValueError else."""
    names = {p.strip() for p in str(spec).split(",") if p.strip()}
    if names == {"none"}:
        return ()
    if names == {"original"}:
        return tuple(BEHAVIOURS)
    if not names or not names <= set(BEHAVIOURS):
        raise ValueError(spec)
    return tuple(b for b in BEHAVIOURS if b in names)


def _compat_ok(spec: str) -> bool:
    try:
        parse_compat(spec)
        return True
    except ValueError:
        return False


COMPAT = Rule(_compat_ok, f"none, original, or a comma list of {', '.join(BEHAVIOURS)}", "padding")


@dataclass(frozen=True)
class Compat:
    """The original's behaviours a run restores; stl10_norm only counts for STL10."""
    restored: tuple[str, ...] = ()

    @classmethod
    def of(cls, spec: str | None, dataset: str | None) -> "Compat":
        """The Compat of a --compat value (None: none) for a run on `dataset`."""
        names = parse_compat(spec or "none")
        return cls(tuple(b for b in names if b != "stl10_norm" or dataset == "stl10"))

    @property
    def padding_idx(self) -> int | None:
        """The class table's padding_idx: 0 as in the original, or None (class 0 learns like the others)."""
        return 0 if "padding_idx" in self.restored else None

    @property
    def original_lr(self) -> bool:
        return "lr_schedule" in self.restored

    @property
    def weights(self) -> str:
        """The weights grids and FID use during training and, by default, in sample.py."""
        return "raw" if "raw_weights" in self.restored else "ema"

    @property
    def pixels(self) -> Pixels:
        """uint8 images <-> the model's floats."""
        stl = "stl10_norm" in self.restored
        return Pixels(CIFAR10_MEAN if stl else None, CIFAR10_STD if stl else None, "png_stretch" in self.restored)

    def describe(self, spec: str) -> str | None:
        """The log line saying what --compat changed (None when it changed nothing)."""
        if not self.restored:
            skipped = " (stl10_norm applies to STL10 only)" if parse_compat(spec or "none") else ""
            return f"--compat {spec}: nothing restored{skipped}" if skipped else None
        return (f"--compat {spec}: restored the original's " + "; ".join(f"{b}: {BEHAVIOURS[b]}" for b in self.restored)
                + f". Not restored: {NOT_RESTORED}")
