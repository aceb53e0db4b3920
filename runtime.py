"""What every script shares: flag parsing helpers, clear errors, DDP setup, the fast-path settings, seeding, stop
signals and the run log. Run dirs and checkpoint files live in checkpoints.py."""
import argparse
import json
import math
import os
import random
import signal
import sys
import time
import traceback
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch
import torch.distributed as dist


class UserError(Exception):
    """A mistake the user can fix; reported as one `error:` line, without a traceback."""


def str2bool(s: str) -> bool:
    """argparse type accepting True/False/1/0/yes/no (any case)."""
    v = str(s).strip().lower()
    if v in ("true", "1", "yes", "y"):
        return True
    if v in ("false", "0", "no", "n"):
        return False
    raise argparse.ArgumentTypeError(f"expected True/False/1/0, got '{s}'")


def int_list(s: str) -> list[int]:
    """argparse type for lists like `1,2,4,4` (also `[1,2,4,4]` and `1 2 4 4`)."""
    try:
        return [int(p) for p in s.strip("[]() ").replace(",", " ").split()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected integers like 1,2,4,4, got '{s}'") from None


COMPILE_MODES = ("default", "max-autotune-no-cudagraphs", "reduce-overhead")


@dataclass(frozen=True)
class Rule:
    """A flag's valid values: the test, the values in words (for the error line), and a value on the command
    line that breaks the rule (None: every value is valid), which tests/test_flags.py tries on every flag."""
    ok: Callable[[Any], bool]
    valid: str
    bad: str | None


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


ANY = Rule(lambda v: True, "any value", None)  # paths, titles and str2bool flags (argparse checks those)


def finite() -> Rule:
    return Rule(_finite, "a finite number", "nan")


def at_least(lo: float) -> Rule:
    return Rule(lambda v: _finite(v) and v >= lo, f">= {lo}", str(lo - 1))


def above(lo: float) -> Rule:
    return Rule(lambda v: _finite(v) and v > lo, f"> {lo}", str(lo))


def between(lo: float, hi: float, below_hi: bool = False) -> Rule:
    """[lo, hi], or [lo, hi) with below_hi."""
    if below_hi:
        return Rule(lambda v: _finite(v) and lo <= v < hi, f"in [{lo}, {hi})", str(hi))
    return Rule(lambda v: _finite(v) and lo <= v <= hi, f"in [{lo}, {hi}]", str(hi + 1))


def one_of(*choices: str) -> Rule:
    return Rule(lambda v: v in choices, f"one of {', '.join(choices)}", "unknown")


def unset_or(rule: Rule, unset: str) -> Rule:
    """None (the flag left out, which means `unset`) or a value the rule accepts."""
    return Rule(lambda v: v is None or rule.ok(v), f"{rule.valid} (left out: {unset})", rule.bad)


NATIVE_OR_SIZE = Rule(lambda v: v == -1 or (_finite(v) and v >= 1), "-1 (native size) or >= 1", "0")
POSITIVE_LIST = Rule(lambda v: len(v) > 0 and all(_finite(m) and m >= 1 for m in v), "positive integers like 1,2,4,4",
                     "0")
def _auto_or_bool(v: Any) -> bool:
    if str(v).strip().lower() == "auto":
        return True
    try:
        str2bool(v)
        return True
    except argparse.ArgumentTypeError:
        return False


AUTO_OR_BOOL = Rule(_auto_or_bool, "auto, True or False", "maybe")
DEVICE = one_of("auto", "cuda", "cpu")
DIST_BACKEND = one_of("auto", "nccl", "gloo")
COMPILE_MODE = Rule(lambda v: v in COMPILE_MODES, f"one of {', '.join(COMPILE_MODES)}", "fastest")
AMP = one_of("auto", "bf16", "fp16", "none")
COMPILE_SCOPE = one_of("whole", "regional")


def check_flags(args: argparse.Namespace, rules: dict[str, Rule]) -> None:
    """Refuse the first flag outside its valid values, naming the flag and the values (nan and inf never pass)."""
    for flag, rule in rules.items():
        value = getattr(args, flag)
        if not rule.ok(value):
            raise UserError(f"--{flag} must be {rule.valid}; got {value}")


def run_cli(main: Callable[[argparse.Namespace], Any], parser: argparse.ArgumentParser) -> None:
    """Parse flags and run main; a UserError (or missing file) becomes one `error:` line and exit code 2.

    In a torchrun job the line comes from the first rank that fails, whichever it is: every rank that raises the
    same agreed error, and every rank that fails only because another one left, stays silent.
    """
    parser.add_argument("--debug", type=str2bool, default=False, help="show full tracebacks instead of one-line errors")
    args = parser.parse_args()
    try:
        main(args)
    except (UserError, FileNotFoundError) as e:
        if args.debug:
            raise
        if first_failure():
            print(f"{parser.prog}: error: {e}", file=sys.stderr)
        sys.exit(2)
    except Exception:
        if args.debug:
            raise
        if first_failure():
            traceback.print_exc()
        sys.exit(1)


_JOB_STORE: Any = None  # the torchrun job's key-value store once this process has joined it


def first_failure() -> bool:
    """Whether this process is the job's first to fail (always, alone; rank 0 before the job is joined)."""
    if _JOB_STORE is None:
        return int(os.environ.get("RANK", 0)) == 0
    try:
        return _JOB_STORE.add("failures", 1) == 1
    except Exception:  # the store went away with the job: say it rather than nothing
        return True


@dataclass
class Dist:
    """This process's place in the job."""
    rank: int
    world: int
    local_rank: int
    device: torch.device
    control: Any = None  # the gloo group for CPU-side flags and agreements (None: one process)

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup_distributed(device: str = "auto", backend: str = "auto") -> Dist:
    """Join the torchrun job if there is one (NCCL on CUDA, gloo on CPU, or `backend`); LOCAL_RANK picks the GPU
    (modulo the GPUs visible, so that a gloo job can put two ranks on one card)."""
    global _JOB_STORE
    world = int(os.environ.get("WORLD_SIZE", 1))
    rank = int(os.environ.get("RANK", 0))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        if not torch.cuda.is_available():
            raise UserError("--device cuda was asked for but no CUDA device is visible")
        torch.cuda.set_device(local_rank % torch.cuda.device_count())
        dev = torch.device("cuda", local_rank % torch.cuda.device_count())
    elif device == "cpu":
        dev = torch.device("cpu")
    else:
        raise UserError(f"unknown --device '{device}' (choose auto, cuda or cpu)")
    if backend == "auto":
        backend = "nccl" if dev.type == "cuda" else "gloo"
    if backend == "nccl" and dev.type != "cuda":
        raise UserError("--dist_backend nccl needs CUDA devices; use gloo on CPU")
    control = None
    if world > 1 and not dist.is_initialized():
        store, rank, world = next(dist.rendezvous("env://"))
        dist.init_process_group(backend, store=store, rank=rank, world_size=world)
        _JOB_STORE = dist.PrefixStore("protodiffusion/", store)
        # stop flags and agreements travel on their own CPU group: no GPU sync, and never queued behind DDP
        control = dist.new_group(backend="gloo")
    return Dist(rank, world, local_rank, dev, control)


def teardown_distributed() -> None:
    """Leave the process group, if any."""
    global _JOB_STORE
    if dist.is_initialized():
        dist.destroy_process_group()
    _JOB_STORE = None


def first_rank_failure(reason: str | None, group: Any = None) -> str | None:
    """Every rank of `group`'s answer to "did any rank fail?": None if none did, else the lowest failing rank's
    reason (group None: this process's own reason, no collective)."""
    if group is None:
        return reason
    reasons = [None] * dist.get_world_size(group)
    dist.all_gather_object(reasons, reason, group=group)
    return next((f"rank {rank}: {r}" for rank, r in enumerate(reasons) if r is not None), None)


def broadcast_object(obj: Any) -> Any:
    """Rank 0's value of obj on every rank."""
    if not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "none": None}


@dataclass
class FastPath:
    """The speed settings of a run, with 'auto' resolved per device: everything on CUDA; fp32 eager on CPU."""
    amp: torch.dtype | None
    compile: bool
    channels_last: bool
    compile_mode: str = "default"  # torch.compile's mode; reduce-overhead adds CUDA graphs
    compile_scope: str = "whole"  # the training loss as one graph, or only the UNet's repeated blocks (regional)

    @property
    def cudagraphs(self) -> bool:
        """Whether compiled calls replay CUDA graphs (their outputs are overwritten by the next call)."""
        return self.compile and self.compile_mode == "reduce-overhead"

    def autocast(self, device: torch.device) -> torch.autocast:
        """Mixed precision for forward passes (a no-op when amp is off)."""
        return torch.autocast(device.type, dtype=self.amp or torch.float32, enabled=self.amp is not None)


def resolve_fast_path(amp: str, compile: str, channels_last: str, device: torch.device,
                      compile_mode: str = "default", compile_scope: str = "whole") -> FastPath:
    """Turn the --amp / --compile / --channels_last / --compile_mode flags into settings for `device`.

    On CPU, channels_last is on by default: it measured faster for this UNet at 8x8, 16x16 and 32x32
    (docs/performance.md); compile is off (minutes of compilation, and it measured slower than
    channels_last eager) and so is bf16 (the CPU path stays fp32).
    """
    cuda = device.type == "cuda"
    if amp == "auto":
        amp = "bf16" if cuda else "none"
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = True  # TF32 for the fp32 matmuls and convs that remain
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True  # every training shape is fixed, so each is tuned once
    use_compile = cuda if str(compile).lower() == "auto" else str2bool(compile)  # values checked by AUTO_OR_BOOL
    use_channels_last = True if str(channels_last).lower() == "auto" else str2bool(channels_last)
    return FastPath(AMP_DTYPES[amp], use_compile, use_channels_last, compile_mode, compile_scope)


def compile_or_eager(module: torch.nn.Module, probe: Callable[[torch.nn.Module], Any], device: torch.device,
                     say: Callable[[str], None], mode: str = "default", name: str = "network",
                     group: Any = None, regions: list[torch.nn.Module] | None = None) -> tuple[torch.nn.Module, dict]:
    """torch.compile(module) proven by `probe` (what the first real calls run, backward included), or the plain
    module, with one line, if the probe fails on this rank or, in a job, on any rank. Returns the module to call and
    the outcome's record (network, compiled, mode, scope, seconds, reason). `group`: the ranks that must agree (every
    rank of a DDP job; None: this process decides alone). `regions`: compile only these submodules, in place
    (regional compilation: blocks of the same shapes share one compiled graph), and call `module` around them.

    torch.compile is lazy, so a missing compiler or an unsupported op would otherwise surface in the first real call,
    possibly on one rank only. The probe runs with the RNG forked and its gradients discarded, so the run that
    follows is the same as without it, and its time is the compile time. With CUDA graphs (reduce-overhead) it runs
    three times (warm-up, record, replay), so the graphs are captured inside it. A failure resets nothing global:
    other networks' compiled graphs stay.
    """
    # shapes are fixed; a symbolic-shape recompile takes minutes
    options = {"dynamic": False, "mode": None if mode == "default" else mode}
    if regions is None:
        compiled = torch.compile(module, **options)
    else:
        for region in regions:
            region.compile(**options)
        compiled = module
    t0 = time.time()
    reason = None
    try:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            for _ in range(3 if mode == "reduce-overhead" else 1):
                if mode == "reduce-overhead":
                    torch.compiler.cudagraph_mark_step_begin()
                probe(compiled)
    except Exception as e:
        reason = f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:200]}"
    finally:
        module.zero_grad(set_to_none=True)
    seconds = time.time() - t0
    reason = first_rank_failure(reason, group)  # a rank that runs compiled beside an eager one breaks DDP
    scope = "whole" if regions is None else "regional"
    outcome = {"network": name, "compiled": reason is None, "mode": mode, "scope": scope,
               "seconds": round(seconds, 2), "reason": reason}
    if reason is None:
        say(f"torch.compile ({mode}, {scope}) of the {name}: compiled in {seconds:.1f} s")
        return compiled, outcome
    for region in regions or []:
        region._compiled_call_impl = None  # what nn.Module.compile set: the region runs eager again
    say(f"torch.compile of the {name} failed ({reason}); continuing eager (--compile False skips the attempt)")
    return module, outcome


def load_compile_cache(path: str, say: Callable[[str], None]) -> None:
    """Fill this process's compile caches from a portable artifact file written by save_compile_cache (PyTorch's
    "Mega-Cache"), so that a resume on another machine compiles warm; entries of another torch or device are
    ignored by torch itself."""
    if not os.path.isfile(path):
        return
    try:
        info = torch.compiler.load_cache_artifacts(open(path, "rb").read())
    except Exception as e:  # a cache is an optimisation: a bad one costs a cold compile, nothing more
        say(f"compile cache {path} not used ({type(e).__name__}); compiling cold")
        return
    count = sum(len(v) for v in info.artifacts.values()) if info is not None else 0
    say(f"compile cache: {count} artifact(s) from {path}")


def save_compile_cache(path: str) -> None:
    """Write every compile artifact of this process so far to `path` (atomically), for load_compile_cache."""
    artifacts = torch.compiler.save_cache_artifacts()
    if artifacts is None:
        return
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(artifacts[0])
    os.replace(tmp, path)


def adamw(params: list, lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW with the fused kernel (CUDA and CPU; 4x faster than the for-loop one for the paper's UNet on CPU)."""
    try:
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=True)
    except (RuntimeError, TypeError):
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (CPU and every CUDA device)."""
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)


class StopSignal:
    """Remembers SIGTERM / SIGUSR1 (cluster preemption) so that training can stop at a step boundary."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self, world: int = 1, group: Any = None):
        self.received: str | None = None
        self.world, self.group = world, group
        self.flag, self.pending = torch.zeros(1), None
        self.previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}

    def _handle(self, signum: int, frame: Any) -> None:
        self.received = signal.Signals(signum).name

    def poll(self) -> bool:
        """Called once per step by every rank: True on every rank at the same step, once any rank has a signal.

        Several processes: each call reads the all-reduce that the previous call started and starts the next one,
        on the CPU group, so no step waits for the network or reads the GPU; a signal is acted on one step after
        the step it arrived in, on every rank.
        """
        if self.world == 1:
            return self.received is not None
        stop = False
        if self.pending is not None:
            self.pending.wait()
            stop = bool(self.flag.item())
        if not stop:
            self.flag = torch.tensor([1 if self.received else 0])
            self.pending = dist.all_reduce(self.flag, op=dist.ReduceOp.MAX, group=self.group, async_op=True)
        else:
            self.pending = None
        return stop

    def restore(self) -> None:
        """Finish the all-reduce in flight (every rank started it) and put the previous handlers back."""
        if self.pending is not None:
            self.pending.wait()
            self.pending = None
        for s, handler in self.previous.items():
            signal.signal(s, handler)


class RunLog:
    """Rank 0's log: lines to stdout and log.txt, records to metrics.jsonl; other ranks stay silent."""

    def __init__(self, run_dir: str | None, active: bool):
        self.run_dir = run_dir
        self.active = active

    def line(self, msg: str) -> None:
        if not self.active:
            return
        print(msg, flush=True)
        if self.run_dir:
            with open(os.path.join(self.run_dir, "log.txt"), "a") as f:
                f.write(f"[{time.strftime('%Y-%m-%d %H:%M:%S')}] {msg}\n")

    def record(self, **fields: Any) -> None:
        if self.active and self.run_dir:
            with open(os.path.join(self.run_dir, "metrics.jsonl"), "a") as f:
                f.write(json.dumps(fields) + "\n")
