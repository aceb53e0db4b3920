import os
import subprocess
import sys
import tempfile

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
torch.set_num_threads(1 if os.environ.get("PYTEST_XDIST_WORKER") else 2)  # two workers share the 2 cores
os.environ["PROTODIFFUSION_CACHE"] = tempfile.mkdtemp(prefix="protodiffusion_cache_")  # not the user's ~/.cache

# the smallest UNet the code accepts, on native 8x8 one-channel digits
TINY = ["--dataset", "digits", "--modch", "32", "--chmul", "1,2", "--numres", "1", "--batchsize", "64",
        "--ddim", "True", "--num_steps", "3", "--genbatch", "10", "--log_every", "5"]


@pytest.fixture
def tiny_args():
    return list(TINY)


def run_env() -> dict:
    """Environment for subprocesses: the repo importable, no network-bound downloads, few threads."""
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    return env


@pytest.fixture(scope="session")
def inductor_cache(tmp_path_factory):
    """One inductor cache for the suite's compiled subprocess runs: the first pays a cold compile, the rest of the
    same graph reuse it (tests/test_gpu_check.py: scripts/gpu_check.sh's CPU run)."""
    return str(tmp_path_factory.mktemp("inductor"))


@pytest.fixture
def compiled_graphs(monkeypatch):
    """torch.compile with a backend that runs each graph as traced and records it as "network" (convolutions) or
    "noise": the list of graphs compiled so far, starting empty (no code cached from earlier tests)."""
    import functools
    graphs = []

    def counting(gm, example_inputs):
        graphs.append("network" if "conv2d" in str(gm.graph) else "noise")
        return gm.forward

    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend=counting))
    torch._dynamo.reset()
    return graphs


def run_program(script: str, args: list[str], env: dict | None = None) -> subprocess.CompletedProcess:
    """A program's command line run in this process as `python script args` runs it (run_cli: parse, main, the
    one-line error path), with `env` added to the environment: its exit status, stdout and stderr. A subprocess
    costs seconds of imports; the tests that are about processes (torchrun, signals, scripts) keep them."""
    import contextlib
    import importlib
    import io
    from unittest import mock
    from cli import run_cli
    module = importlib.import_module(script[:-len(".py")])
    out, err = io.StringIO(), io.StringIO()
    code = 0
    with mock.patch.object(sys, "argv", [os.path.join(ROOT, script)] + list(args)), \
            mock.patch.dict(os.environ, env or {}), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            run_cli(module.main, module.build_parser())
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 1
    return subprocess.CompletedProcess([script, *args], code, out.getvalue(), err.getvalue())
