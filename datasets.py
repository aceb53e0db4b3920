"""Datasets decoded once into uint8 tensors (image folders cached by what they hold), and the one uint8 <-> [-1, 1]
conversion; batches.py cuts them into each rank's batches.

Names: cifar10, stl10, tiny-imagenet, imagefolder (any folder of class folders), digits (scikit-learn's bundled 8x8
digits, one channel, works offline), fashion_mnist (28x28, one channel, offline from Debian's package: fashion_mnist.py)
and synthetic (random images for timing train.py; nothing to learn). Splits: `train`, `test`, and `all`, which is
what the diffusion model trains on (stl10: labelled train + test merged as in the original; digits: all 1797 images;
cifar10 and fashion_mnist: the training split).
"""
import functools
import hashlib
import json
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch
import torchvision
from PIL import Image
from torchvision.datasets.folder import IMG_EXTENSIONS, make_dataset
from torchvision.transforms.functional import center_crop, resize

import fashion_mnist
from cli import DatasetError

DATASETS = ("cifar10", "stl10", "tiny-imagenet", "imagefolder", "digits", "fashion_mnist", "synthetic")


@dataclass
class ImageData:
    """images [N, C, H, W] uint8, labels [N] int64, the class names in label order, and where they came from."""
    images: torch.Tensor
    labels: torch.Tensor
    classes: list[str]
    source: str = ""  # the dataset's name, or an image folder's absolute path

    @property
    def channels(self) -> int:
        return self.images.shape[1]

    @property
    def size(self) -> int:
        return self.images.shape[-1]


def to_float(u8: torch.Tensor) -> torch.Tensor:
    """uint8 [0, 255] -> float [-1, 1]."""
    return u8.float() / 127.5 - 1


def quantise(unit: torch.Tensor) -> torch.Tensor:
    """float [0, 1] -> uint8, floor(x * 255 + 0.5) clamped: the one quantisation of samples."""
    return torch.floor(unit * 255 + 0.5).clamp(0, 255).to(torch.uint8)


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """float [-1, 1] -> uint8, u8 = floor((x + 1) / 2 * 255 + 0.5) clamped."""
    return quantise((x.float() + 1) / 2)


CIFAR10_MEAN, CIFAR10_STD = (0.4914, 0.4822, 0.4465), (0.2471, 0.2435, 0.2616)  # the original's STL10 normalisation


@functools.lru_cache
def _per_channel(values: tuple[float, ...], device: torch.device) -> torch.Tensor:
    """A [1, C, 1, 1] constant, copied to the device once rather than at every training step."""
    with torch.inference_mode(False):  # usable by training even when sampling asked first
        return torch.tensor(values, device=device).view(1, -1, 1, 1)


@dataclass(frozen=True)
class Pixels:
    """How uint8 images become the diffusion model's floats and its samples (clamped to [-1, 1]) uint8 again: by
    default [-1, 1] both ways; `--compat` can restore the original's STL10 normalisation and min-max stretch."""
    mean: tuple[float, ...] | None = None  # with std: (u8 / 255 - mean) / std, mapped back and clamped to [0, 1]
    std: tuple[float, ...] | None = None
    stretch: bool = False  # each image to its own [min, max], as torchvision's save_image(normalize=True) did

    def _stats(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        channels = like.shape[1]  # the original's constants are per RGB channel
        return _per_channel(self.mean[:channels], like.device), _per_channel(self.std[:channels], like.device)

    def encode(self, u8: torch.Tensor) -> torch.Tensor:
        """uint8 [B, C, H, W] -> the floats the model trains on."""
        if self.mean is None:
            return to_float(u8)
        mean, std = self._stats(u8)
        return (u8.float() / 255 - mean) / std

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        """Samples [B, C, H, W] -> uint8."""
        x = x.float()
        if self.mean is None and not self.stretch:
            return to_uint8(x)
        if self.mean is not None:
            mean, std = self._stats(x)
            x = (x * std + mean).clamp(0, 1)
        if not self.stretch:
            return quantise(x)
        low, high = x.amin(dim=(1, 2, 3), keepdim=True), x.amax(dim=(1, 2, 3), keepdim=True)
        return quantise((x - low) / (high - low).clamp(min=1e-5))


def resize_uint8(images: torch.Tensor, size: int) -> torch.Tensor:
    """Square-resize a uint8 batch with antialiased bilinear filtering; a no-op at the native size."""
    native = size <= 0 or images.shape[-1] == size and images.shape[-2] == size
    return images if native else resize(images, [size, size], antialias=True)


def fit_square(image: torch.Tensor, size: int, crop: bool = True) -> torch.Tensor:
    """One uint8 image [C, H, W] made size x size: its short side resized to `size` and the centre cropped, as ADM,
    DiT and EDM prepare ImageNet, or with crop False squashed whole (size <= 0: the short side, or with crop False
    the width). A square image comes out of both the same."""
    if not crop:
        return resize_uint8(image[None], size if size > 0 else image.shape[-1])[0]
    size = size if size > 0 else min(image.shape[-2:])
    if min(image.shape[-2:]) != size:
        image = resize(image, size, antialias=True)
    return center_crop(image, [size, size])


def save_png(image_u8: torch.Tensor, path: str) -> None:
    """Write one uint8 image [C, H, W] (C = 1 or 3) losslessly as PNG."""
    array = image_u8.cpu().permute(1, 2, 0).numpy()
    Image.fromarray(array[:, :, 0] if array.shape[2] == 1 else array).save(path)


def read_png(path: str) -> torch.Tensor:
    """One PNG as uint8 [C, H, W], keeping its channel count (1 for grayscale)."""
    with Image.open(path) as img:
        array = np.array(img)
    return torch.from_numpy(array[:, :, None] if array.ndim == 2 else array).permute(2, 0, 1).contiguous()


def save_grid(images_u8: torch.Tensor, nrow: int, path: str) -> None:
    """Write a uint8 batch as one PNG grid, `nrow` images per row."""
    save_png(torchvision.utils.make_grid(images_u8.cpu(), nrow=nrow, padding=2, pad_value=0), path)


def _digits(split: str) -> ImageData:
    from sklearn.datasets import load_digits
    d = load_digits()
    images = torch.from_numpy(np.round(d.images * (255 / 16))).to(torch.uint8)[:, None]
    data = ImageData(images, torch.from_numpy(d.target).long(), [str(i) for i in range(10)])
    return held_out_split(data, split, every=5)  # 20% held out


def held_out_split(data: ImageData, split: str, every: int) -> ImageData:
    """A fixed split of a dataset that has none: every `every`-th image of each class (in file order) is `test`."""
    rank_in_class = torch.zeros_like(data.labels)
    for c in range(len(data.classes)):
        members = (data.labels == c).nonzero()[:, 0]
        rank_in_class[members] = torch.arange(len(members))
    held_out = rank_in_class % every == 0
    keep = {"train": ~held_out, "test": held_out, "all": torch.ones_like(held_out)}[split]
    return ImageData(data.images[keep], data.labels[keep], data.classes, data.source)


def folder_cache(folder: str) -> str:
    """Where the project keeps what it derives from an image folder (decoded tensors, FID statistics): never inside
    the folder, whose sub-folders are its classes. $PROTODIFFUSION_CACHE, else ~/.cache/protodiffusion."""
    root = os.environ.get("PROTODIFFUSION_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "protodiffusion")
    return os.path.join(root, "imagefolder_" + hashlib.sha1(os.path.abspath(folder).encode()).hexdigest()[:12])


def folder_contents(folder: str) -> tuple[list[str], list[tuple[str, int]], list[list]]:
    """(classes, (path, label) per image, [relative path, bytes, mtime in ns] per image) of a folder of class folders,
    as torchvision's ImageFolder reads it; refuses a folder with no class, one class, or a class with no images."""
    where = os.path.abspath(folder)
    if not os.path.isdir(folder):
        raise DatasetError(f"image folder {where} does not exist; it must hold one sub-folder of images per class")
    classes = sorted(entry.name for entry in os.scandir(folder) if entry.is_dir())
    if not classes:
        raise DatasetError(f"image folder {where} holds no class folders; put each class's images in a sub-folder "
                           f"of its own ({where}/CLASS/IMAGE)")
    samples = make_dataset(folder, {c: i for i, c in enumerate(classes)}, IMG_EXTENSIONS, allow_empty=True)
    counts = np.bincount([label for _, label in samples], minlength=len(classes))
    if (counts == 0).any():
        empty = ", ".join(c for c, n in zip(classes, counts) if n == 0)
        raise DatasetError(f"class folder(s) {empty} of {where} hold no images (readable extensions: "
                           f"{' '.join(IMG_EXTENSIONS)}); add images or remove the folder")
    if len(classes) == 1:
        raise DatasetError(f"image folder {where} holds one class folder ({classes[0]}); class-conditional training "
                           "needs at least two")
    listing = []
    for path, _ in samples:
        stat = os.stat(path)
        listing.append([os.path.relpath(path, folder), stat.st_size, stat.st_mtime_ns])
    return classes, samples, listing


def folder_key(folder: str) -> str:
    """A digest of what an image folder holds (every image's path, size and modification time)."""
    return hashlib.sha1(json.dumps(folder_contents(folder)[2]).encode()).hexdigest()[:12]


def _changes(old: list[list] | None, new: list[list]) -> str:
    """What differs between two folder listings, in words."""
    if old is None:
        return "the cache does not record what the folder held"
    before, after = {row[0]: row[1:] for row in old}, {row[0]: row[1:] for row in new}
    added, removed = len(after.keys() - before.keys()), len(before.keys() - after.keys())
    changed = sum(before[p] != after[p] for p in after.keys() & before.keys())
    return f"{added} image(s) added, {removed} removed, {changed} changed"


def _decode(path: str) -> torch.Tensor:
    with Image.open(path) as img:
        return torch.from_numpy(np.array(img.convert("RGB"))).permute(2, 0, 1).contiguous()


def _decode_all(paths: list[str], size: int, crop: bool, workers: int, where: str) -> list[torch.Tensor]:
    """Every image at size x size; one line naming the first file that cannot be read, and how many cannot."""
    def load(path: str) -> torch.Tensor | str:
        try:
            return fit_square(_decode(path), size, crop)
        except (OSError, ValueError, Image.DecompressionBombError) as e:  # truncated, not an image, too large
            return f"{os.path.abspath(path)} ({e})"

    with ThreadPoolExecutor(max(1, workers)) as pool:
        images = list(pool.map(load, paths))
    bad = [i for i in images if isinstance(i, str)]
    if bad:
        raise DatasetError(f"{len(bad)} of the {len(images)} images in {where} cannot be read, the first: {bad[0]}; "
                           "repair or remove them")
    if len({tuple(i.shape) for i in images}) > 1:
        raise DatasetError(f"images in {where} differ in size; pass --image_size to resize them")
    return images


def _image_folder(folder: str, size: int, workers: int, cache_dir: str, crop: bool = True) -> ImageData:
    """Decode a folder of class folders once (each image fit_square) and cache the uint8 tensor on disk, with the
    folder's listing: an image or class added, removed or changed since then decodes the folder again."""
    where = os.path.abspath(folder)
    classes, samples, listing = folder_contents(folder)
    key = hashlib.sha1(f"{where}:{size}:{'crop' if crop else 'squash'}".encode()).hexdigest()[:12]
    cache = os.path.join(cache_dir, f"imagefolder_{key}.pt")
    if os.path.exists(cache):
        blob = torch.load(cache, weights_only=True)
        if blob.get("listing") == listing and blob["classes"] == classes:
            return ImageData(blob["images"], blob["labels"], blob["classes"], where)
        print(f"{where} changed since {cache} was made ({_changes(blob.get('listing'), listing)}); decoding it "
              "again", flush=True)
    images = _decode_all([p for p, _ in samples], size, crop, workers, where)
    data = ImageData(torch.stack(images), torch.tensor([label for _, label in samples]), classes, where)
    try:
        os.makedirs(cache_dir, exist_ok=True)
        tmp = f"{cache}.{os.getpid()}.tmp"
        torch.save({"images": data.images, "labels": data.labels, "classes": data.classes, "listing": listing}, tmp)
        os.replace(tmp, cache)
    except OSError:
        pass  # a read-only cache folder only costs decoding again next time
    return data


def _synthetic(size: int) -> ImageData:
    """50,000 uniform random RGB images (CIFAR10's count) in 10 classes, at `size` (native 32), from a fixed seed."""
    size, g = size if size > 0 else 32, torch.Generator().manual_seed(0)
    images = torch.randint(256, (50_000, 3, size, size), generator=g, dtype=torch.uint8)
    return ImageData(images, torch.arange(50_000) % 10, [str(i) for i in range(10)])


def _torchvision(cls, root: str, download: bool, how: str, **kwargs) -> torchvision.datasets.VisionDataset:
    try:
        return cls(root=root, download=download, **kwargs)
    except (RuntimeError, OSError) as e:
        reason = "the download failed" if download else "--download is off"
        raise DatasetError(f"{cls.__name__} not found in {os.path.abspath(root)} and {reason} ({e}); {how}") from None


def _cifar10(root: str, split: str, download: bool) -> ImageData:
    ds = _torchvision(torchvision.datasets.CIFAR10, os.path.join(root, "cifar10"), download, "put the extracted "
                      "cifar-10-batches-py folder there, or run once with internet access", train=split != "test")
    return ImageData(torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous(), torch.tensor(ds.targets), ds.classes)


def _stl10(root: str, split: str, download: bool) -> ImageData:
    how = "put the extracted stl10_binary folder there, or run once with internet access"
    parts = {"train": ["train"], "test": ["test"], "all": ["train", "test"]}[split]
    sets = [_torchvision(torchvision.datasets.STL10, os.path.join(root, "stl10"), download, how, split=s) for s in parts]
    return ImageData(torch.from_numpy(np.concatenate([s.data for s in sets])),
                     torch.from_numpy(np.concatenate([s.labels for s in sets])).long(), sets[0].classes)


def _tiny_folders(path: str) -> tuple[str, str]:
    """(train folder, dataset root) from --tiny_imagenet_path: the root holding train/ (and val/), or, as the
    original code took it, the train folder of class folders itself (its parent then holds val/)."""
    if os.path.isdir(os.path.join(path, "train")):
        return os.path.join(path, "train"), path
    if os.path.isdir(path) and any(entry.is_dir() for entry in os.scandir(path)):
        return path, os.path.dirname(os.path.abspath(path))
    raise DatasetError(f"tiny-imagenet not found: looked for {os.path.abspath(path)}/train/ (the unzipped "
                       f"tiny-imagenet-200 folder) and for class folders in {os.path.abspath(path)} (its train/ "
                       "folder, as the original code took it); download http://cs231n.stanford.edu/tiny-imagenet-200.zip "
                       "and unzip it there (or pass --tiny_imagenet_path)")


def _tiny_val(train_dir: str, folder: str, size: int, workers: int, crop: bool) -> ImageData:
    """Tiny ImageNet's val/ split: images/ plus val_annotations.txt (file, wnid, box)."""
    classes = folder_contents(train_dir)[0]
    ann = os.path.join(folder, "val", "val_annotations.txt")
    if not os.path.exists(ann):
        raise DatasetError(f"{ann} not found; tiny-imagenet's test split is val/ with its val_annotations.txt")
    rows = [line.split("\t")[:2] for line in open(ann) if line.strip()]
    images = _decode_all([os.path.join(folder, "val", "images", r[0]) for r in rows], size, crop, workers, ann)
    index = {c: i for i, c in enumerate(classes)}
    labels = torch.tensor([index[w] for _, w in rows])
    return ImageData(torch.stack(images), labels, classes, os.path.abspath(folder))


def load_dataset(name: str, split: str = "all", data_root: str = "datasets", image_size: int = -1,
                 download: bool = True, tiny_imagenet_path: str | None = None, workers: int = 4,
                 crop: bool = True) -> ImageData:
    """Load a dataset split as one uint8 tensor, resized to image_size (-1 keeps the native size); image folders'
    images are fit_square (crop False: squashed)."""
    if name not in DATASETS:
        raise DatasetError(f"unknown dataset '{name}' (choose from {', '.join(DATASETS)})")
    if split not in ("train", "test", "all"):
        raise ValueError(f"unknown split '{split}'")
    cache_dir = os.path.join(data_root, "cache")
    if name == "digits":
        data = _digits(split)
    elif name == "synthetic":
        data = _synthetic(image_size)
    elif name == "cifar10":
        data = _cifar10(data_root, split, download)
    elif name == "fashion_mnist":
        data = ImageData(*fashion_mnist.load(data_root, "test" if split == "test" else "train", download))
    elif name == "stl10":
        data = _stl10(data_root, split, download)
    elif name == "tiny-imagenet":
        train_dir, folder = _tiny_folders(tiny_imagenet_path or os.path.join(data_root, "tiny-imagenet-200"))
        if split == "test":
            return _tiny_val(train_dir, folder, image_size, workers, crop)
        data = _image_folder(train_dir, image_size, workers, cache_dir, crop)
    else:  # a tenth of each class held out, for train_classifier.py's test split
        data = held_out_split(_image_folder(data_root, image_size, workers, folder_cache(data_root), crop), split,
                              every=10)
    data.images = resize_uint8(data.images, image_size)
    data.source = data.source or name
    return data


def class_grid_labels(num_classes: int, per_class: int) -> torch.Tensor:
    """Labels 0,0,..,1,1,.. so that a grid with `per_class` images per row shows one class per row."""
    return torch.arange(num_classes).repeat_interleave(per_class)


