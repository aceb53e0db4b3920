"""Fashion-MNIST from its IDX files: the real files (Debian's dataset-fashion-mnist, which scripts/test.sh installs)
decoded as torchvision's own reader decodes them, and every damaged or missing file one error line naming it,
with small IDX files the tests write."""
import gzip
import os
import re

import numpy as np
import pytest
import torch

from conftest import run_program

import fashion_mnist
from datasets import DatasetError, load_dataset

REAL = os.path.isdir(fashion_mnist.SYSTEM_FOLDER)
NAMES = [n for pair in fashion_mnist.FILES.values() for n in pair]


def idx_bytes(array: np.ndarray) -> bytes:
    """An IDX file of unsigned bytes: magic 0x0000 08 NDIM, the sizes as big-endian int32, the data."""
    header = bytes([0, 0, 8, array.ndim]) + b"".join(int(n).to_bytes(4, "big") for n in array.shape)
    return header + array.astype(np.uint8).tobytes()


def write_set(folder, train=12, test=6, size=4, gz=True) -> dict:
    """A small Fashion-MNIST look-alike: image i of a split all grey level i, labels i % 10."""
    os.makedirs(folder, exist_ok=True)
    arrays = {}
    for split, n in (("train", train), ("test", test)):
        images = np.repeat(np.arange(n, dtype=np.uint8), size * size).reshape(n, size, size)
        image_name, label_name = fashion_mnist.FILES[split]
        arrays[image_name], arrays[label_name] = images, np.arange(n, dtype=np.uint8) % 10
    for name, array in arrays.items():
        data = idx_bytes(array)
        with (gzip.open(folder / f"{name}.gz", "wb") if gz else open(folder / name, "wb")) as f:
            f.write(data)
    return arrays


@pytest.fixture
def no_system_copy(monkeypatch, tmp_path):
    monkeypatch.setattr(fashion_mnist, "SYSTEM_FOLDER", str(tmp_path / "no-package"))


@pytest.mark.skipif(not REAL and not os.environ.get("PROTODIFFUSION_REQUIRE_FASHION_MNIST"),
                    reason="apt-get install dataset-fashion-mnist (scripts/test.sh does, as root)")
def test_the_real_files_decode_as_torchvision_reads_them(tmp_path):
    from torchvision.datasets.mnist import read_image_file, read_label_file
    train, test = load_dataset("fashion_mnist", "all", str(tmp_path)), load_dataset("fashion_mnist", "test",
                                                                                     str(tmp_path))
    assert train.images.shape == (60_000, 1, 28, 28) and test.images.shape == (10_000, 1, 28, 28)
    assert train.images.dtype == torch.uint8 and train.classes[0] == "T-shirt/top" and len(train.classes) == 10
    assert train.labels.bincount().tolist() == [6000] * 10 and test.labels.bincount().tolist() == [1000] * 10
    for split, data in (("train", train), ("test", test)):
        raw = {}
        for name in fashion_mnist.FILES[split]:  # torchvision's reader takes the unzipped files
            with gzip.open(os.path.join(fashion_mnist.SYSTEM_FOLDER, name + ".gz")) as f:
                (tmp_path / name).write_bytes(f.read())
            raw[name] = str(tmp_path / name)
        image_name, label_name = fashion_mnist.FILES[split]
        assert torch.equal(data.images[:, 0], read_image_file(raw[image_name]))
        assert torch.equal(data.labels, read_label_file(raw[label_name]).long())
    assert test.labels[:5].tolist() == [9, 2, 1, 1, 6]  # ankle boot, pullover, trouser, trouser, shirt
    assert load_dataset("fashion_mnist", "train", str(tmp_path), image_size=16).images.shape == (60_000, 1, 16, 16)


@pytest.mark.parametrize("layout", ["gz", "raw", "torchvision"])
def test_data_root_comes_before_the_package_in_every_layout(tmp_path, layout):
    folder = tmp_path / "fashion_mnist" / ("FashionMNIST/raw" if layout == "torchvision" else "")
    arrays = write_set(folder, gz=layout != "raw")
    train = load_dataset("fashion_mnist", "all", str(tmp_path), download=False)
    test = load_dataset("fashion_mnist", "test", str(tmp_path), download=False)
    assert train.images.shape == (12, 1, 4, 4) and test.images.shape == (6, 1, 4, 4)
    assert torch.equal(train.images[:, 0], torch.from_numpy(arrays["train-images-idx3-ubyte"]))
    assert test.labels.tolist() == [0, 1, 2, 3, 4, 5]


def damage(name: str, how):
    def make(folder):
        write_set(folder)
        path = folder / f"{name}.gz"
        data = gzip.open(path).read()
        path.write_bytes(how(data, path.read_bytes()))
    return make


def relabel(folder, labels):
    write_set(folder)
    with gzip.open(folder / "train-labels-idx1-ubyte.gz", "wb") as f:
        f.write(idx_bytes(np.array(labels)))


CASES = {  # name -> (what the test does to a good set, the error line's words)
    "truncated gzip": (damage("train-images-idx3-ubyte", lambda raw, gz: gz[:len(gz) // 2]),
                       r"{F}/train-images-idx3-ubyte\.gz cannot be read \(.*\); replace it"),
    "not gzip": (damage("train-labels-idx1-ubyte", lambda raw, gz: b"plain text, not gzip"),
                 r"{F}/train-labels-idx1-ubyte\.gz cannot be read"),
    "wrong magic": (damage("train-images-idx3-ubyte", lambda raw, gz: gzip.compress(b"\0\0\x08\x01" + raw[4:])),
                    r"{F}/train-images-idx3-ubyte\.gz is not an IDX file of unsigned bytes in 3 dimension\(s\) "
                    r"\(magic 00000801, expected 00000803\)"),
    "short data": (damage("train-images-idx3-ubyte", lambda raw, gz: gzip.compress(raw[:-5])),
                   r"{F}/train-images-idx3-ubyte\.gz holds 187 bytes of data where its header \(12 x 4 x 4\) "
                   r"promises 192"),
    "counts disagree": (lambda folder: relabel(folder, np.arange(11) % 10),
                        r"{F}/train-images-idx3-ubyte\.gz holds 12 images but {F}/train-labels-idx1-ubyte\.gz 11 "
                        r"labels"),
    "label out of range": (lambda folder: relabel(folder, [3] * 11 + [10]),
                           r"{F}/train-labels-idx1-ubyte\.gz holds label 10; Fashion-MNIST's are 0-9"),
    "a file missing": (lambda folder: (write_set(folder), os.remove(folder / "t10k-labels-idx1-ubyte.gz")),
                       r"{F} holds part of Fashion-MNIST: t10k-labels-idx1-ubyte\.gz missing"),
    "nowhere, no download": (lambda folder: None,
                             r"Fashion-MNIST is not in {F}/ nor in .*/no-package/ and --download is off; install "
                             r"Debian's package \(apt-get install dataset-fashion-mnist\) or put its four IDX \.gz "
                             r"files in {F}/"),
}


@pytest.mark.parametrize("case", CASES)
def test_damaged_or_missing_files_are_one_line_naming_the_file(tmp_path, tiny_args, no_system_copy, case):
    make, words = CASES[case]
    folder = tmp_path / "fashion_mnist"
    make(folder)
    words = words.replace("{F}", re.escape(str(folder)))
    data = ["--dataset", "fashion_mnist", "--data_root", str(tmp_path), "--download", "False"]
    tiny = [a for a in tiny_args[2:] if a not in ("--batchsize", "64")] + ["--batchsize", "4", "--max_steps", "1"]
    for program, flags, out in (("train.py", data + tiny + ["--run_dir", str(tmp_path / "run")], tmp_path / "run"),
                                ("train_classifier.py", data + ["--pretrained", "False", "--out",
                                                                str(tmp_path / "c.pt")], tmp_path / "c.pt")):
        r = run_program(program, flags)
        assert r.returncode == 2 and len(r.stderr.splitlines()) == 1, r.stderr
        assert re.search(f"^{program}: error: {words}", r.stderr), r.stderr
        assert not out.exists()


def test_a_failed_download_is_one_line_with_both_ways_to_get_the_data(tmp_path, no_system_copy, monkeypatch):
    import torchvision

    def offline(*args, **kwargs):
        raise RuntimeError("Error downloading train-images-idx3-ubyte.gz:\nTried http://fashion-mnist..., got:\n"
                           "<urlopen error [Errno -3] Temporary failure in name resolution>")

    monkeypatch.setattr(torchvision.datasets, "FashionMNIST", offline)
    with pytest.raises(DatasetError, match=r"the download failed \(<urlopen error .*\); install Debian's package "
                                           r"\(apt-get install dataset-fashion-mnist\) or put its four IDX"):
        load_dataset("fashion_mnist", "all", str(tmp_path), download=True)


def test_a_small_set_trains_a_one_channel_model(tmp_path, tiny_args, no_system_copy):
    write_set(tmp_path / "fashion_mnist", train=40, size=8)
    data = ["--dataset", "fashion_mnist", "--data_root", str(tmp_path), "--download", "False"]
    tiny = [a for a in tiny_args[2:] if a not in ("--batchsize", "64")] + ["--batchsize", "8", "--epoch", "1"]
    r = run_program("train.py", data + tiny + ["--run_dir", str(tmp_path / "run")])
    assert r.returncode == 0, r.stderr
    config = (tmp_path / "run" / "config.json").read_text()
    assert '"dataset": "fashion_mnist"' in config and '"image_size": 8' in config and '"inch": 1' in config
