import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

from conftest import ROOT, run_env, run_program

import train
from checkpoints import build_models
from datasets import load_dataset
from prototypes import PrototypeClassifier, dce_and_prototype_loss, imagenet_resnet18, load_classifier, load_prototypes
from cli import (UserError)

# The authors' classes, written from their description: a whole ModifiedResNet pickled from a module `Models`.
AUTHORS_MODELS = textwrap.dedent("""
    import torch, torchvision
    from torch import nn

    class ModifiedResNet(nn.Module):
        def __init__(self, num_hidden_units, s):
            super().__init__()
            self.scale = s
            self.resnet = torchvision.models.resnet18()
            self.reduce_to_hidden = nn.Linear(1000, num_hidden_units)
            self.dce_loss = dce_loss(10, num_hidden_units)

    class dce_loss(nn.Module):
        def __init__(self, n_classes, feat_dim):
            super().__init__()
            self.n_classes, self.feat_dim = n_classes, feat_dim
            self.centers = nn.Parameter(torch.randn(feat_dim, n_classes))
""")


@pytest.fixture(scope="module")
def authors_pickle(tmp_path_factory):
    d = tmp_path_factory.mktemp("authors")
    (d / "Models.py").write_text(AUTHORS_MODELS)
    code = "import torch, Models; torch.manual_seed(3); torch.save(Models.ModifiedResNet(128, 2), 'best_model.pt')"
    subprocess.run([sys.executable, "-c", code], cwd=d, check=True, env=run_env())
    return d / "best_model.pt"


def evil_pickle(path, marker):
    code = textwrap.dedent(f"""
        import os, torch
        class Evil:
            def __reduce__(self):
                return (os.system, ("touch {marker}",))
        torch.save({{"prototypes": Evil()}}, {str(path)!r})
    """)
    subprocess.run([sys.executable, "-c", code], check=True, env=run_env())


def tiny_main(args, extra):
    return train.main(train.build_parser().parse_args(args + ["--epoch", "1"] + extra))


def initial_models(cdim=128):
    torch.manual_seed(0)
    return build_models({"inch": 1, "outch": 1, "modch": 32, "chmul": [1, 2], "numres": 1, "cdim": cdim,
                               "useconv": True, "droprate": 0.1, "num_classes": 10})


def test_dce_and_prototype_loss_closed_form():
    torch.manual_seed(0)
    f, c, y = torch.rand(5, 4), torch.randn(4, 3), torch.tensor([0, 2, 1, 1, 0])
    model = PrototypeClassifier(3, 4, scale=2.0)
    with torch.no_grad():
        model.dce_loss.centers.copy_(c)
    logits = -2.0 * model.dce_loss(f)
    dist = torch.tensor([[float(((f[i] - c[:, k]) ** 2).sum()) for k in range(3)] for i in range(5)])
    torch.testing.assert_close(logits, -2.0 * dist, atol=1e-5, rtol=1e-5)
    total, dce = dce_and_prototype_loss(f, logits, c, y, pl_weight=0.5)
    nll = -torch.stack([torch.log_softmax(-2.0 * dist[i], 0)[y[i]] for i in range(5)]).mean()
    pl = torch.stack([((f[i] - c[:, y[i]]) ** 2).sum() for i in range(5)]).mean()
    torch.testing.assert_close(dce, nll, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(total, nll + 0.5 * pl, atol=1e-5, rtol=1e-5)


def test_authors_pickle_loads_through_the_allow_list(authors_pickle):
    protos, source = load_prototypes(str(authors_pickle))
    assert protos.shape == (10, 128) and "authors" in source
    clf = load_classifier(str(authors_pickle))
    torch.testing.assert_close(clf.prototypes, protos)
    feats, logits = clf(torch.rand(2, 3, 32, 32) * 2 - 1)
    assert feats.shape == (2, 128) and logits.shape == (2, 10)


def test_a_pickle_with_another_callable_is_refused_unexecuted(tmp_path, tiny_args):
    bad, marker = tmp_path / "evil.pt", tmp_path / "pwned"
    evil_pickle(bad, marker)
    with pytest.raises(UserError, match="refused.*system"):
        load_prototypes(str(bad))
    r = run_program("train.py", tiny_args + ["--mode", "proto_frozen", "--path_proto", str(bad), "--results",
                                             str(tmp_path / "res")])
    assert r.returncode == 2 and "error:" in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert not marker.exists()


def test_proto_frozen_keeps_the_table_and_trains_the_mlp(tmp_path, tiny_args, authors_pickle):
    protos, _ = load_prototypes(str(authors_pickle))
    out = tiny_main(tiny_args, ["--mode", "proto_frozen", "--path_proto", str(authors_pickle),
                                "--results", str(tmp_path)])
    cemb = out["cemblayer"]
    assert torch.equal(cemb.condEmbedding[0].weight, protos)
    assert torch.equal(out["ema"]["cemblayer"].condEmbedding[0].weight, protos)
    _, init = initial_models()
    assert not torch.equal(cemb.condEmbedding[1].weight, init.condEmbedding[1].weight)
    assert "authors' Models.ModifiedResNet pickle" in open(next(tmp_path.rglob("log.txt"))).read()


def test_class_means_of_the_authors_classifier_are_computed_over_the_training_split(tmp_path, tiny_args,
                                                                                    authors_pickle):
    out = tiny_main(tiny_args, ["--mode", "proto_frozen", "--proto_source", "means", "--path_proto",
                                str(authors_pickle), "--proto_norm", "7", "--results", str(tmp_path)])
    split = load_dataset("digits", "train")
    clf = load_classifier(str(authors_pickle))
    with torch.no_grad():
        features = clf.features(split.images.float() / 127.5 - 1)
    means = torch.stack([features[split.labels == k].mean(0) for k in range(10)])
    table = out["cemblayer"].condEmbedding[0].weight
    assert not table.requires_grad
    torch.testing.assert_close(table, means / means.norm(dim=1, keepdim=True) * 7, atol=1e-4, rtol=1e-4)
    run = next(tmp_path.rglob("config.json")).parent
    assert json.load(open(run / "config.json"))["proto_source"] == "means"
    assert "loaded means" in (run / "log.txt").read_text() and "training split" in (run / "log.txt").read_text()


@pytest.mark.parametrize("mode", ["proto_frozen", "random_scaled"])
def test_stored_class_means_are_the_table_and_keep_their_norms(tmp_path, tiny_args, mode):
    from prototypes import FORMAT
    means = torch.rand(10, 128) * torch.linspace(1, 2, 10)[:, None]
    torch.save({"format": FORMAT, "prototypes": torch.randn(10, 128), "class_means": means}, tmp_path / "c.pt")
    table = tiny_main(tiny_args, ["--mode", mode, "--proto_source", "means", "--path_proto", str(tmp_path / "c.pt"),
                                  "--results", str(tmp_path)])["cemblayer"].condEmbedding[0].weight
    torch.testing.assert_close(table.norm(dim=1), means.norm(dim=1))
    assert torch.equal(table, means) == (mode == "proto_frozen")


@pytest.mark.parametrize("extra,message", [
    (["--mode", "regular", "--proto_source", "means"], "not to --mode regular"),
    (["--mode", "proto_frozen", "--proto_source", "means"], "cannot score images"),  # a bare tensor has no classifier
])
def test_class_means_need_a_prototype_mode_and_a_classifier(tmp_path, tiny_args, extra, message):
    torch.save(torch.randn(10, 128), tmp_path / "p.pt")
    with pytest.raises(UserError, match=message):
        tiny_main(tiny_args, extra + ["--path_proto", str(tmp_path / "p.pt"), "--results", str(tmp_path / "res")])
    assert not (tmp_path / "res").exists()


def test_structure_measures_the_reference_of_the_authors_classifier_on_a_dataset(authors_pickle):
    import structure
    args = structure.build_parser().parse_args([str(authors_pickle), "--classifier", str(authors_pickle),
                                                "--dataset", "digits", "--device", "cpu"])
    confusion, means = structure.reference_of(args)
    clf = load_classifier(str(authors_pickle))
    test, train_split = load_dataset("digits", "test"), load_dataset("digits", "train")
    with torch.no_grad():
        predicted = clf(test.images.float() / 127.5 - 1)[1].argmax(1)
        features = clf.features(train_split.images.float() / 127.5 - 1)
    for i in range(10):
        assert confusion[i].tolist() == [((test.labels == i) & (predicted == j)).sum().item() for j in range(10)]
    torch.testing.assert_close(means[3], features[train_split.labels == 3].mean(0), atol=1e-4, rtol=1e-4)


def test_proto_unfrozen_trains_the_table(tmp_path, tiny_args):
    protos = torch.randn(10, 128)
    torch.save(protos, tmp_path / "protos.pt")
    out = tiny_main(tiny_args, ["--mode", "proto_unfrozen", "--path_proto", str(tmp_path / "protos.pt"),
                                "--results", str(tmp_path)])
    table = out["cemblayer"].condEmbedding[0].weight
    assert table.requires_grad and not torch.equal(table, protos)
    assert (table - protos).abs().max() < 0.1  # moved by optimisation, not replaced


@pytest.mark.parametrize("shape", [(9, 128), (10, 64)])
def test_prototypes_of_the_wrong_shape_are_refused(tmp_path, tiny_args, shape):
    torch.save(torch.randn(*shape), tmp_path / "p.pt")
    with pytest.raises(UserError, match=r"10 classes .* x 128"):
        tiny_main(tiny_args, ["--mode", "proto_frozen", "--path_proto", str(tmp_path / "p.pt"),
                              "--results", str(tmp_path / "res")])


def test_train_classifier_writes_a_weights_only_checkpoint(tmp_path):
    out = tmp_path / "proto.pt"
    cmd = ["--dataset", "digits", "--pretrained", "False", "--epoch", "1", "--batchsize", "256", "--out", str(out)]
    r = run_program("train_classifier.py", cmd)
    assert r.returncode == 0, r.stderr
    assert "test accuracy" in r.stdout
    ckpt = torch.load(out, weights_only=True)
    assert ckpt["prototypes"].shape == (10, 128) and ckpt["classes"] == [str(i) for i in range(10)]
    torch.testing.assert_close(ckpt["prototypes"], ckpt["classifier"]["dce_loss.centers"].T)
    assert 0 <= ckpt["test_accuracy"] <= 1
    confusion, means = ckpt["confusion"], ckpt["class_means"]
    test = load_dataset("digits", "test")
    assert confusion.shape == (10, 10) and confusion.sum(1).tolist() == torch.bincount(test.labels).tolist()
    assert ckpt["test_accuracy"] == pytest.approx((confusion.trace() / confusion.sum()).item())
    train_split, clf = load_dataset("digits", "train"), load_classifier(str(out))
    with torch.no_grad():
        features = clf.features(train_split.images.float() / 127.5 - 1)
    for k in (0, 9):  # the means are over the training split, in eval mode
        torch.testing.assert_close(means[k], features[train_split.labels == k].mean(0), atol=1e-4, rtol=1e-4)
    assert set(ckpt["structure"]) == {"centres", "means"}
    assert ckpt["structure"]["means"]["rho_class_means"] == pytest.approx(1)
    assert "Spearman with confusion" in r.stdout
    protos, source = load_prototypes(str(out))
    assert torch.equal(protos, ckpt["prototypes"]) and source == "protodiffusion checkpoint"
    before = out.read_bytes()
    r = run_program("train_classifier.py", cmd)
    assert r.returncode == 2 and "already exists" in r.stderr and out.read_bytes() == before
    # --global_batch fixes the batch whatever the per-device --batchsize says: the same classifier (one process)
    r = run_program("train_classifier.py", cmd[:-4] + ["--batchsize", "7", "--global_batch", "256", "--out",
                                                      str(tmp_path / "global.pt")])
    assert r.returncode == 0, r.stderr
    assert torch.equal(torch.load(tmp_path / "global.pt", weights_only=True)["prototypes"], ckpt["prototypes"])


def test_missing_imagenet_weights_say_where_to_put_them(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(UserError, match=str(tmp_path / "hub" / "checkpoints" / "resnet18-")):
        imagenet_resnet18(download=False)


@pytest.mark.parametrize("mode", ["random_scaled", "proto_shuffled"])
def test_control_tables_are_frozen_and_keep_what_they_should(tmp_path, tiny_args, mode):
    # a generator of its own: the global one may sit where the control's seed puts it (a classifier trained before)
    protos = torch.randn(10, 128, generator=torch.Generator().manual_seed(123)) * torch.linspace(1, 3, 10)[:, None]
    torch.save(protos, tmp_path / "p.pt")
    table = tiny_main(tiny_args, ["--mode", mode, "--path_proto", str(tmp_path / "p.pt"),
                                  "--results", str(tmp_path)])["cemblayer"].condEmbedding[0].weight
    assert not table.requires_grad
    if mode == "random_scaled":
        torch.testing.assert_close(table.norm(dim=1), protos.norm(dim=1))
        assert (torch.nn.functional.cosine_similarity(table, protos, dim=1).abs() < 0.5).all()
    else:
        matches = [[torch.equal(table[i], protos[j]) for j in range(10)] for i in range(10)]
        assert all(sum(row) == 1 for row in matches) and all(sum(col) == 1 for col in zip(*matches))
        assert not any(matches[i][i] for i in range(10))  # no class keeps its own prototype
    again = tiny_main(tiny_args, ["--mode", mode, "--path_proto", str(tmp_path / "p.pt"),
                                  "--results", str(tmp_path / "again")])["cemblayer"].condEmbedding[0].weight
    assert torch.equal(table, again)  # a fixed seed


def test_movement_report_matches_a_hand_computation(tmp_path):
    out = tmp_path / "clf.pt"
    subprocess.run([sys.executable, os.path.join(ROOT, "train_classifier.py"), "--dataset", "digits", "--pretrained",
                    "False", "--epoch", "1", "--batchsize", "256", "--center_lr_mult", "10", "--out", str(out)],
                   check=True, capture_output=True, env=run_env())
    ckpt = torch.load(out, weights_only=True)
    p0, p1, m = ckpt["initial_prototypes"], ckpt["prototypes"], ckpt["movement"]
    change = float(((p1 - p0) ** 2).sum().sqrt() / (p0 ** 2).sum().sqrt())
    assert m["relative_change"] == pytest.approx(change, rel=1e-5) and change > 0
    for k in range(10):
        cos = float(p1[k] @ p0[k] / (p1[k].norm() * p0[k].norm()))
        assert m["cosine_to_initial"][k] == pytest.approx(cos, abs=1e-5)
        assert m["norms"][k] == pytest.approx(float(p1[k].norm()), rel=1e-5)
        assert m["pairwise_distances"][k][(k + 1) % 10] == pytest.approx(float((p1[k] - p1[(k + 1) % 10]).norm()),
                                                                          rel=1e-5)


def test_expected_row_norm_is_the_mean_norm_of_gaussian_rows():
    from embedding import expected_row_norm
    rows = torch.randn(200_000, 128, generator=torch.Generator().manual_seed(0))
    assert expected_row_norm(128) == pytest.approx(rows.norm(dim=1).mean().item(), abs=5e-3)
    assert expected_row_norm(128) == pytest.approx((128 - 0.5) ** 0.5, abs=1e-3)


@pytest.mark.parametrize("mode,norm", [("proto_frozen", "default"), ("random_scaled", "default"), ("proto_unfrozen", "3.5")])
def test_proto_norm_rescales_every_row_and_keeps_its_direction(tmp_path, tiny_args, mode, norm):
    from embedding import expected_row_norm
    protos = torch.randn(10, 128) * torch.linspace(1, 3, 10)[:, None]
    torch.save(protos, tmp_path / "p.pt")

    def table(extra, name):
        out = tiny_main(tiny_args, ["--mode", mode, "--path_proto", str(tmp_path / "p.pt"), "--max_steps", "1",
                                    "--lr", "1e-12", "--run_dir", str(tmp_path / name)] + extra)
        return out["cemblayer"].table.detach()

    own, scaled = table([], "own"), table(["--proto_norm", norm], "scaled")
    want = expected_row_norm(128) if norm == "default" else 3.5
    torch.testing.assert_close(scaled.norm(dim=1), torch.full((10,), want), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(F.normalize(scaled, dim=1), F.normalize(own, dim=1), rtol=1e-5, atol=1e-5)
    cfg = json.load(open(tmp_path / "scaled" / "config.json"))
    assert cfg["proto_norm"] == norm and cfg["proto_row_norm"] == pytest.approx(want)
    assert f"--proto_norm {norm}" in open(tmp_path / "scaled" / "log.txt").read()


@pytest.mark.parametrize("flags,msg", [(["--proto_norm", "default"], "not to --mode regular"),
                                       (["--mode", "proto_frozen", "--path_proto", "p.pt", "--proto_norm", "-2"],
                                        "--proto_norm must be keep, default or a number > 0")])
def test_bad_proto_norm_is_refused(tmp_path, tiny_args, flags, msg):
    with pytest.raises(UserError, match=msg):
        tiny_main(tiny_args, flags + ["--results", str(tmp_path)])
    assert not list(tmp_path.iterdir())
