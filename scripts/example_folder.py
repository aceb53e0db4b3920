"""Write a small image folder as users bring one, offline: FOLDER/CLASS/IMAGE.png, 3 classes x 24 images of 32 x 48
pixels (wider than tall), each a scikit-learn digit (0, 1 or 2) enlarged to 32 x 32 in the middle of a noisy
background, so that a centre crop keeps the digit and a squash distorts it (docs/usage.md, Own data).

    python scripts/example_folder.py results/own/folder
"""
import os
import sys

import numpy as np
from PIL import Image
from sklearn.datasets import load_digits


def main(folder: str, per_class: int = 24) -> None:
    """Write the folder; refuses to write into one that exists."""
    if os.path.exists(folder):
        sys.exit(f"example_folder.py: error: {folder} already exists")
    digits = load_digits()
    rng = np.random.default_rng(0)
    for name, digit in (("zero", 0), ("one", 1), ("two", 2)):
        os.makedirs(os.path.join(folder, name))
        for i, image in enumerate(digits.images[digits.target == digit][:per_class]):
            canvas = rng.integers(0, 80, (32, 48, 3), dtype=np.uint8)
            canvas[:, 8:40] = np.kron(image * (255 / 16), np.ones((4, 4)))[:, :, None].astype(np.uint8)
            Image.fromarray(canvas).save(os.path.join(folder, name, f"{i:03d}.png"))
    print(f"{3 * per_class} images in 3 class folders -> {folder}")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python scripts/example_folder.py FOLDER")
    main(sys.argv[1])
