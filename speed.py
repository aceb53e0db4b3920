"""The fast path: mixed precision, channels_last, torch.compile proven by a probe (and its portable cache), fused
AdamW; one set of settings per run, resolved per device."""
import os
import time
from dataclasses import dataclass
from typing import Any, Callable

import torch

from cli import str2bool, write_atomic
from distributed import first_rank_failure


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
    three times (warm-up, record, replay), each from cleared gradients, so the graphs are captured inside it. A
    failure resets nothing global: other networks' compiled graphs stay.
    """
    # shapes are fixed; a symbolic-shape recompile takes minutes
    options = {"dynamic": False, "mode": None if mode == "default" else mode}
    if regions is None:
        compiled = torch.compile(module, **options)
    else:
        # every region runs through the same forward code object, and dynamo's recompile limit (8 by default)
        # counts per code object: past it the remaining blocks would run eager without a word
        config = torch._dynamo.config
        config.recompile_limit = max(config.recompile_limit, 2 * len(regions))
        for region in regions:
            region.compile(**options)
        compiled = module
    limit_hits = recompile_limit_hits()
    t0 = time.time()
    reason = None
    try:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            for _ in range(3 if mode == "reduce-overhead" else 1):
                if mode == "reduce-overhead":
                    torch.compiler.cudagraph_mark_step_begin()
                # no run accumulates into the gradients of the one before, which its CUDA graph replay overwrote
                # (PyTorch issue 169545)
                module.zero_grad(set_to_none=True)
                probe(compiled)
        if recompile_limit_hits() > limit_hits:
            reason = "dynamo hit its recompile limit: some of the graph would run eager"
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


def recompile_limit_hits() -> int:
    """How often dynamo gave up on a frame for its recompile limit so far in this process (its counters)."""
    from torch._dynamo.utils import counters
    return sum(n for what, n in counters["unimplemented"].items() if "recompile limit" in what.lower())


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
    write_atomic(path, lambda f: f.write(artifacts[0]))


def adamw(params: list, lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW with the fused kernel (CUDA and CPU; 4x faster than the for-loop one for the paper's UNet on CPU)."""
    try:
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=True)
    except (RuntimeError, TypeError):
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)

