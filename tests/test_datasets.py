import numpy as np
import pytest
import torch

from batches import ShardedBatches
from datasets import DatasetError, load_dataset, resize_uint8, to_float, to_uint8


def test_uint8_conversion_formula_and_round_trip():
    x = torch.tensor([-2.0, -1.0, -0.999, 0.0, 0.5, 1.0, 3.0])
    expected = np.clip(np.floor((x.numpy() + 1) / 2 * 255 + 0.5), 0, 255).astype(np.uint8)
    assert to_uint8(x).numpy().tolist() == expected.tolist()
    u = torch.arange(256, dtype=torch.uint8)
    assert torch.equal(to_uint8(to_float(u)), u)
    assert to_float(u).min() == -1 and to_float(u).max() == 1


def test_digits_offline_splits():
    from sklearn.datasets import load_digits
    ref = load_digits()
    all_ = load_dataset("digits", "all")
    assert all_.images.shape == (1797, 1, 8, 8) and all_.images.dtype == torch.uint8
    assert torch.equal(all_.labels, torch.from_numpy(ref.target).long())
    assert all_.images[0, 0].tolist() == np.round(ref.images[0] * 255 / 16).astype(int).tolist()
    train, test = load_dataset("digits", "train"), load_dataset("digits", "test")
    assert len(train.labels) + len(test.labels) == 1797
    per_class, held = torch.bincount(all_.labels), torch.bincount(test.labels)
    assert ((held - per_class / 5).abs() <= 1).all()  # 20% of every class held out
    assert load_dataset("digits", "all", image_size=16).images.shape == (1797, 1, 16, 16)


def test_resize_keeps_a_constant_image_constant():
    img = torch.full((2, 3, 8, 8), 77, dtype=torch.uint8)
    out = resize_uint8(img, 16)
    assert out.shape == (2, 3, 16, 16) and (out == 77).all()


def test_missing_cifar10_names_the_folder(tmp_path):
    with pytest.raises(DatasetError, match=str(tmp_path / "cifar10")):
        load_dataset("cifar10", "train", str(tmp_path), download=False)
    with pytest.raises(DatasetError, match="unknown dataset"):
        load_dataset("mnist", "train")


def test_imagefolder_decodes_caches_outside_the_folder_and_holds_out_a_tenth(tmp_path):
    from PIL import Image
    folder = tmp_path / "pets"
    for c in ("cat", "dog"):
        (folder / c).mkdir(parents=True)
        for i in range(12):
            Image.new("RGB", (12, 12), (20 * i,) * 3).save(folder / c / f"{i}.png")
    before = sorted(p.relative_to(folder) for p in folder.rglob("*"))
    data = load_dataset("imagefolder", data_root=str(folder), image_size=8)
    assert data.images.shape == (24, 3, 8, 8) and data.classes == ["cat", "dog"]
    assert data.labels.tolist() == [0] * 12 + [1] * 12
    assert load_dataset("imagefolder", data_root=str(folder), image_size=16).images.shape == (24, 3, 16, 16)
    assert torch.equal(load_dataset("imagefolder", data_root=str(folder), image_size=8).images, data.images)  # cached
    assert sorted(p.relative_to(folder) for p in folder.rglob("*")) == before  # nothing of ours inside
    train, test = (load_dataset("imagefolder", s, data_root=str(folder), image_size=8) for s in ("train", "test"))
    assert test.labels.tolist() == [0, 0, 1, 1] and len(train.labels) == 20  # images 0 and 10 of each class
    assert torch.equal(test.images[0], data.images[0]) and torch.equal(test.images[1], data.images[10])


def test_sharded_batches_partition_each_epoch():
    n, b, world = 103, 8, 3
    shards = [ShardedBatches(n, b, r, world, seed=5) for r in range(world)]
    assert len(shards[0]) == n // (b * world)
    e0 = torch.cat([s.epoch(0).flatten() for s in shards])
    assert len(e0) == len(set(e0.tolist())) == len(shards[0]) * b * world  # disjoint, drop_last
    assert not torch.equal(shards[0].epoch(0), shards[0].epoch(1))
    assert torch.equal(shards[1].epoch(4), ShardedBatches(n, b, 1, world, seed=5).epoch(4))  # f(seed, epoch)
    with pytest.raises(DatasetError, match="fewer than one global batch"):
        ShardedBatches(10, 8, 0, 2)


def test_accumulated_micro_batches_are_the_shards_more_ranks_would_take():
    n, b = 100, 4  # global batch 16: 1 rank x 4 micro-batches, 2 x 2, 4 x 1
    layouts = {(w, a): [ShardedBatches(n, b, r, w, seed=3, accumulate=a).epoch(2) for r in range(w)]
               for w, a in ((1, 4), (2, 2), (4, 1))}
    assert {len(ShardedBatches(n, b, 0, w, accumulate=a)) for w, a in layouts} == {6}
    four_ranks = layouts[(4, 1)]
    for (w, a), ranks in layouts.items():
        for r, order in enumerate(ranks):
            assert order.shape == (6, a * b)
            for m in range(a):  # micro-batch m of rank r is what rank r*a + m of four ranks takes, step by step
                assert torch.equal(order[:, m * b:(m + 1) * b], four_ranks[r * a + m])


def fake_tiny_imagenet(root):
    """Tiny ImageNet's real layout: train/<wnid>/images/*.JPEG with a boxes file, val/images + val_annotations.txt."""
    from PIL import Image
    rng = np.random.default_rng(0)
    wnids = ["n01443537", "n01629819"]
    for w in wnids:
        (root / "train" / w / "images").mkdir(parents=True)
        (root / "train" / w / f"{w}_boxes.txt").write_text("")
        for k in range(3):
            Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(root / "train" / w / "images" / f"{w}_{k}.JPEG")
    (root / "val" / "images").mkdir(parents=True)
    rows = []
    for k, w in enumerate(wnids * 2):
        Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(root / "val" / "images" / f"val_{k}.JPEG")
        rows.append(f"val_{k}.JPEG\t{w}\t0\t0\t8\t8")
    (root / "val" / "val_annotations.txt").write_text("\n".join(rows) + "\n")
    (root / "wnids.txt").write_text("\n".join(wnids) + "\n")


def test_tiny_imagenet_path_is_the_root_or_the_originals_train_folder(tmp_path):
    fake_tiny_imagenet(tmp_path / "tiny-imagenet-200")
    by_root, by_train = (load_dataset("tiny-imagenet", "all", str(tmp_path / "data"), tiny_imagenet_path=str(p))
                         for p in (tmp_path / "tiny-imagenet-200", tmp_path / "tiny-imagenet-200" / "train"))
    assert by_root.images.shape == (6, 3, 8, 8) and by_root.classes == ["n01443537", "n01629819"]
    assert torch.equal(by_root.images, by_train.images) and torch.equal(by_root.labels, by_train.labels)
    for p in (tmp_path / "tiny-imagenet-200", tmp_path / "tiny-imagenet-200" / "train"):
        test = load_dataset("tiny-imagenet", "test", str(tmp_path / "data"), tiny_imagenet_path=str(p))
        assert test.labels.tolist() == [0, 1, 0, 1]
    with pytest.raises(DatasetError, match="looked for .*nowhere/train/ .*class folders in .*nowhere"):
        load_dataset("tiny-imagenet", "all", str(tmp_path / "data"), tiny_imagenet_path=str(tmp_path / "nowhere"))


def test_staged_batches_gather_each_batch_into_a_few_reused_buffers():
    from batches import StagedBatches
    images = torch.randint(256, (50, 1, 4, 4), dtype=torch.uint8)
    staged = StagedBatches(images, 8, torch.device("cpu"), slots=3)
    buffers = [b.data_ptr() for b in staged.buffers]
    g = torch.Generator().manual_seed(0)
    batches = [torch.randperm(50, generator=g)[:8] for _ in range(7)]
    out = [staged(index) for index in batches]
    for index, batch in zip(batches, out):  # each batch survives the buffer's reuse three steps later
        assert torch.equal(batch, images[index])
    assert [b.data_ptr() for b in staged.buffers] == buffers  # no buffer was reallocated
    assert torch.equal(staged.buffers[6 % 3], images[batches[6]])  # the last batch went through slot 0
