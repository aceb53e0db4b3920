"""Every command imports and runs where pytorch-fid is missing (the lent GPU image has none); only Inception FID
needs it, and says so in one line."""
import os
import subprocess
import sys

import pytest

from conftest import ROOT, TINY, run_env

ENTRY_POINTS = ["train", "sample", "bench", "evaluate", "fid", "train_classifier", "structure", "plot_fid",
                "study", "study_report", "study_records", "study_stats", "study_run", "prototypes", "checkpoints",
                "fashion_mnist"]


@pytest.fixture(scope="module")
def no_pytorch_fid(tmp_path_factory):
    """An environment in which `import pytorch_fid` fails, as where it is not installed."""
    shadow = tmp_path_factory.mktemp("shadow")
    (shadow / "pytorch_fid").mkdir()
    (shadow / "pytorch_fid" / "__init__.py").write_text("raise ImportError('No module named pytorch_fid')\n")
    return dict(run_env(), PYTHONPATH=os.pathsep.join([str(shadow), ROOT]))


def run(env, args, **kw):
    return subprocess.run([sys.executable] + args, capture_output=True, text=True, env=env, cwd=ROOT, timeout=600,
                          **kw)


def test_the_shadow_really_hides_pytorch_fid(no_pytorch_fid):
    r = run(no_pytorch_fid, ["-c", "import pytorch_fid"])
    assert r.returncode != 0 and "No module named pytorch_fid" in r.stderr


def test_every_entry_point_imports_without_pytorch_fid(no_pytorch_fid):
    r = run(no_pytorch_fid, ["-c", "; ".join(f"import {m}" for m in ENTRY_POINTS)])
    assert r.returncode == 0, r.stderr[-2000:]


def test_training_and_proto_fid_run_and_inception_fid_says_what_to_install(no_pytorch_fid, tmp_path):
    run_dir = tmp_path / "run"
    r = run(no_pytorch_fid, ["train.py"] + TINY + ["--epoch", "1", "--batchsize", "512", "--run_dir", str(run_dir)])
    assert r.returncode == 0, r.stderr[-2000:]
    r = run(no_pytorch_fid, ["sample.py", "--path", str(run_dir), "--epoch", "1", "--ddim", "True", "--num_steps", "2",
                             "--genum", "10", "--fid", "True", "--out", str(tmp_path / "s")])
    lines = [line for line in r.stderr.strip().splitlines() if "Warning" not in line]
    assert r.returncode == 2 and len(lines) == 1 and "pip install pytorch-fid" in lines[0], r.stderr[-2000:]


def test_the_inception_file_name_is_pytorch_fids():
    from pytorch_fid import inception
    from fid import INCEPTION_FILE
    assert inception.FID_WEIGHTS_URL.endswith("/" + INCEPTION_FILE)
