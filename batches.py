"""The training set's batches: a per-epoch permutation cut into each rank's share of a global batch, and the
staging of those batches to a device the images do not fit on."""
import torch

from datasets import DatasetError


class ShardedBatches:
    """Per-epoch permutation of N indices, a function of (seed, epoch), cut into this rank's share of each step.

    Every rank draws the same permutation and drops the tail that does not fill a global batch (batch_size x
    world x accumulate). A step's global batch is cut into world x accumulate micro-batches of batch_size,
    strided, and rank r takes micro-batches r*accumulate .. (r+1)*accumulate - 1: so ranks never overlap, and one
    rank accumulating two micro-batches sees exactly the images two ranks with one each would.
    """

    def __init__(self, n: int, batch_size: int, rank: int = 0, world: int = 1, seed: int = 0, accumulate: int = 1,
                 source: str = "the dataset"):
        self.n, self.batch_size, self.rank, self.world, self.seed = n, batch_size, rank, world, seed
        self.accumulate = accumulate
        if len(self) == 0:
            fits = f"--batchsize {n // world} (with --global_batch 0)" if n >= world else "fewer processes"
            raise DatasetError(f"the {n} training images of {source} are fewer than one global batch of "
                               f"{batch_size * world * accumulate} ({batch_size} per device x {world} device(s) x "
                               f"{accumulate} micro-batch(es)); the largest that fits: {fits}")

    def __len__(self) -> int:
        return self.n // (self.batch_size * self.world * self.accumulate)

    def epoch(self, epoch: int) -> torch.Tensor:
        """This rank's indices for `epoch`, shape [steps, accumulate x batch_size] (its micro-batches in order)."""
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        shards = self.world * self.accumulate
        perm = torch.randperm(self.n, generator=g)[: len(self) * self.batch_size * shards]
        mine = perm.view(len(self), self.batch_size, shards)[:, :, self.rank * self.accumulate:
                                                            (self.rank + 1) * self.accumulate]
        return mine.permute(0, 2, 1).reshape(len(self), self.accumulate * self.batch_size)


class StagedBatches:
    """Batches of a host-side image tensor for a device it does not fit on: each is gathered into one of a few
    buffers reused across steps (pinned on CUDA, so the copy is asynchronous) and copied to the device."""

    def __init__(self, images: torch.Tensor, batch_size: int, device: torch.device, slots: int = 3):
        self.images, self.device = images, device
        cuda = device.type == "cuda"
        self.buffers = [torch.empty((batch_size,) + tuple(images.shape[1:]), dtype=images.dtype, pin_memory=cuda)
                        for _ in range(slots)]
        self.copied: list = [None] * slots  # the CUDA event after each buffer's last copy
        self.calls = 0

    def __call__(self, index: torch.Tensor) -> torch.Tensor:
        """images[index] on the device."""
        slot = self.calls % len(self.buffers)
        self.calls += 1
        if self.copied[slot] is not None:
            self.copied[slot].synchronize()  # the copy out of this buffer, `slots` steps ago, has finished
        buffer = self.buffers[slot][:len(index)]
        torch.index_select(self.images, 0, index, out=buffer)
        if self.device.type != "cuda":
            return buffer.to(self.device, copy=True)
        batch = buffer.to(self.device, non_blocking=True)
        self.copied[slot] = torch.cuda.Event()
        self.copied[slot].record()
        return batch
