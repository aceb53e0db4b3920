"""Fashion-MNIST (Xiao, Rasul and Vollgraf 2017, arXiv 1708.07747): 60,000 training and 10,000 test images, 28x28
grayscale, 10 classes, read from its four IDX files and checked as they are decoded.

Where the files are looked for, in order: DATA_ROOT/fashion_mnist/ (the four files side by side, .gz or not, as
Debian's package and the dataset's own repository hold them, or torchvision's FashionMNIST/raw/ beneath it), then
Debian's `dataset-fashion-mnist` package (/usr/share/datasets/fashion-mnist/), then torchvision's download into
DATA_ROOT/fashion_mnist/ when online. Debian recompresses the .gz files, so their digests differ from upstream's;
what is checked is the decoded content (magic numbers, sizes, counts, labels).
"""
import gzip
import os
import zlib

import numpy as np
import torch
import torchvision

from cli import DatasetError

CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
SYSTEM_FOLDER = "/usr/share/datasets/fashion-mnist"  # apt-get install dataset-fashion-mnist
FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
         "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}
IMAGES_MAGIC, LABELS_MAGIC = 0x00000803, 0x00000801  # unsigned bytes in 3 dimensions, in 1 (LeCun's IDX format)


def read_idx(path: str, magic: int) -> np.ndarray:
    """One IDX file (gzipped or not) as a uint8 array of the shape its header gives; a file that is truncated,
    corrupt, of another type or of the wrong length is one DatasetError naming it."""
    try:
        with (gzip.open if path.endswith(".gz") else open)(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError, zlib.error) as e:  # gzip's BadGzipFile is an OSError; a cut-off stream an EOFError
        raise DatasetError(f"{path} cannot be read ({e}); replace it (apt-get install --reinstall "
                           "dataset-fashion-mnist, or download it again)") from None
    ndim = magic & 0xFF
    if len(data) < 4 + 4 * ndim or int.from_bytes(data[:4], "big") != magic:
        found = data[:4].hex() if len(data) >= 4 else f"{len(data)} bytes"
        raise DatasetError(f"{path} is not an IDX file of unsigned bytes in {ndim} dimension(s) (magic "
                           f"{found}, expected {magic:08x})")
    shape = [int.from_bytes(data[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim)]
    body = data[4 + 4 * ndim:]
    if len(body) != int(np.prod(shape)):
        raise DatasetError(f"{path} holds {len(body)} bytes of data where its header ({' x '.join(map(str, shape))}) "
                           f"promises {int(np.prod(shape))}: the file is truncated or corrupt")
    return np.frombuffer(body, dtype=np.uint8).reshape(shape)


def _file_in(folder: str, name: str) -> str | None:
    for path in (os.path.join(folder, name + ".gz"), os.path.join(folder, name)):
        if os.path.isfile(path):
            return path
    return None


def find_folder(root: str) -> str | None:
    """The first folder that holds all four files; a folder that holds only some of them is an error naming the
    missing ones (rather than another copy read without a word)."""
    for folder in (root, os.path.join(root, "FashionMNIST", "raw"), SYSTEM_FOLDER):
        names = [n for pair in FILES.values() for n in pair]
        present = [n for n in names if _file_in(folder, n)]
        if len(present) == len(names):
            return folder
        if present:
            missing = ", ".join(n + ".gz" for n in names if n not in present)
            raise DatasetError(f"{os.path.abspath(folder)} holds part of Fashion-MNIST: {missing} missing")
    return None


def load(data_root: str, split: str, download: bool) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """(images [N, 1, 28, 28] uint8, labels [N] int64, class names) of the train or test split."""
    root = os.path.join(data_root, "fashion_mnist")
    folder = find_folder(root)
    if folder is None and download:
        try:
            torchvision.datasets.FashionMNIST(root=root, train=split == "train", download=True)
        except (RuntimeError, OSError) as e:
            reason = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
            raise DatasetError(f"Fashion-MNIST is not in {os.path.abspath(root)}/ nor in {SYSTEM_FOLDER}/, and the "
                               f"download failed ({reason}); install Debian's package (apt-get install "
                               "dataset-fashion-mnist) or put its four IDX .gz files in "
                               f"{os.path.abspath(root)}/") from None
        folder = find_folder(root)
    if folder is None:
        raise DatasetError(f"Fashion-MNIST is not in {os.path.abspath(root)}/ nor in {SYSTEM_FOLDER}/ and --download "
                           "is off; install Debian's package (apt-get install dataset-fashion-mnist) or put its "
                           f"four IDX .gz files in {os.path.abspath(root)}/")
    image_file, label_file = (_file_in(folder, n) for n in FILES[split])
    images, labels = read_idx(image_file, IMAGES_MAGIC), read_idx(label_file, LABELS_MAGIC)
    if len(images) != len(labels):
        raise DatasetError(f"{image_file} holds {len(images)} images but {label_file} {len(labels)} labels")
    if labels.size and labels.max() >= len(CLASSES):
        raise DatasetError(f"{label_file} holds label {labels.max()}; Fashion-MNIST's are 0-{len(CLASSES) - 1}")
    return torch.from_numpy(images.copy())[:, None], torch.from_numpy(labels.astype(np.int64)), list(CLASSES)
