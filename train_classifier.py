"""Train the prototype classifier and write its prototype checkpoint (the input of train.py --mode proto_*).

    python train_classifier.py --dataset digits --image_size 16 --pretrained False --out proto.pt
    torchrun --standalone --nproc_per_node=gpu train_classifier.py --dataset cifar10 --out cifar10_proto.pt
`--batchsize` is per device; `--global_batch` fixes the batch over all processes. Test accuracy: cifar10/stl10
test split, tiny-imagenet val/, digits a fixed 20%, image folders every tenth image of each class.
"""
import argparse
import os
import time

import torch
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

from checkpoints import save_atomic
from batches import ShardedBatches
from datasets import DATASETS, ImageData, load_dataset, to_float
from prototypes import FORMAT, PrototypeClassifier, class_statistics, dce_and_prototype_loss, imagenet_resnet18
from cli import ANY, DEVICE, NATIVE_OR_SIZE, UserError, above, at_least, check_flags, one_of, run_cli, str2bool
from distributed import main_rank_first, seed_everything, setup_distributed, teardown_distributed
from structure import HEADER, structure_row, table_structure


def prototype_movement(initial: torch.Tensor, final: torch.Tensor) -> dict:
    """How far the prototypes [C, D] moved from their init, and their geometry (norms, pairwise distances)."""
    dist = torch.cdist(final.double(), final.double())
    off_diagonal = dist[~torch.eye(len(final), dtype=torch.bool)]
    return {"relative_change": ((final - initial).norm() / initial.norm()).item(),
            "cosine_to_initial": torch.nn.functional.cosine_similarity(final, initial, dim=1).tolist(),
            "norms": final.norm(dim=1).tolist(), "initial_norms": initial.norm(dim=1).tolist(),
            "pairwise_distances": dist.tolist(), "mean_pairwise_distance": off_diagonal.mean().item()}


FLAG_RULES = {  # every flag: tests/test_flags.py fails on a flag without a rule here
    **{flag: at_least(1) for flag in ("epoch", "batchsize", "cdim", "numworkers")},
    "global_batch": at_least(0),
    "image_size": NATIVE_OR_SIZE, "seed": at_least(0),
    "lr": above(0), "center_lr_mult": above(0), "scale": above(0), "pl_weight": at_least(0),
    "dataset": one_of(*DATASETS), "device": DEVICE,
    **{flag: ANY for flag in ("data_root", "download", "crop", "tiny_imagenet_path", "pretrained", "out")},
}


def main(args: argparse.Namespace) -> None:
    """Train the prototype classifier and write its checkpoint to --out (nothing is written on a bad flag)."""
    check_flags(args, FLAG_RULES)
    d = setup_distributed(args.device)
    if args.global_batch:  # the same classifier, so the same prototype table, on any GPU count
        if args.global_batch % d.world:
            raise UserError(f"--global_batch {args.global_batch} does not split over {d.world} processes")
        args.batchsize = args.global_batch // d.world
    if os.path.exists(args.out):
        raise UserError(f"{args.out} already exists; choose another --out (nothing was overwritten)")
    def load() -> tuple[ImageData, ImageData]:
        train = load_dataset(args.dataset, "train", args.data_root, args.image_size, args.download,
                             args.tiny_imagenet_path, args.numworkers, args.crop)
        return train, load_dataset(args.dataset, "test", args.data_root, train.size, args.download,
                                   args.tiny_imagenet_path, args.numworkers, args.crop)
    train, test = main_rank_first(load, d)  # one rank downloads, then the rest read
    seed_everything(args.seed)
    resnet = imagenet_resnet18() if args.pretrained else None
    model = PrototypeClassifier(len(train.classes), args.cdim, args.scale, resnet).to(d.device)
    ddp = DDP(model, device_ids=[d.local_rank] if d.device.type == "cuda" else None) if d.world > 1 else model
    initial = model.dce_loss.centers.detach().clone()
    others = [p for name, p in model.named_parameters() if name != "dce_loss.centers"]
    optimizer = torch.optim.Adam([{"params": others}, {"params": [model.dce_loss.centers],
                                                       "lr": args.lr * args.center_lr_mult}], lr=args.lr)
    seed_everything(args.seed * d.world + d.rank)
    images, labels = train.images.to(d.device), train.labels.to(d.device)
    test_images, test_labels = test.images.to(d.device), test.labels.to(d.device)
    batches = ShardedBatches(len(labels), args.batchsize, d.rank, d.world, args.seed, source=train.source)
    if d.is_main:
        print(f"{args.dataset}: {len(labels)} train / {len(test_labels)} test images {tuple(images.shape[1:])}, "
              f"{len(train.classes)} classes; {d.world} process(es) on {d.device.type}", flush=True)

    t_start, acc = time.time(), 0.0
    for epoch in range(args.epoch):
        loss_sum = torch.zeros((), device=d.device)
        for idx in tqdm(batches.epoch(epoch), desc=f"epoch {epoch + 1}/{args.epoch}", disable=not d.is_main,
                        leave=False, dynamic_ncols=True):
            idx = idx.to(d.device)
            features, logits = ddp(to_float(images[idx]))
            loss, _ = dce_and_prototype_loss(features, logits, model.dce_loss.centers, labels[idx], args.pl_weight)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            loss_sum += loss.detach()
        _, confusion = class_statistics(model, test_images, test_labels, d.rank, d.world)
        acc = (confusion.trace() / confusion.sum()).item()
        if d.is_main:
            print(f"epoch {epoch + 1}/{args.epoch}: loss {loss_sum.item() / len(batches):.4f}, "
                  f"test accuracy {acc:.4f}, {time.time() - t_start:.0f} s", flush=True)

    movement = prototype_movement(initial.T.cpu(), model.prototypes.cpu())
    means = class_statistics(model, images, labels, d.rank, d.world)[0].cpu()  # the table --proto_source means uses
    confusion = confusion.cpu()
    structure = {name: table_structure(table, confusion, means)
                 for name, table in (("centres", model.prototypes.cpu()), ("means", means))}
    if d.is_main:
        print(f"prototypes moved {100 * movement['relative_change']:.1f}% from their initial values (cosine to init: "
              f"min {min(movement['cosine_to_initial']):.3f}); row norms {min(movement['norms']):.2f}.."
              f"{max(movement['norms']):.2f}; pairwise distances mean {movement['mean_pairwise_distance']:.2f}",
              flush=True)
        print("class structure (reference: test-split confusion and training-split class means):\n" + HEADER + "\n" +
              "\n".join(structure_row(name, s) for name, s in structure.items()), flush=True)
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        save_atomic({"format": FORMAT, "prototypes": model.prototypes.cpu(),
                     "classifier": {k: v.cpu() for k, v in model.state_dict().items()},
                     "config": {k: v for k, v in vars(args).items() if k not in ("device", "debug")} |
                     {"image_size": train.size, "channels": train.channels},
                     "test_accuracy": acc, "classes": train.classes, "movement": movement,
                     "initial_prototypes": initial.T.cpu(), "class_means": means, "confusion": confusion,
                     "structure": structure}, args.out)
        print(f"prototypes {tuple(model.prototypes.shape)} and classifier -> {args.out} "
              f"(test accuracy {acc:.4f}, {time.time() - t_start:.0f} s)", flush=True)
    teardown_distributed()


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Train a ResNet18 prototype classifier (distance-based cross-entropy) "
                                "and save its class prototypes for ProtoDiffusion.")
    p.add_argument("--dataset", default="cifar10", help=f"one of {', '.join(DATASETS)}")
    p.add_argument("--data_root", default="datasets", help="folder holding the datasets")
    p.add_argument("--download", type=str2bool, default=True, help="download cifar10, stl10 or fashion_mnist when missing")
    p.add_argument("--tiny_imagenet_path", default=None, help="the unzipped tiny-imagenet-200 folder, or its train/ "
                   "folder as the original code took it (default DATA_ROOT/tiny-imagenet-200)")
    p.add_argument("--numworkers", type=int, default=4, help="threads that decode image folders")
    p.add_argument("--image_size", type=int, default=-1, help="resize images to this size (-1: native)")
    p.add_argument("--crop", type=str2bool, default=True, help="image folders: resize the short side to --image_size "
                   "and crop the centre, as ADM, DiT and EDM do (False: squash each image to a square; square images: "
                   "the same)")
    p.add_argument("--cdim", type=int, default=128, help="prototype / feature dimension D (the paper's 128)")
    p.add_argument("--scale", type=float, default=2.0, help="s in log_softmax(-s * distance)")
    p.add_argument("--pl_weight", type=float, default=0.01, help="weight of the prototype loss mean |f - c_y|^2")
    p.add_argument("--center_lr_mult", type=float, default=1.0, help="learning-rate multiplier for the prototypes "
                   "(with 1 they barely move from their random init; see README)")
    p.add_argument("--epoch", type=int, default=15, help="epochs to train")
    p.add_argument("--batchsize", type=int, default=128, help="batch size per device")
    p.add_argument("--global_batch", type=int, default=0, help="images per step over all processes, whatever their "
                   "number (replaces --batchsize; 0: batchsize x processes)")
    p.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate")
    p.add_argument("--pretrained", type=str2bool, default=True, help="start from torchvision's ImageNet ResNet18 "
                   "weights (as the original did)")
    p.add_argument("--seed", type=int, default=0, help="global seed")
    p.add_argument("--out", default="results/classifier/prototypes.pt", help="where to write the prototype checkpoint")
    p.add_argument("--device", default="auto", help="auto, cuda or cpu")
    return p


if __name__ == "__main__":
    run_cli(main, build_parser())
