"""The README stays short, its links resolve, and every command it shows parses with today's flags."""
import glob
import os
import re
import shlex

import pytest

from conftest import ROOT

import audit
import bench
import plot_fid
import sample
import structure
import study
import train
import train_classifier

PARSERS = {"train.py": train.build_parser, "sample.py": sample.build_parser, "bench.py": bench.build_parser,
           "train_classifier.py": train_classifier.build_parser, "plot_fid.py": plot_fid.build_parser,
           "study.py": study.build_parser, "structure.py": structure.build_parser,
           "audit.py": audit.build_parser}
PLACEHOLDERS = {"E": "1", "NODE": "0", "HOST:29500": "localhost:29500", "P": "p.pt", "CLF": "clf.pt"}
DOCS = [os.path.join(ROOT, "README.md")] + sorted(glob.glob(os.path.join(ROOT, "docs", "*.md")))


def commands(path: str) -> list[list[str]]:
    """The command lines of a markdown file's code blocks, continuation lines joined, comments dropped."""
    blocks = re.findall(r"```bash\n(.*?)```", open(path).read(), re.S)
    lines = "\n".join(blocks).replace("\\\n", " ").splitlines()
    return [shlex.split(line, comments=True) for line in lines if line.strip()]


def test_the_readme_is_short_and_opens_with_the_two_commands():
    text = open(os.path.join(ROOT, "README.md")).read()
    assert len(text.encode()) <= 15_500
    first = [c for c in commands(os.path.join(ROOT, "README.md"))][:2]
    assert first == [["bash", "scripts/quickstart.sh"], ["bash", "scripts/test.sh"]]


@pytest.mark.parametrize("path", DOCS, ids=[os.path.relpath(p, ROOT) for p in DOCS])
def test_links_resolve_and_commands_parse(path):
    text = open(path).read()
    for target in re.findall(r"\]\(([^)#]+)\)", text):
        if not target.startswith("http"):
            assert os.path.exists(os.path.join(os.path.dirname(path), target)), target
    for words in commands(path):
        for w in words:
            if w.startswith("scripts/"):
                assert os.path.isfile(os.path.join(ROOT, w)), w
        script = next((w for w in words if w in PARSERS), None)
        if script is None:
            continue
        args = [PLACEHOLDERS.get(w, w) for w in words[words.index(script) + 1:] if w != "..."]
        PARSERS[script]().parse_args(args)  # argparse exits (a test failure) on an unknown or malformed flag
