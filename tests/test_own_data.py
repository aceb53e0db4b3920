"""Own data (--dataset imagefolder) as users bring it: real image files in a temporary folder, nothing of PIL or
torchvision mocked: the cache follows the folder's contents, every mistake is one error line naming the folder or
the file, photos keep their shape, and the runs show up in TensorBoard."""
import json
import os
import re
import shlex

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import ROOT, run_program

import datasets
from datasets import fit_square, load_dataset, resize_uint8
from evaluate import reference_path


def write_folder(folder, classes=("cat", "dog", "owl"), per_class=4, size=(8, 8)):
    """per_class images of size (height, width) per class, image i of class c all one grey level 40 c + 5 i."""
    for c, name in enumerate(classes):
        os.makedirs(folder / name, exist_ok=True)
        for i in range(per_class):
            Image.new("RGB", size[::-1], (40 * c + 5 * i,) * 3).save(folder / name / f"{i}.png")
    return folder


def test_the_cache_follows_what_the_folder_holds(tmp_path, monkeypatch, capsys):
    folder = write_folder(tmp_path / "pets")
    load = lambda: load_dataset("imagefolder", data_root=str(folder), image_size=8)  # noqa: E731
    cfg = lambda data: {"dataset": "imagefolder", "image_size": 8, "crop": True}  # noqa: E731
    first = load()
    assert first.images.shape == (12, 3, 8, 8) and first.source == str(folder)
    stats = reference_path(cfg(first), "inception", str(folder), None)

    decode_all = datasets._decode_all
    monkeypatch.setattr(datasets, "_decode_all", lambda *a: pytest.fail("an unchanged folder was decoded again"))
    assert torch.equal(load().images, first.images) and "again" not in capsys.readouterr().out
    assert reference_path(cfg(first), "inception", str(folder), None) == stats
    monkeypatch.setattr(datasets, "_decode_all", decode_all)

    write_folder(folder, classes=("yak",))  # a class added: its 4 images, label 3, read
    added = load()
    assert added.classes == ["cat", "dog", "owl", "yak"] and added.labels.tolist()[-4:] == [3] * 4
    assert "(4 image(s) added, 0 removed, 0 changed); decoding it again" in capsys.readouterr().out
    assert reference_path(cfg(added), "inception", str(folder), None) != stats  # statistics of its own

    Image.new("RGB", (8, 8), (250, 250, 250)).save(folder / "dog" / "2.png")  # an image replaced
    replaced = load()
    assert replaced.images[6].unique().tolist() == [250]
    assert "0 image(s) added, 0 removed, 1 changed" in capsys.readouterr().out

    os.remove(folder / "cat" / "0.png")  # an image removed
    removed = load()
    assert len(removed.labels) == 15 and removed.images[0].unique().tolist() == [5]
    assert "0 image(s) added, 1 removed, 0 changed" in capsys.readouterr().out


def test_a_photo_keeps_its_centre_and_square_images_are_as_before(tmp_path):
    # 16 x 32 (height x width): the middle 24 columns 200, the 4 at each side 0. Short side to 8, centre 8 x 8 of
    # 8 x 16: columns 4..11, which come from 8..23 of the original, well inside the 200s, whatever the filter
    photo = np.zeros((16, 32, 3), np.uint8)
    photo[:, 4:28] = 200
    for name in ("a", "b"):
        (tmp_path / "wide" / name).mkdir(parents=True)
        Image.fromarray(photo).save(tmp_path / "wide" / name / "0.png")
    cropped = load_dataset("imagefolder", data_root=str(tmp_path / "wide"), image_size=8)
    assert cropped.images.shape == (2, 3, 8, 8) and cropped.images.unique().tolist() == [200]
    native = load_dataset("imagefolder", data_root=str(tmp_path / "wide"))  # the short side: 16 x 16
    assert native.images.shape == (2, 3, 16, 16) and native.images.unique().tolist() == [200]
    squashed = load_dataset("imagefolder", data_root=str(tmp_path / "wide"), image_size=8, crop=False)
    assert squashed.images.shape == (2, 3, 8, 8) and squashed.images[0, :, :, 0].max() < 200  # the black edges

    g = torch.Generator().manual_seed(0)
    for size in (4, 8, 12, 16):  # a square image: the square resize this code always made
        square = torch.randint(256, (3, 12, 12), generator=g, dtype=torch.uint8)
        assert torch.equal(fit_square(square, size), resize_uint8(square[None], size)[0])
        assert torch.equal(fit_square(square, size, crop=False), resize_uint8(square[None], size)[0])
    folder = write_folder(tmp_path / "square", size=(12, 12))
    assert torch.equal(load_dataset("imagefolder", data_root=str(folder), image_size=8).images,
                       load_dataset("imagefolder", data_root=str(folder), image_size=8, crop=False).images)


def damage(path):
    """Cut an image file to half its bytes, as an interrupted copy leaves it."""
    data = open(path, "rb").read()
    open(path, "wb").write(data[:len(data) // 2])


CASES = {  # (how the folder is made, the words the error line must hold)
    "too few for a batch": (lambda f: write_folder(f, per_class=8), r"the 24 training images of {F} are fewer than "
                            r"one global batch of 256 .* --batchsize 24"),
    "a damaged image": (lambda f: damage(write_folder(f) / "dog" / "1.png"),
                        r"1 of the 12 images in {F} cannot be read, the first: {F}/dog/1.png"),
    "an empty class": (lambda f: os.makedirs(write_folder(f) / "emu"), r"class folder\(s\) emu of {F} hold no images"),
    "one class": (lambda f: write_folder(f, classes=("cat",)), r"{F} holds one class folder \(cat\)"),
    "no class folders": (lambda f: (os.makedirs(f), Image.new("RGB", (8, 8)).save(f / "0.png")),
                         r"{F} holds no class folders"),
}


@pytest.mark.parametrize("case", CASES)
def test_own_data_mistakes_are_one_line_naming_the_folder_or_file(tmp_path, tiny_args, case):
    make, words = CASES[case]
    folder = tmp_path / "data"
    make(folder)
    words = words.replace("{F}", re.escape(str(folder)))
    data = ["--dataset", "imagefolder", "--data_root", str(folder)]
    tiny = [a for a in tiny_args[2:] if a not in ("--batchsize", "64")]  # train.py's default batch of 256
    classifier = data + ["--pretrained", "False", "--out", str(tmp_path / "c.pt")]
    for program, flags, out in (("train.py", data + tiny + ["--run_dir", str(tmp_path / "run")], tmp_path / "run"),
                                ("train_classifier.py", classifier, tmp_path / "c.pt")):
        r = run_program(program, flags)
        line = words.replace("256", "128").replace("24 training", "21 training").replace("--batchsize 24",
                                                                                         "--batchsize 21") \
            if program == "train_classifier.py" else words  # it trains on 9 of every 10 images, 128 at a time
        assert r.returncode == 2 and len(r.stderr.splitlines()) == 1, r.stderr
        assert re.search(f"^{program}: error: .*{line}", r.stderr), r.stderr
        assert not out.exists()


def docs_commands() -> list[list[str]]:
    """The bash block of docs/usage.md's own-data example, one command per line."""
    text = open(os.path.join(ROOT, "docs", "usage.md")).read()
    block = re.search(r"<!-- own-data example -->\n```bash\n(.*?)```", text, re.S).group(1)
    return [shlex.split(line, comments=True) for line in block.replace("\\\n", " ").splitlines() if line.strip()]


def test_the_documented_own_data_example_runs_and_shows_in_tensorboard(tmp_path, monkeypatch):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    monkeypatch.chdir(tmp_path)  # the commands write results/own/...
    shorter = {"train_classifier.py": ["--epoch", "2"], "train.py": ["--epoch", "4", "--interval", "2",
                                                                       "--sample_every", "2", "--log_every", "2"],
               "sample.py": ["--epoch", "4", "--genum", "30"]}  # the same commands, fewer epochs and images
    for words in docs_commands():
        assert words[0] == "python", words
        if words[1].endswith("example_folder.py"):
            import importlib.util
            spec = importlib.util.spec_from_file_location("example_folder", os.path.join(ROOT, words[1]))
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
            module.main(words[2])
            continue
        r = run_program(words[1], words[2:] + shorter[words[1]])
        assert r.returncode == 0, r.stderr[-2000:]
    run = tmp_path / "results" / "own" / "run"
    records = [json.loads(line) for line in open(run / "metrics.jsonl")]
    events = EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0, "images": 0}).Reload()
    loss = [(r["step"], r["loss"]) for r in records if r["event"] == "train"]
    assert [(e.step, pytest.approx(e.value)) for e in events.Scalars("train/loss")] == loss
    fid = [r for r in records if r["event"] == "fid"]
    assert len(fid) == 1 and fid[0]["metric"] == "proto-FID"
    tag = f"proto-FID/w{fid[0]['w']}"
    assert [(e.step, pytest.approx(e.value)) for e in events.Scalars(tag)] == [(fid[0]["step"], fid[0]["value"])]
    grids = events.Images("samples")
    assert [g.step for g in grids] == [r["step"] for r in records if r["event"] == "epoch" and r["epoch"] in (2, 4)]
    assert (grids[0].width, grids[0].height) == Image.open(run / "samples" / "grid_2.png").size

    damaged = tmp_path / "results" / "own" / "folder" / "one" / "001.png"
    damage(damaged)  # the folder changed: the reference statistics are made again, and meet the damaged file
    sample = next(w for w in docs_commands() if w[1] == "sample.py")
    r = run_program("sample.py", sample[2:] + shorter["sample.py"] + ["--out", str(tmp_path / "again")])
    assert r.returncode == 2 and len(r.stderr.splitlines()) == 1, r.stderr
    assert f"cannot be read, the first: {damaged}" in r.stderr
