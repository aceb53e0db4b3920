"""Run dirs and checkpoint files: where a run lives on disk, what a checkpoint holds, how a run resumes and how its
models come back.

A run dir holds `config.json`, `log.txt`, `metrics.jsonl`, `samples/` and `checkpoints/ckpt_{epoch}_checkpoint.pt`
(the original's name) or `step_{global step}_checkpoint.pt`, plus `last_epoch.pt`, which names the newest. With
--keep_last K every saved epoch also gets `weights_{epoch}.pt`, the weights sampling needs (a quarter of a full
state), and only the newest K full states stay.
The original code's run dirs (`params.txt` + its checkpoints) are read too.
"""
import glob
import json
import os
import random
import re
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from cli import UserError, write_atomic
from compat import Compat
from distributed import Dist, broadcast_object, seed_everything
from ema import EMA
from embedding import ConditionalEmbedding
from unet import Unet

NATIVE_SIZE = {"cifar10": 32, "stl10": 96, "tiny-imagenet": 64, "digits": 8, "fashion_mnist": 28}


def new_run_dir(results: str, mode: str, dataset: str) -> str:
    """results/{mode}/{dataset}/{timestamp}, with a numeric suffix if that name is taken; created empty."""
    base = os.path.join(results, mode, dataset, time.strftime("%Y-%m-%d_%H-%M-%S"))
    path, k = base, 1
    while True:
        try:
            os.makedirs(path)
            return path
        except FileExistsError:
            path, k = f"{base}-{k}", k + 1


def save_atomic(obj: Any, path: str) -> None:
    """torch.save through cli.write_atomic: a reader never sees half a file, a failed write raises OSError."""
    write_atomic(path, lambda f: torch.save(obj, f))


def load_file(path: str, what: str = "checkpoint") -> Any:
    """torch.load(weights_only=True) on CPU; a missing, truncated or foreign file becomes a UserError."""
    if not os.path.isfile(path):
        raise UserError(f"{what} {path} does not exist")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"cannot read {what} {path}: it is truncated, corrupt or not a weights-only torch file "
                        f"({first})") from None


def rng_state() -> dict:
    """All global RNG states, in a form torch.load(weights_only=True) accepts."""
    np_state = np.random.get_state()
    return {"python": list(random.getstate()[1]), "numpy": torch.from_numpy(np_state[1].astype(np.int64)),
            "numpy_pos": int(np_state[2]), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_rng_state(state: dict) -> None:
    """Restore what rng_state() captured."""
    random.setstate((3, tuple(state["python"]), None))
    np.random.set_state(("MT19937", state["numpy"].numpy().astype(np.uint32), state["numpy_pos"], 0, 0.0))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def build_models(cfg: dict) -> tuple[Unet, ConditionalEmbedding]:
    """The UNet and the class embedding described by a run config (freshly initialised)."""
    net = Unet(in_ch=cfg["inch"], mod_ch=cfg["modch"], out_ch=cfg["outch"], ch_mul=cfg["chmul"],
               num_res_blocks=cfg["numres"], cdim=cfg["cdim"], use_conv=cfg["useconv"], droprate=cfg["droprate"])
    padding_idx = Compat.of(cfg.get("compat"), cfg.get("dataset")).padding_idx
    return net, ConditionalEmbedding(cfg["num_classes"], cfg["cdim"], cfg["cdim"], padding_idx)


def original_config(path: str, state: dict) -> dict:
    """A run config from the original code's params.txt (`key: value` lines) and its checkpoint's shapes."""
    raw = dict(line.rstrip("\n").split(":", 1) for line in open(path) if ":" in line)
    raw = {k.strip(): v.strip() for k, v in raw.items()}
    dataset = raw.get("dataset", "cifar10")
    size = int(raw.get("image_size", -1))
    return {"inch": int(raw["inch"]), "outch": int(raw["outch"]), "modch": int(raw["modch"]),
            "chmul": [int(m) for m in re.findall(r"\d+", raw["chmul"])], "numres": int(raw["numres"]),
            "cdim": int(raw["cdim"]), "useconv": raw.get("useconv", "True") == "True",
            "droprate": float(raw.get("droprate", 0.1)), "T": int(raw.get("T", 1000)), "schedule": "linear",
            "v": 1.0, "w": float(raw.get("w", 1.8)), "dataset": dataset,
            "image_size": size if size > 0 else NATIVE_SIZE.get(dataset, 32),
            "num_classes": state["cemblayer"]["condEmbedding.0.weight"].shape[0],
            "tiny_imagenet_path": raw.get("tiny_imagenet_path") if raw.get("tiny_imagenet_path") != "None" else None}


def run_models(run_dir: str, state: dict, weights: str = "raw") -> tuple[Unet, ConditionalEmbedding, dict]:
    """(net, cemblayer, config) of any run dir, ours (config.json) or the original's (params.txt), holding a
    checkpoint's raw or EMA weights; resume and sampling both rebuild models through here."""
    if os.path.isfile(os.path.join(run_dir, "config.json")):
        cfg = json.load(open(os.path.join(run_dir, "config.json")))
    elif os.path.isfile(os.path.join(run_dir, "params.txt")):
        cfg = original_config(os.path.join(run_dir, "params.txt"), state)
    else:
        raise UserError(f"{run_dir} has neither config.json (this code) nor params.txt (the original code)")
    source = state["ema"] if weights == "ema" else state
    net, cemblayer = build_models(cfg)
    net.load_state_dict(source["net"])
    cemblayer.load_state_dict(source["cemblayer"])
    return net, cemblayer, cfg


def saved_epochs(path: str) -> list[int]:
    """The epochs a run dir can sample (ckpt_{epoch}_checkpoint.pt or weights_{epoch}.pt), in order."""
    names = (os.path.basename(f) for f in glob.glob(os.path.join(path, "checkpoints", "*.pt")))
    return sorted({int(m.group(1) or m.group(2)) for f in names
                   if (m := re.fullmatch(r"ckpt_(\d+)_checkpoint\.pt|weights_(\d+)\.pt", f))})


def saved_steps(path: str) -> list[int]:
    """The global steps a run dir can sample (weights_step_{step}.pt, written at train.py --save_steps), in order."""
    names = (os.path.basename(f) for f in glob.glob(os.path.join(path, "checkpoints", "weights_step_*.pt")))
    return sorted(int(m.group(1)) for f in names if (m := re.fullmatch(r"weights_step_(\d+)\.pt", f)))


def epoch_state(path: str, epoch: int, weights: str | None, step: int | None = None) -> tuple[dict, str]:
    """(checkpoint or weights file, weights to use) of a run dir's saved epoch, or with `step` its saved global
    step; `weights` None means EMA when saved."""
    if not os.path.isdir(path):
        raise UserError(f"--path {path} is not a directory")
    ckpt_path = os.path.join(path, "checkpoints", f"ckpt_{epoch}_checkpoint.pt")
    if step is not None:
        ckpt_path = os.path.join(path, "checkpoints", f"weights_step_{step}.pt")
        if not os.path.isfile(ckpt_path):
            raise UserError(f"no weights for step {step} in {path}/checkpoints; saved steps (train.py --save_steps): "
                            f"{', '.join(map(str, saved_steps(path))) or 'none'}")
    if not os.path.isfile(ckpt_path):
        ckpt_path = os.path.join(path, "checkpoints", f"weights_{epoch}.pt")
    if not os.path.isfile(ckpt_path):
        raise UserError(f"no checkpoint for epoch {epoch} in {path}/checkpoints; saved epochs: "
                        f"{', '.join(map(str, saved_epochs(path))) or 'none'}")
    state = load_file(ckpt_path)
    if weights is None:
        weights = "ema" if "ema" in state else "raw"
    if weights == "ema" and "ema" not in state:
        raise UserError(f"{ckpt_path} holds no EMA weights (the original code kept none, and a weights file of a "
                        "--compat raw_weights run keeps the raw ones); use --weights raw")
    if weights == "raw" and "net" not in state:
        raise UserError(f"{ckpt_path} holds the EMA weights only (a --keep_last run keeps full states for its newest "
                        "epochs); use --weights ema")
    return state, weights


def load_run(path: str, epoch: int, weights: str | None, step: int | None = None
             ) -> tuple[Unet, ConditionalEmbedding, dict, str]:
    """(net, cemblayer, config, weights used) of a run dir at a saved epoch (or step); `weights` None means EMA if
    saved."""
    state, weights = epoch_state(path, epoch, weights, step)
    net, cemblayer, cfg = run_models(path, state, weights)
    return net.eval(), cemblayer.eval(), cfg, weights


def load_epoch(net: Unet, cemblayer: ConditionalEmbedding, path: str, epoch: int, weights: str | None,
               step: int | None = None) -> dict:
    """Copy a saved epoch's (or with `step` a saved step's) weights into the models in place (a compiled network
    keeps its graph); returns the position: epoch (of a step, the epochs it has trained, a fraction), global_step
    (None for the original code's files) and the weights used."""
    state, used = epoch_state(path, epoch, weights, step)
    source = state["ema"] if used == "ema" else state
    net.load_state_dict(source["net"])
    cemblayer.load_state_dict(source["cemblayer"])
    return {"epoch": epoch if step is None else state["epoch"], "global_step": state.get("global_step"),
            "weights": used}


@dataclass
class TrainState:
    """Everything a checkpoint holds besides the position in the data and the RNG states."""
    models: nn.ModuleDict  # "net" and "cemblayer", the plain modules (never the compiled or DDP wrappers)
    ema: EMA
    optimizer: torch.optim.Optimizer
    scheduler: Any
    scaler: torch.amp.GradScaler

    def state_dict(self) -> dict:
        """The original's `net` and `cemblayer` keys, then ours."""
        m, e = self.models, self.ema.module
        return {"net": m["net"].state_dict(), "cemblayer": m["cemblayer"].state_dict(),
                "ema": {"net": e["net"].state_dict(), "cemblayer": e["cemblayer"].state_dict(),
                        "updates": self.ema.updates},
                "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                "scaler": self.scaler.state_dict()}

    def load_state_dict(self, ckpt: dict) -> None:
        """Everything but the models' live weights (run_models loads those before the optimizer is built)."""
        self.ema.module["net"].load_state_dict(ckpt["ema"]["net"])
        self.ema.module["cemblayer"].load_state_dict(ckpt["ema"]["cemblayer"])
        self.ema.updates = ckpt["ema"]["updates"]
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scaler.load_state_dict(ckpt["scaler"])
        self.scheduler.load_state_dict(ckpt["scheduler"])


def latest_checkpoint(run_dir: str) -> str:
    """The newest checkpoint of a run dir, as named by checkpoints/last_epoch.pt."""
    ckpt_dir = os.path.join(run_dir, "checkpoints")
    marker = load_file(os.path.join(ckpt_dir, "last_epoch.pt"), "resume marker")
    if not isinstance(marker, dict) or "last_epoch" not in marker:
        raise UserError(f"{ckpt_dir}/last_epoch.pt is not a resume marker")
    return os.path.join(ckpt_dir, marker.get("file", f"ckpt_{marker['last_epoch']}_checkpoint.pt"))


def save_checkpoint(run_dir: str, state: TrainState, epoch: int, step: int, steps_per_epoch: int, cfg: dict,
                    world: int, keep_last: int, weights: str = "ema", step_weights: bool = False) -> str:
    """Rank 0 writes the state after `step` steps of epoch index `epoch` (step 0: `epoch` epochs are done).

    Epoch checkpoints are ckpt_{epoch}_checkpoint.pt (the original's name), others step_{global}_checkpoint.pt;
    last_epoch.pt names the newest and is replaced only after it is safely on disk. Every rank hands in its
    RNG state, so a resumed run continues bit for bit. With keep_last K, an epoch also gets weights_{epoch}.pt
    (the `weights` sampling uses, ema or raw) and only the newest K full states are kept; with step_weights (a
    --save_steps point) the global step gets weights_step_{global}.pt, whatever K is.
    """
    states = [None] * world
    if world > 1:
        dist.all_gather_object(states, rng_state())
    else:
        states = [rng_state()]
    global_step = epoch * steps_per_epoch + step
    name = f"ckpt_{epoch}_checkpoint.pt" if step == 0 else f"step_{global_step}_checkpoint.pt"
    ckpt_dir = os.path.join(run_dir, "checkpoints")
    if int(os.environ.get("RANK", 0)) != 0:
        return os.path.join(ckpt_dir, name)
    ckpt = dict(state.state_dict(), epoch=epoch, step=step, global_step=global_step, rng=states, config=cfg)
    try:
        part = {"ema": {k: v for k, v in ckpt["ema"].items() if k != "updates"}} if weights == "ema" else \
            {"net": ckpt["net"], "cemblayer": ckpt["cemblayer"]}
        if keep_last > 0 and step == 0:  # the epoch's sampling weights outlive its full state
            save_atomic(dict(part, epoch=epoch, global_step=global_step, config=cfg),
                        os.path.join(ckpt_dir, f"weights_{epoch}.pt"))
        if step_weights:
            save_atomic(dict(part, epoch=global_step / steps_per_epoch, global_step=global_step, config=cfg),
                        os.path.join(ckpt_dir, f"weights_step_{global_step}.pt"))
        save_atomic(ckpt, os.path.join(ckpt_dir, name))
        save_atomic({"last_epoch": epoch, "file": name}, os.path.join(ckpt_dir, "last_epoch.pt"))
    except OSError as e:
        raise UserError(f"could not write checkpoint {os.path.join(ckpt_dir, name)} ({e.strerror or e}); the "
                        "checkpoints already on disk are unchanged") from None
    if keep_last > 0:
        def global_step_of(f: str) -> int:
            kind, number = f.split("_")[:2]
            return int(number) * steps_per_epoch if kind == "ckpt" else int(number)
        saved = sorted((f for f in os.listdir(ckpt_dir) if f.endswith("_checkpoint.pt")), key=global_step_of)
        for old in saved[:-keep_last]:
            os.remove(os.path.join(ckpt_dir, old))
    return os.path.join(ckpt_dir, name)


def make_run_dir(results: str, mode: str, dataset: str, run_dir: str | None, cfg: dict, d: Dist, fresh: bool) -> str:
    """Rank 0 creates the run dir (`run_dir`, or a new one under `results`) with its config, and tells the others."""
    run_dir = run_dir or broadcast_object(new_run_dir(results, mode, dataset) if d.is_main else None)
    if d.is_main:
        os.makedirs(os.path.join(run_dir, "checkpoints"), exist_ok=True)
        os.makedirs(os.path.join(run_dir, "samples"), exist_ok=True)
        if fresh:
            with open(os.path.join(run_dir, "config.json"), "w") as f:
                json.dump(cfg, f, indent=2)
    return run_dir


def read_resume(run_dir: str, args: Any, keep: tuple[str, ...], given: set[str], may_change: tuple[str, ...]
                ) -> tuple[dict, dict]:
    """The run's newest checkpoint, and its own flags back into args: every flag but `keep` (this invocation's)
    comes from config.json. A flag in `given` (the command line's) must equal the run's, unless it is in
    `may_change`; returns (checkpoint, {flag: (the run's value, the new one)} of the changes)."""
    if not os.path.isfile(os.path.join(run_dir, "config.json")):
        raise UserError(f"--path_resume {run_dir} is not a run dir of this code (no config.json)")
    saved = json.load(open(os.path.join(run_dir, "config.json")))
    changes, clashes = {}, []
    for key, value in saved.items():
        if key in keep or key not in vars(args):
            continue
        mine = getattr(args, key)
        native = key == "image_size" and mine == -1  # config.json holds the size -1 stood for
        if key in given and mine != value and not native:
            if key in may_change:
                changes[key] = (value, mine)
                continue
            clashes.append(f"--{key} {mine} (the run has {value})")
        setattr(args, key, value)
    if clashes:
        raise UserError(f"{run_dir} continues with its own flags (config.json) and the command line differs: "
                        f"{'; '.join(clashes)}; drop them, or start a new run dir")
    return load_file(latest_checkpoint(run_dir)), changes


def restore(state: TrainState, resume: dict, seed: int, d: Dist, say: Any) -> tuple[int, int]:
    """Optimizer, schedule, EMA and RNG states of a checkpoint; (epoch index, step inside it) to go on from."""
    state.load_state_dict(resume)
    start_epoch, skip = resume["epoch"], resume["step"]
    if len(resume["rng"]) == d.world:
        set_rng_state(resume["rng"][d.rank])
    else:  # the data shards differ too, so the continuation is sound but not bit-identical
        seed_everything((seed + 1 + start_epoch) * d.world + d.rank)
        say(f"the checkpoint was written by {len(resume['rng'])} process(es), this run has {d.world}: "
            "continuing with fresh per-rank seeds (not bit-identical to an uninterrupted run)")
    return start_epoch, skip
