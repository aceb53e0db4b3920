"""Run train.main under torchrun and save this rank's final weights (and the UNet's last gradient) to OUT/rank{r}.pt
(for the DDP tests).

Faults for one rank only, set by environment variables:
- BROKEN_COMPILER_RANK=r: on rank r, `g++` and `cc` are programs that fail (first in PATH) and inductor gets its own
  empty cache dir, so that rank's torch.compile cannot build a kernel while the other ranks' can.
- INF_LOSS_RANK=r, FAULT_STEP=k: on rank r, the step loss is infinite from step k on (the others stay finite).
- ERROR_RANK=r, FAULT_STEP=k: rank r raises a UserError at step k (the others go on into the next collective).
- HANG_RANK=r, FAULT_STEP=k: rank r writes OUT/hang{r} and sleeps for an hour at step k (the others block in
  the next collective).
- EVAL_FAULT_RANK=r: on rank r, every cached FID reference file is unreadable (as on a node without the shared
  filesystem), so that rank's periodic evaluations fail while the other ranks' would not.
- KEYED_NOISE=1 (every rank): each image's timestep and noise are a function of the image alone, so the update of a
  global batch does not depend on which process or micro-batch an image lands in (use with --threshold 0
  --droprate 0, the loss's other randomness).
- COMPILE_BACKEND=eager (every rank): torch.compile traces with dynamo (DDP's graph split included) and runs the
  graphs as traced, without inductor's minutes of code generation; OUT/rank{r}.pt counts the graphs.
- DDP_BUCKET_GRAPHS=1 (every rank): a compiled DDP loss is cut into one graph per DDP bucket (dynamo's DDPOptimizer)
  instead of one graph.
Every rank writes its process id to OUT/pid{r}.
Errors reach the user as train.py's do (cli.run_cli).
"""
import os
import stat
import sys
import time

out = sys.argv[1]
rank = os.environ["RANK"]
if os.environ.get("BROKEN_COMPILER_RANK") == rank:
    fake = os.path.join(out, f"broken_bin_{rank}")
    os.makedirs(fake, exist_ok=True)
    for name in ("g++", "gcc", "c++", "cc", "clang++", "clang"):
        path = os.path.join(fake, name)
        with open(path, "w") as f:
            f.write("#!/bin/sh\necho 'this rank has no working compiler' >&2\nexit 1\n")
        os.chmod(path, os.stat(path).st_mode | stat.S_IEXEC)
    os.environ["PATH"] = fake + os.pathsep + os.environ["PATH"]
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = os.path.join(out, f"inductor_cache_{rank}")

import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import train  # noqa: E402
import train_step  # noqa: E402
from cli import UserError, run_cli  # noqa: E402

open(os.path.join(out, f"pid{rank}"), "w").write(str(os.getpid()))
if rank in (os.environ.get("INF_LOSS_RANK"), os.environ.get("ERROR_RANK"), os.environ.get("HANG_RANK")):
    fault_step, real_call = int(os.environ["FAULT_STEP"]), train_step.TrainStep.__call__
    steps = [0]

    def faulty(self, *a):
        steps[0] += 1
        if steps[0] >= fault_step and os.environ.get("HANG_RANK") == rank:
            open(os.path.join(out, f"hang{rank}"), "w").close()
            time.sleep(3600)
        loss = real_call(self, *a)
        if steps[0] >= fault_step and os.environ.get("ERROR_RANK") == rank:
            raise UserError(f"injected failure on rank {rank} at step {steps[0]}")
        return loss * float("inf") if steps[0] >= fault_step else loss

    train_step.TrainStep.__call__ = faulty
if os.environ.get("EVAL_FAULT_RANK") == rank:
    import fid  # noqa: E402

    def unreadable(path, keys):
        raise UserError(f"reference statistics {path} are unreadable (injected on rank {rank})")
    fid.read_npz = unreadable

graphs = []
if os.environ.get("COMPILE_BACKEND"):
    import functools  # noqa: E402

    def traced(gm, example_inputs, **options):
        graphs.append(len(gm.graph.nodes))
        return gm.forward
    torch.compile = functools.partial(torch.compile, backend=traced)
if os.environ.get("DDP_BUCKET_GRAPHS"):
    train_step.ONE_DDP_GRAPH = False
if os.environ.get("KEYED_NOISE"):
    import diffusion  # noqa: E402
    import torch.nn.functional as F  # noqa: E402

    def keyed_loss(self, model, x0, cond, generator=None):
        key = x0.flatten(1).sum(1)
        t = (key.abs() * 997).long() % self.T
        noise = torch.sin(key.view(-1, *[1] * (x0.dim() - 1)) + torch.arange(x0[0].numel()).view(x0.shape[1:]))
        return F.mse_loss(model(self.q_sample(x0, t, noise), t, cond), noise)
    diffusion.GaussianDiffusion.train_loss = keyed_loss


def main(args) -> None:
    modules = train.main(args)
    final = {name: m.state_dict() for name, m in modules.items()}
    final["grad"] = {n: p.grad for n, p in modules["net"].named_parameters() if p.grad is not None}  # the last step's
    final["graphs"] = len(graphs)
    torch.save(final, os.path.join(out, f"rank{rank}.pt"))


sys.argv = sys.argv[:1] + sys.argv[2:]
run_cli(main, train.build_parser())
