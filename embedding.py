"""Class-embedding table + MLP (`ConditionalEmbedding`) and putting prototypes into its table."""
import math

import torch
from torch import nn


class ConditionalEmbedding(nn.Module):
    """Label -> table row (d_model) -> Linear, SiLU, Linear (dim): the class condition `cond` the UNet takes.

    By default no padding_idx. The original's padding_idx=0 (`--compat padding_idx`) fixed class 0's table row at
    zero with no gradient, so that row never learned in `regular` (nor a loaded prototype row 0 in `proto_unfrozen`);
    class 0 was still distinct from the CFG null condition, which zeroes this module's output, while class 0 got
    MLP(0).
    """

    def __init__(self, num_labels: int, d_model: int, dim: int, padding_idx: int | None = None):
        super().__init__()
        self.condEmbedding = nn.Sequential(nn.Embedding(num_labels, d_model, padding_idx=padding_idx),
                                           nn.Linear(d_model, dim), nn.SiLU(), nn.Linear(dim, dim))

    @property
    def table(self) -> nn.Parameter:
        """The [num_labels, d_model] class table (random in `regular`, prototypes in the proto modes)."""
        return self.condEmbedding[0].weight

    def forward(self, labels: torch.Tensor) -> torch.Tensor:
        return self.condEmbedding(labels)


def set_class_table(cemblayer: ConditionalEmbedding, rows: torch.Tensor, trainable: bool) -> None:
    """Copy `rows` [C, D] into the class table; a frozen table gets no gradient, so AdamW never touches it."""
    table = cemblayer.table
    if tuple(rows.shape) != tuple(table.shape):
        raise ValueError(f"class table is {tuple(table.shape)} (classes x cdim) but the rows given are "
                         f"{tuple(rows.shape)}")
    with torch.no_grad():
        table.copy_(rows.to(table.dtype))
    table.requires_grad_(trainable)


def rows_with_norms_of(protos: torch.Tensor, seed: int) -> torch.Tensor:
    """Random N(0, 1) directions rescaled to the prototypes' row norms: the same scale, no class structure."""
    rows = torch.randn(protos.shape, generator=torch.Generator().manual_seed(seed), dtype=protos.dtype)
    return rows / rows.norm(dim=1, keepdim=True) * protos.norm(dim=1, keepdim=True)


def expected_row_norm(dim: int) -> float:
    """E|z| for z ~ N(0, I_dim), the row norm a `regular` table starts from (nn.Embedding draws N(0, 1)):
    sqrt(2) Gamma((dim + 1) / 2) / Gamma(dim / 2), close to sqrt(dim - 1/2); 11.29 at width 128."""
    return math.sqrt(2) * math.exp(math.lgamma((dim + 1) / 2) - math.lgamma(dim / 2))


def rows_at_norm(rows: torch.Tensor, norm: float) -> torch.Tensor:
    """Every row rescaled to L2 norm `norm`, its direction unchanged."""
    return rows / rows.norm(dim=1, keepdim=True) * norm


def shuffled_rows(protos: torch.Tensor, seed: int) -> torch.Tensor:
    """The prototypes with class rows permuted so that no class keeps its own (a random cyclic derangement)."""
    order = torch.randperm(len(protos), generator=torch.Generator().manual_seed(seed))
    target = torch.empty_like(order)
    target[order] = order.roll(-1)  # class order[i] gets the prototype of class order[i + 1]
    return protos[target]
