"""Run train.main under torchrun and save this rank's final weights to OUT/rank{r}.pt (for the DDP test)."""
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import train  # noqa: E402

out = sys.argv[1]
modules = train.main(train.build_parser().parse_args(sys.argv[2:]))
torch.save({name: m.state_dict() for name, m in modules.items()}, os.path.join(out, f"rank{os.environ['RANK']}.pt"))
