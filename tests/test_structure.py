"""structure.py and class_statistics: the class-structure figures against tables whose structure is known by
construction, closed forms and hand counts."""
import math

import pytest
import torch

from conftest import run_program

from prototypes import FORMAT, PrototypeClassifier, class_statistics
from structure import confusion_similarity, off_diagonal, table_structure

C, D = 10, 128


def two_clusters(noise: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows 0-4 near one direction, rows 5-9 near an orthogonal one; and a confusion matrix in which exactly the
    classes of the same cluster are confused with each other (once per ordered pair)."""
    g = torch.Generator().manual_seed(0)
    centre = torch.zeros(2, D)
    centre[0, 0] = centre[1, 1] = 1.0
    cluster = torch.arange(C) // 5
    table = centre[cluster] + noise * torch.randn(C, D, generator=g)
    same = cluster[:, None] == cluster[None, :]
    confusion = 20 * torch.eye(C) + (same & ~torch.eye(C, dtype=torch.bool)).double()
    return table, confusion


def point_biserial_of_ranks(n_high: int, n_low: int) -> float:
    """Spearman's rho between a binary reference (n_high pairs 1, n_low pairs 0) and scores that put every 1-pair
    above every 0-pair: the Pearson correlation of the ranks 1..N with the group indicator."""
    n = n_high + n_low
    mean_high, mean_low = (n_low + 1 + n) / 2, (1 + n_low) / 2
    sd_ranks = math.sqrt((n * n - 1) / 12)
    return (mean_high - mean_low) / sd_ranks * math.sqrt(n_high * n_low) / n


def test_a_two_cluster_table_correlates_with_its_clusters_as_the_closed_form_says():
    table, confusion = two_clusters(noise=0.005)
    s = table_structure(table, confusion, means=table)
    # 2 x C(5, 2) = 20 within-cluster pairs (cosine near 1) and 25 between (near 0)
    assert s["rho_confusion"] == pytest.approx(point_biserial_of_ranks(20, 25), abs=1e-9)
    assert point_biserial_of_ranks(20, 25) == pytest.approx(0.8609, abs=1e-4)
    assert s["rho_class_means"] == pytest.approx(1.0)
    assert s["cosine_mean"] == pytest.approx(20 / 45, abs=0.02) and s["cosine_max"] > 0.99


def test_a_random_table_carries_no_structure():
    _, confusion = two_clusters(noise=0.0)
    g = torch.Generator().manual_seed(1)
    s = table_structure(torch.randn(C, D, generator=g), confusion, means=torch.randn(C, D, generator=g))
    # over 45 pairs rho's sd under independence is about 1 / sqrt(44) = 0.15; 3 sd
    assert abs(s["rho_confusion"]) < 0.45 and abs(s["rho_class_means"]) < 0.45
    wide = torch.randn(40, D, generator=g)
    confused = torch.eye(40) * 5 + torch.rand(40, 40, generator=g)
    w = table_structure(wide, confused, means=wide + torch.randn(40, D, generator=g))
    assert abs(w["rho_confusion"]) < 0.15  # 780 pairs: sd about 0.036
    assert abs(w["cosine_mean"]) < 0.01 and w["cosine_sd"] == pytest.approx(1 / math.sqrt(D), rel=0.1)
    assert w["rho_class_means"] > 0.3  # means built from the table itself do share its structure


def test_confusion_similarity_by_hand():
    confusion = torch.tensor([[8, 2, 0], [1, 3, 0], [0, 0, 5]])
    sim = confusion_similarity(confusion)
    assert sim[0, 1] == pytest.approx((2 / 10 + 1 / 4) / 2) and sim[1, 0] == sim[0, 1]
    assert sim[0, 2] == 0 and sim[2, 2] == 1
    assert off_diagonal(sim).tolist() == pytest.approx([sim[0, 1].item(), 0, 0])


def test_a_classifier_that_never_errs_gives_no_confusion_correlation():
    table, _ = two_clusters(noise=0.1)
    s = table_structure(table, 7 * torch.eye(C), table)
    assert math.isnan(s["rho_confusion"]) and s["rho_class_means"] == pytest.approx(1.0)


def test_class_statistics_match_a_per_class_loop():
    torch.manual_seed(0)
    model = PrototypeClassifier(3, 16).eval()
    images = torch.randint(0, 256, (23, 1, 8, 8), dtype=torch.uint8)
    labels = torch.tensor([0, 1, 2] * 7 + [0, 1])
    means, confusion = class_statistics(model.train(), images, labels, batch=5)
    assert model.training  # the caller's mode is kept
    model.eval()
    with torch.no_grad():
        features, logits = model(images.float() / 127.5 - 1)
    for k in range(3):
        torch.testing.assert_close(means[k], features[labels == k].mean(0), atol=1e-5, rtol=1e-4)
        for j in range(3):
            assert confusion[k, j] == ((labels == k) & (logits.argmax(1) == j)).sum()
    assert confusion.sum() == 23


def write_reference(path, confusion, means, protos):
    torch.save({"format": FORMAT, "prototypes": protos, "classes": [str(i) for i in range(C)],
                "confusion": confusion, "class_means": means}, path)


def write_run(run, table):
    (run / "checkpoints").mkdir(parents=True)
    torch.save({"cemblayer": {"condEmbedding.0.weight": table}}, run / "checkpoints" / "ckpt_3_checkpoint.pt")
    torch.save({"last_epoch": 3, "file": "ckpt_3_checkpoint.pt"}, run / "checkpoints" / "last_epoch.pt")


def test_structure_command_reports_files_and_run_tables(tmp_path):
    table, confusion = two_clusters(noise=0.005)
    write_reference(tmp_path / "clf.pt", confusion, means=table, protos=torch.randn(C, D))
    write_run(tmp_path / "run-s0", table)
    cmd = [str(tmp_path / "clf.pt"), str(tmp_path / "run-s0"), "--classifier", str(tmp_path / "clf.pt"), "--out",
           str(tmp_path / "s.md")]
    r = run_program("structure.py", cmd)
    assert r.returncode == 0, r.stderr
    rows = {line.split(" | ")[0][2:]: line for line in r.stdout.splitlines() if line.startswith("| ")}
    assert set(rows) >= {"clf.pt centres", "clf.pt class means", "run-s0"}
    assert rows["run-s0"].endswith("| +0.86 | +1.00 |") and rows["clf.pt class means"].endswith("| +0.86 | +1.00 |")
    assert "20 of 45 class pairs ever confused" in r.stdout and (tmp_path / "s.md").read_text() in r.stdout + "\n"
    torch.save({"format": FORMAT, "prototypes": table}, tmp_path / "old.pt")
    r = run_program("structure.py", cmd[:-4] + ["--classifier", str(tmp_path / "old.pt")])
    assert r.returncode == 2 and "stores no confusion matrix and class means; pass --dataset" in r.stderr
    assert "Traceback" not in r.stderr
