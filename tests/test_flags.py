"""Every flag of every command has a rule (or an explicit "any value"), and every rule refuses a bad value with one
`error:` line before anything is written."""
import os
import subprocess
import sys

import pytest

from conftest import ROOT, run_env, run_program

import audit
import bench
import plot_fid
import sample
import structure
import study
import train
import train_classifier
from cli import UserError

SCRIPTS = {  # module, the arguments a command needs besides the flag under test
    "train.py": (train, ["--dataset", "digits"]),
    "sample.py": (sample, ["--path", "RUN"]),
    "train_classifier.py": (train_classifier, ["--dataset", "digits"]),
    "bench.py": (bench, []),
    "plot_fid.py": (plot_fid, ["RUN"]),
    "study.py": (study, ["STUDY.toml"]),
    "structure.py": (structure, ["TABLE", "--classifier", "CLF"]),
    "audit.py": (audit, ["RUN"]),
}
CASES = [(script, flag, rule.bad) for script, (module, _) in SCRIPTS.items()
         for flag, rule in module.FLAG_RULES.items() if rule.bad is not None]


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_flag_has_a_rule(script):
    module, _ = SCRIPTS[script]
    flags = {a.dest for a in module.build_parser()._actions if a.dest != "help"}
    assert flags == set(module.FLAG_RULES), (flags - set(module.FLAG_RULES), set(module.FLAG_RULES) - flags)


def option(module, flag: str) -> str:
    """The command-line spelling of a flag (its first option string)."""
    return next(a.option_strings[0] for a in module.build_parser()._actions if a.dest == flag)


@pytest.mark.parametrize("script,flag,bad", CASES, ids=[f"{s}:{f}={b}" for s, f, b in CASES])
def test_a_bad_value_is_refused_before_anything_is_written(tmp_path, monkeypatch, script, flag, bad):
    module, base = SCRIPTS[script]
    monkeypatch.chdir(tmp_path)  # default outputs are relative: nothing may appear here
    args = module.build_parser().parse_args(base + [option(module, flag), bad])
    with pytest.raises(UserError) as e:
        module.main(args)
    assert str(e.value).startswith(f"--{flag} must be "), str(e.value)
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("script,flags", [
    ("sample.py", ["--path", "RUN", "--genbatch", "0"]), ("sample.py", ["--path", "RUN", "--eta", "-1"]),
    ("train.py", ["--dataset", "digits", "--clsnum", "0"]), ("plot_fid.py", ["RUN", "--title", "t", "--out", "o.png"]),
    ("study.py", ["STUDY.toml", "--set", "epochs=2"]), ("bench.py", ["--rows", "train,fast"]),
    ("audit.py", ["RUN", "--weights", "best"]),
])
def test_one_error_line_exit_2_no_traceback_nothing_written(tmp_path, monkeypatch, script, flags):
    monkeypatch.chdir(tmp_path)
    r = run_program(script, flags)
    lines = [line for line in r.stderr.strip().splitlines() if "Warning" not in line]
    assert r.returncode == 2 and len(lines) == 1 and "error:" in lines[0] and "Traceback" not in r.stderr, r.stderr
    assert not list(tmp_path.iterdir())


def test_a_refused_flag_in_a_real_process(tmp_path):
    r = subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), "--dataset", "digits", "--clsnum", "0"],
                       capture_output=True, text=True, env=run_env(), timeout=300, cwd=tmp_path)
    lines = [line for line in r.stderr.strip().splitlines() if "Warning" not in line]
    assert r.returncode == 2 and len(lines) == 1 and "error:" in lines[0] and "Traceback" not in r.stderr, r.stderr
    assert not list(tmp_path.iterdir())
