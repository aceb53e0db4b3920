"""sample.py over many saved epochs in one process (the paper's FID-per-epoch curve), and per-class figures."""
import json
import os
import shutil

import numpy as np
import pytest
import torch

from conftest import TINY

import plot_fid
import sample
import study_records
from study_run import Task
import train
from fid import (REF_PER_CLASS, FeatureStats, dataset_stats, frechet_distance, kernel_distance,
                 load_or_make_reference, read_reference)
from cli import UserError
from test_sample import pngs, write_classifier


STEPS = TINY + ["--epoch", "2", "--interval", "1", "--save_steps", "5,28"]  # 28 steps an epoch: one inside, one at its end


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A digits run with epochs 1 and 2 and steps 5 and 28 saved, and an (untrained) classifier for proto-FID."""
    root = tmp_path_factory.mktemp("epochs")
    train.main(train.build_parser().parse_args(STEPS + ["--run_dir", str(root / "run")]))
    return root / "run", write_classifier(root / "clf.pt")


def run_sample(run, clf, tmp_path, epochs, *extra):
    sample.main(sample.build_parser().parse_args([
        "--path", str(run), "--epoch", epochs, "--ddim", "True", "--num_steps", "3", "--genum", "20",
        "--genbatch", "8", "--fid", "True", "--fid_features", "classifier", "--eval_classifier", str(clf),
        "--data_root", str(tmp_path / "data"), "--per_class", "True", *extra]))
    return [json.loads(line) for line in open(run / "metrics.jsonl") if '"fid"' in line]


def test_several_epochs_in_one_process_equal_separate_invocations(trained, tmp_path):
    run, clf = trained
    alone, together = tmp_path / "alone", tmp_path / "together"
    for folder in (alone, together):
        shutil.copytree(run, folder)
    separate = [run_sample(alone, clf, tmp_path, str(e), "--out", str(tmp_path / f"png_{e}"))[-1] for e in (1, 2)]
    records = run_sample(together, clf, tmp_path, "all", "--png", "True", "--out", str(tmp_path / "many"))
    assert [r["epoch"] for r in records] == [1, 2] and [r["step"] for r in records] == [28, 56]
    for a, b in zip(separate, records):
        for key in ("value", "n", "class_accuracy", "per_class"):
            assert a[key] == b[key], key
    assert records[0]["value"] != records[1]["value"]  # two epochs' weights, not one twice
    for e in (1, 2):
        a, b = pngs(tmp_path / f"png_{e}"), pngs(tmp_path / "many" / f"samples_{e}")
        assert len(a) == 20 and all(np.array_equal(x, y) for x, y in zip(a, b))
        assert (tmp_path / "many" / f"samples_{e}_grid.png").exists()


def test_saved_steps_are_scored_like_epochs_and_a_run_resumes_from_one(trained, tmp_path):
    run, clf = trained
    shutil.copytree(run, tmp_path / "run")
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").glob("weights_step_*.pt")) == [
        "weights_step_28.pt", "weights_step_5.pt"]
    records = run_sample(tmp_path / "run", clf, tmp_path, "all", "--step", "all")
    assert [(r["step"], r["epoch"]) for r in records] == [(5, 5 / 28), (28, 1.0)]
    epoch_1 = run_sample(tmp_path / "run", clf, tmp_path, "1")[-1]
    assert epoch_1["value"] == records[1]["value"]  # step 28 is epoch 1's end: the same weights
    assert records[0]["value"] != records[1]["value"] and (tmp_path / "run" / "fid_step5.txt").exists()
    again = run_sample(tmp_path / "run", clf, tmp_path, "all", "--step", "5", "--skip_scored", "True")
    assert len(again) == 3  # step 5 with the same settings: skipped
    with pytest.raises(UserError, match="no checkpoint for step 6 in .*; saved steps: 5, 28"):
        run_sample(tmp_path / "run", clf, tmp_path, "all", "--step", "6")
    # stopped at the save step, then continued: the weights of the uninterrupted run, bit for bit
    stopped = str(tmp_path / "stopped")
    train.main(train.build_parser().parse_args(STEPS + ["--run_dir", stopped, "--max_steps", "5"]))
    train.main(train.build_parser().parse_args(["--path_resume", stopped]))
    a, b = (torch.load(os.path.join(r, "checkpoints", "ckpt_2_checkpoint.pt"), weights_only=True)
            for r in (run, stopped))
    assert all(torch.equal(a["ema"]["net"][k], b["ema"]["net"][k]) for k in a["ema"]["net"])
    assert all(torch.equal(a["net"][k], b["net"][k]) for k in a["net"])


def test_the_real_floor_scores_the_first_test_images_of_each_class_as_samples_are_scored(trained, tmp_path):
    import scipy.linalg
    from datasets import load_dataset, to_float
    from evaluate import classifier_for
    run, clf = trained
    shutil.copytree(run, tmp_path / "run")
    record = run_sample(tmp_path / "run", clf, tmp_path, "2", "--real", "test")[-1]
    assert (record["sampler"], record["split"], record["w"], record["n"]) == ("real", "test", None, 20)
    assert not list((tmp_path / "run").glob("samples_*"))  # no PNGs, no grid
    test = load_dataset("digits", "test")
    picked = torch.cat([test.images[test.labels == c][:2] for c in range(10)])  # image i: class i mod 10
    order = torch.tensor([2 * (i % 10) + i // 10 for i in range(20)])  # class i mod 10, its (i div 10)-th
    classifier = classifier_for(str(clf))
    with torch.inference_mode():
        features, logits = classifier(to_float(picked[order]))
    f = features.double().numpy()
    mu_ref, sigma_ref = (np.load(record["reference"])[k] for k in ("mu", "sigma"))
    mu, sigma = f.mean(0), np.cov(f, rowvar=False)
    root = scipy.linalg.sqrtm(sigma @ sigma_ref).real
    expected = ((mu - mu_ref) ** 2).sum() + np.trace(sigma + sigma_ref - 2 * root)
    assert record["value"] == pytest.approx(expected, rel=1e-3, abs=1e-4)
    labels = torch.arange(20) % 10
    assert record["class_accuracy"] == pytest.approx((logits.argmax(1) == labels).double().mean().item())
    again = run_sample(tmp_path / "run", clf, tmp_path, "2", "--real", "test", "--skip_scored", "True")
    assert len(again) == 1  # the floor with the same settings: skipped


def test_many_epochs_write_no_pngs_unless_asked(trained, tmp_path):
    run, clf = trained
    shutil.copytree(run, tmp_path / "run")
    run_sample(tmp_path / "run", clf, tmp_path, "1,2")
    assert not [p for p in (tmp_path / "run").glob("samples_*") if p.is_dir()]
    assert sorted(p.name for p in (tmp_path / "run").glob("samples_*_grid.png")) == ["samples_1_grid.png",
                                                                                     "samples_2_grid.png"]


def test_every_epoch_reuses_the_one_compiled_network(trained, tmp_path, compiled_graphs):
    run, clf = trained
    shutil.copytree(run, tmp_path / "run")
    records = run_sample(tmp_path / "run", clf, tmp_path, "all", "--compile", "True")
    # epoch 2's weights are loaded into the network compiled for epoch 1
    assert len(records) == 2 and compiled_graphs == ["noise", "network"]
    assert [c["network"] for c in records[0]["compile"]] == ["per-image noise", "sampling step"]


@pytest.mark.parametrize("spec,message", [("1,x", "--epoch must be a saved epoch, a comma list"),
                                          ("1,1", "--epoch must be a saved epoch, a comma list"),
                                          ("-1", "--epoch must be"),
                                          ("1,9", "no checkpoint for epoch 9 in"),
                                          ("", "--epoch must be")])
def test_bad_epoch_lists_are_refused_before_sampling(trained, tmp_path, spec, message):
    run, _ = trained
    before = sorted(os.listdir(run))
    with pytest.raises(UserError, match=message) as e:
        sample.main(sample.build_parser().parse_args(["--path", str(run), "--epoch", spec, "--genum", "10"]))
    if "no checkpoint" in message:
        assert str(e.value).endswith("saved epochs: 1, 2")
    assert sorted(os.listdir(run)) == before


def test_per_class_statistics_equal_numpy_per_class():
    rng = np.random.default_rng(0)
    feats, labels = rng.normal(size=(60, 4)), rng.integers(0, 3, size=60)
    stats = FeatureStats(4, "cpu", classes=3)
    for i in range(0, 60, 16):  # in batches, as images arrive
        stats.add(torch.from_numpy(feats[i:i + 16]), torch.from_numpy(labels[i:i + 16]))
    for c in range(3):
        mu, sigma = stats.mu_sigma(c)
        assert np.allclose(mu, feats[labels == c].mean(0)) and np.allclose(sigma, np.cov(feats[labels == c],
                                                                                          rowvar=False))
    mu, sigma = stats.mu_sigma()  # all classes together
    assert np.allclose(mu, feats.mean(0)) and np.allclose(sigma, np.cov(feats, rowvar=False))
    assert stats.n == 60 and stats.count.tolist() == [float((labels == c).sum()) for c in range(3)]


def test_per_class_reference_is_cached_beside_the_all_class_file(tmp_path):
    from datasets import ImageData
    g = torch.Generator().manual_seed(0)
    images = torch.randint(256, (30, 1, 2, 2), generator=g, dtype=torch.uint8)
    labels = torch.tensor([0] * 12 + [1] * 17 + [2])  # class 2 has one image: no covariance
    data = ImageData(images, labels, ["a", "b", "c"])

    def extract(u8):
        return u8.flatten(1).double()
    path = str(tmp_path / "ref.npz")
    made = load_or_make_reference(path, lambda k: dataset_stats(data, extract, 4, torch.device("cpu"), batch=7,
                                                                classes=k), True, classes=3)
    again = load_or_make_reference(path, lambda k: pytest.fail("recomputed"), True, classes=3)
    x = images.flatten(1).double().numpy()
    for (mu, sigma), ref in ((made[0], made[0]), (again[0], made[0])):
        assert np.allclose(mu, x.mean(0)) and np.allclose(sigma, np.cov(x, rowvar=False))
    for per_class in (made[1], again[1]):
        for c in (0, 1):
            assert np.allclose(per_class["stats"][c][0], x[labels == c].mean(0))
            assert np.allclose(per_class["stats"][c][1], np.cov(x[labels == c], rowvar=False))
            # the kept features: the class's first images in dataset order (uint8 values: exact in float16)
            assert np.array_equal(per_class["features"].of(c), x[labels == c][:REF_PER_CLASS])
        assert per_class["stats"][2] is None and len(per_class["features"].of(2)) == 1
    assert os.path.isfile(tmp_path / "ref_per_class.npz")
    # a class's FID is the Frechet distance of its own statistics
    assert frechet_distance(*made[1]["stats"][0], *made[1]["stats"][0]) == pytest.approx(0, abs=1e-6)
    # a rank other than 0 reads the counts, not the features it never scores
    assert read_reference(path, 3, features=False)[1]["features"] is None


def kid_by_pairs(x, y):
    """The unbiased MMD^2 estimate written as its sums over pairs (Binkowski et al. 2018, eq. 3), cubic kernel."""
    def k(a, b):
        return (sum(p * q for p, q in zip(a, b)) / len(a) + 1) ** 3
    m, n = len(x), len(y)
    xx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    yy = sum(k(y[i], y[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
    xy = sum(k(a, b) for a in x for b in y) / (m * n)
    return xx + yy - 2 * xy


def test_kernel_distance_is_the_unbiased_mmd_of_the_cubic_kernel():
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(7, 3)), rng.normal(0.5, 1, size=(5, 3))
    assert kernel_distance(x, y) == pytest.approx(kid_by_pairs(x.tolist(), y.tolist()), rel=1e-12)
    # two copies of a point against two of another: k(a,a) + k(b,b) - 2 k(a,b), in one dimension
    a, b = 0.5, -1.0
    assert kernel_distance(np.array([[a], [a]]), np.array([[b], [b]])) == pytest.approx(
        (a * a + 1) ** 3 + (b * b + 1) ** 3 - 2 * (a * b + 1) ** 3)
    # unbiased: near 0 on average for two samples of one distribution, far from it for two distributions
    same = [kernel_distance(rng.normal(size=(50, 8)), rng.normal(size=(50, 8))) for _ in range(40)]
    assert abs(np.mean(same)) < 3 * np.std(same) / np.sqrt(40)
    assert kernel_distance(rng.normal(size=(50, 8)), rng.normal(1, 1, size=(50, 8))) > 10 * np.std(same)
    assert kernel_distance(x[:1], y) is None


def test_per_class_figures_of_chosen_classes_and_kid_only_in_a_wide_feature_space(trained, tmp_path, monkeypatch):
    run, clf = trained
    shutil.copytree(run, tmp_path / "run")
    (narrow,) = run_sample(tmp_path / "run", clf, tmp_path, "2", "--per_class", "1,3", "--png", "False")[-1:]
    figures = narrow["per_class"]
    assert figures["classes"] == [1, 3] and figures["n"] == [None, 2, None, 2] + [None] * 6
    assert [c for c in range(10) if figures["kid"][c] is not None] == [1, 3]
    assert [c for c in range(10) if figures["fid"][c] is not None] <= [1, 3]
    import evaluate
    import fid
    for module in (evaluate, fid):  # the 128-d classifier features now count as wide, as Inception's
        monkeypatch.setattr(module, "NARROW", 8)
    (wide,) = run_sample(tmp_path / "run", clf, tmp_path / "w", "2", "--per_class", "1,3", "--png", "False")[-1:]
    assert "fid" not in wide["per_class"] and wide["value"] == pytest.approx(narrow["value"], rel=1e-6)  # unchanged


def test_one_class_curve_in_plot_fid_and_class_0_apart_in_a_study_report(trained, tmp_path):
    run, clf = trained
    shutil.copytree(run, tmp_path / "run")
    records = run_sample(tmp_path / "run", clf, tmp_path, "all")
    plot_fid.main(plot_fid.build_parser().parse_args([str(tmp_path / "run"), "--class_index", "3",
                                                      "--out", str(tmp_path / "c3.png")]))
    assert (tmp_path / "c3.png").stat().st_size > 0
    study = {"evaluation": {"images": 20, "w": 1.8, "seed": 0, "sampler": "--ddim True --num_steps 3 --genbatch 8",
                            "features": "classifier"}}  # what run_sample ran: its records are the study's
    task = Task("run", [], "run", arm="a", seed=0, run_dir=str(tmp_path / "run"))
    data, read = study_records.collect([task], study, str(clf))
    assert read["left_out"] == 0 and sorted(data["fid"]["a"][0]) == [r["epoch"] for r in records]
    for r in records:
        per = r["per_class"]
        assert data["kid_class0"]["a"][0][r["epoch"]] == per["kid"][0]
        assert data["accuracy_others"]["a"][0][r["epoch"]] == pytest.approx(100 * np.mean(per["class_accuracy"][1:]))
    other = study_records.collect([task], study | {"evaluation": study["evaluation"] | {"sampler": "--ddim True"}},
                                  str(clf))[1]
    assert other["used"] == 0 and other["left_out"] == len(records)  # DDIM-50 is another evaluation
    with pytest.raises(UserError, match="not a class"):
        plot_fid.fid_curve(str(tmp_path / "run"), 10)
