"""audit.py on checkpoints of this code, of the ProtoDiffusion code (params.txt) and of the upstream CFG code
(a `num_labels + 1` table), each made here with and without a zero row; the figures checked against
ConditionalEmbedding's own forward pass."""
import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import ROOT, run_env, run_program

import audit
from cli import UserError
from embedding import ConditionalEmbedding


def embedding(rows: int, seed: int, zero_row: int | None = None) -> ConditionalEmbedding:
    torch.manual_seed(seed)
    return ConditionalEmbedding(rows, 16, 32, padding_idx=zero_row)


def trained(emb: ConditionalEmbedding, steps: int, frozen_rows: tuple[int, ...] = ()) -> dict:
    """The state dict after `steps` random updates; frozen rows only shrink, as weight decay alone moves them."""
    with torch.no_grad():
        for _ in range(steps):
            kept = emb.table[list(frozen_rows)].clone()
            for p in emb.parameters():
                p.add_(0.01 * torch.randn_like(p))
            emb.table[list(frozen_rows)] = kept * 0.999
            if emb.condEmbedding[0].padding_idx is not None:
                emb.table[emb.condEmbedding[0].padding_idx] = 0
    return {k: v.clone() for k, v in emb.state_dict().items()}


def write_run(folder, states, kind: str, classes: int) -> str:
    """A run dir (this code: config.json; original: params.txt) or the upstream code's model/ folder."""
    ckpts = os.path.join(folder, "checkpoints") if kind != "upstream" else str(folder)
    os.makedirs(ckpts, exist_ok=True)
    if kind == "ours":
        json.dump({"num_classes": classes, "cdim": 16}, open(os.path.join(folder, "config.json"), "w"))
    elif kind == "original":
        open(os.path.join(folder, "params.txt"), "w").write("inch: 3\noutch: 3\nmodch: 64\ncdim: 16\n")
    for epoch, state in enumerate(states, 1):
        ckpt = {"net": {}, "cemblayer": state, "optimizer": {}, "scheduler": {}}
        if kind == "ours":
            ckpt["ema"] = {"net": {}, "cemblayer": state, "updates": epoch}
        torch.save(ckpt, os.path.join(ckpts, f"ckpt_{epoch}_checkpoint.pt"))
    torch.save({"last_epoch": len(states)}, os.path.join(ckpts, "last_epoch.pt"))
    return str(folder)


def run_audit(*argv):
    return audit.main(audit.build_parser().parse_args([*map(str, argv)]))


@pytest.mark.parametrize("kind", ["ours", "original", "upstream"])
def test_a_zero_row_is_flagged_in_every_format_and_a_healthy_table_passes(tmp_path, kind):
    rows = 11 if kind == "upstream" else 10  # upstream: nn.Embedding(num_labels + 1, ...), labels 0-9
    emb = embedding(rows, 0, zero_row=0)
    dead = write_run(tmp_path / "dead", [trained(emb, 3), trained(emb, 3)], kind, 10)
    (report,) = run_audit(dead, "--classes", "10")
    assert report["verdict"].startswith("DEAD CLASS ROW: class(es) 0 ")
    first = report["classes_rows"][0]
    assert first["zero"] and first["norms"] == [0.0, 0.0] and first["to_mlp0"] == 0 and not first["moved"]
    # |cond - null| is |MLP(row)|: the module's own forward pass, the null condition being the zero vector
    with torch.no_grad():
        cond = emb(torch.arange(10))
    assert [r["to_null"] for r in report["classes_rows"][:10]] == pytest.approx(cond.norm(dim=1).tolist(), abs=1e-3)
    assert all(r["moved"] for r in report["classes_rows"][1:10])
    if kind == "upstream":
        assert "to_null" not in report["classes_rows"][10]  # no label reaches row 10

    healthy = embedding(rows, 1)
    ok = write_run(tmp_path / "ok", [trained(healthy, 3), trained(healthy, 3)], kind, 10)
    (report,) = run_audit(ok, "--classes", "10")
    assert report["verdict"].startswith("healthy: every class row is non-zero")
    pairwise = torch.cdist(healthy(torch.arange(10)), healthy(torch.arange(10))).fill_diagonal_(float("inf"))
    assert [r["to_nearest"] for r in report["classes_rows"][:10]] == pytest.approx(
        pairwise.min(1).values.tolist(), abs=1e-3)


def test_a_row_only_weight_decay_moved_is_frozen_and_a_frozen_table_is_named(tmp_path):
    emb = embedding(10, 2)
    still = write_run(tmp_path / "still", [trained(emb, 2, frozen_rows=(3,)), trained(emb, 2, frozen_rows=(3,))],
                      "ours", 10)
    (report,) = run_audit(still)
    assert report["verdict"].startswith("FROZEN CLASS ROW: class(es) 3 never changed direction")
    state = trained(embedding(10, 3), 1)
    frozen = write_run(tmp_path / "frozen", [state, state], "ours", 10)
    assert run_audit(frozen)[0]["verdict"].startswith("frozen table")


def test_one_file_ema_weights_and_json(tmp_path):
    run = write_run(tmp_path / "run", [trained(embedding(10, 0, zero_row=0), 1)], "ours", 10)
    path = os.path.join(run, "checkpoints", "ckpt_1_checkpoint.pt")
    r = subprocess.run([sys.executable, os.path.join(ROOT, "audit.py"), path, "--weights", "ema", "--json", "True"],
                       capture_output=True, text=True, env=run_env(), timeout=120)
    assert r.returncode == 0, r.stderr
    (report,) = json.loads(r.stdout)
    assert report["weights"] == "ema" and report["verdict"].startswith("DEAD CLASS ROW")


def test_what_cannot_be_read_is_one_error_line_and_no_code_runs(tmp_path):
    (tmp_path / "garbage.pt").write_bytes(b"not a checkpoint")
    torch.save({"net": {}}, tmp_path / "no_table.pt")
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))
    torch.save({"cemblayer": Evil()}, tmp_path / "evil.pt")
    for name, message in [("garbage.pt", "cannot read checkpoint"), ("no_table.pt", "holds no class conditioning"),
                          ("evil.pt", "cannot read checkpoint"), ("missing", "does not exist")]:
        r = run_program("audit.py", [str(tmp_path / name)])
        lines = r.stderr.strip().splitlines()
        assert r.returncode == 2 and len(lines) == 1 and message in lines[0] and "Traceback" not in r.stderr, r.stderr
    assert not marker.exists()
    with pytest.raises(UserError, match="--classes 12 but the class table"):
        run_audit(write_run(tmp_path / "run", [trained(embedding(10, 0), 1)], "ours", 10), "--classes", "12")
