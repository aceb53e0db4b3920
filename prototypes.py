"""Prototype classifier (ResNet18 -> Linear -> ReLU, distance-based cross-entropy; Yang et al. 2018) and
prototype files: ours, the original authors' pickled `Models.ModifiedResNet`, or a bare [C, D] tensor.
"""
import os
import pickle
from collections.abc import Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F
import torchvision
from torch import nn

from datasets import to_float
from cli import UserError

FORMAT = "protodiffusion-prototypes-v1"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class DCELoss(nn.Module):
    """Holds the prototypes `centers` [D, C] (Kaiming-normal init) and returns squared distances to them."""

    def __init__(self, n_classes: int, feat_dim: int):
        super().__init__()
        self.n_classes, self.feat_dim = n_classes, feat_dim
        self.centers = nn.Parameter(nn.init.kaiming_normal_(torch.empty(feat_dim, n_classes)))

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        """dist[i, k] = |f_i|^2 + |c_k|^2 - 2 f_i . c_k."""
        return (f * f).sum(1, keepdim=True) + (self.centers * self.centers).sum(0, keepdim=True) - 2 * f @ self.centers


class PrototypeClassifier(nn.Module):
    """ResNet18 (1000-way head kept) -> `reduce_to_hidden` -> ReLU = feature f; logits = -scale * dist(f, centers).

    Attribute names are the authors' (`resnet`, `reduce_to_hidden`, `dce_loss.centers`, `scale`), so their
    pickled model unpickles into this class.
    """

    def __init__(self, num_classes: int, dim: int = 128, scale: float = 2.0, resnet: nn.Module | None = None):
        super().__init__()
        self.scale = scale
        self.resnet = resnet if resnet is not None else torchvision.models.resnet18()
        self.reduce_to_hidden = nn.Linear(1000, dim)
        self.dce_loss = DCELoss(num_classes, dim)

    @property
    def prototypes(self) -> torch.Tensor:
        """[C, D]: one row per class, the layout of the diffusion model's class table."""
        return self.dce_loss.centers.detach().T

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """D-dim features of images in [-1, 1]; grayscale is repeated to 3 channels, then ImageNet-normalised."""
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        mean = torch.tensor(IMAGENET_MEAN, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(IMAGENET_STD, device=x.device).view(1, 3, 1, 1)
        return F.relu(self.reduce_to_hidden(self.resnet(((x + 1) / 2 - mean) / std)))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(features [B, D], logits [B, C] = -scale * squared distance to each prototype)."""
        f = self.features(x)
        return f, -self.scale * self.dce_loss(f)


@torch.no_grad()
def class_statistics(model: PrototypeClassifier, images: torch.Tensor, labels: torch.Tensor, rank: int = 0,
                     world: int = 1, batch: int = 500) -> tuple[torch.Tensor, torch.Tensor]:
    """(class means of the features [C, D], confusion counts [C, C], row = true class, column = nearest
    prototype) over uint8 `images`, in eval mode; ranks split the images and sum their counts."""
    was_training = model.training
    model.eval()
    n_classes = model.dce_loss.n_classes
    sums = torch.zeros(n_classes, model.dce_loss.feat_dim, device=images.device, dtype=torch.float64)
    confusion = torch.zeros(n_classes, n_classes, device=images.device, dtype=torch.float64)
    for i in range(rank * batch, len(labels), batch * world):
        y = labels[i:i + batch]
        features, logits = model(to_float(images[i:i + batch]))
        sums.index_add_(0, y, features.double())
        confusion.index_put_((y, logits.argmax(1)), torch.ones_like(y, dtype=torch.float64), accumulate=True)
    if world > 1:
        dist.all_reduce(sums)
        dist.all_reduce(confusion)
    model.train(was_training)
    counts = confusion.sum(1)
    if (counts == 0).any():
        raise UserError(f"class(es) {(counts == 0).nonzero().flatten().tolist()} have no images to average over")
    return (sums / counts[:, None]).float(), confusion


def dce_and_prototype_loss(features: torch.Tensor, logits: torch.Tensor, centers: torch.Tensor, labels: torch.Tensor,
                           pl_weight: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(total loss, DCE part): NLL of log_softmax(logits) + pl_weight * mean_i |f_i - c_{y_i}|^2."""
    dce = F.cross_entropy(logits, labels)
    pl = ((features - centers.T[labels]) ** 2).sum(1).mean()
    return dce + pl_weight * pl, dce


def imagenet_resnet18(download: bool = True) -> nn.Module:
    """torchvision's ResNet18 with ImageNet weights; offline without the file, one clear UserError."""
    weights = torchvision.models.ResNet18_Weights.IMAGENET1K_V1
    path = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(weights.url))
    if not os.path.exists(path) and not download:
        raise UserError(f"ImageNet weights for ResNet18 are not in {path}; download {weights.url} there "
                        "(or set TORCH_HOME), or pass --pretrained False")
    try:
        return torchvision.models.resnet18(weights=weights)
    except (OSError, RuntimeError) as e:
        raise UserError(f"could not get ImageNet weights for ResNet18 ({type(e).__name__}: {e}); put "
                        f"{os.path.basename(weights.url)} from {weights.url} into {os.path.dirname(path)}/ "
                        "(or set TORCH_HOME), or pass --pretrained False") from None


# Everything a pickled `Models.ModifiedResNet` of the authors may contain; any other global is refused
# by torch's weights-only unpickler before it can run.
AUTHORS_ALLOWED = [(PrototypeClassifier, "Models.ModifiedResNet"), (DCELoss, "Models.dce_loss"),
                   torchvision.models.resnet.ResNet, torchvision.models.resnet.BasicBlock, nn.Conv2d, nn.BatchNorm2d,
                   nn.ReLU, nn.MaxPool2d, nn.AdaptiveAvgPool2d, nn.Linear, nn.Sequential, set]


def read_prototype_file(path: str) -> object:
    """torch.load with weights_only=True plus the authors' classes; refuses anything else without running it."""
    if not os.path.isfile(path):
        raise UserError(f"prototype file {path} does not exist")
    try:
        with torch.serialization.safe_globals(AUTHORS_ALLOWED):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        found = [line.strip() for line in str(e).splitlines() if "Unsupported global" in line or "GLOBAL" in line]
        detail = found[0] if found else str(e).strip().splitlines()[-1]
        raise UserError(f"refused to load {path}: it is not a weights-only file or an authors' prototype classifier "
                        f"({detail}); nothing in it was executed") from None
    except Exception as e:
        raise UserError(f"cannot read prototype file {path}: truncated or corrupt ({type(e).__name__}: "
                        f"{str(e).strip()[:200]})") from None


def load_prototypes(path: str) -> tuple[torch.Tensor, str]:
    """Prototypes [C, D] from any of the three formats, and the name of the format found."""
    obj = read_prototype_file(path)
    if isinstance(obj, dict) and obj.get("format") == FORMAT:
        protos, source = obj["prototypes"], "protodiffusion checkpoint"
    elif isinstance(obj, PrototypeClassifier):
        protos, source = obj.prototypes, "authors' Models.ModifiedResNet pickle"
    elif isinstance(obj, torch.Tensor):
        protos, source = obj, "bare tensor"
    else:
        raise UserError(f"{path} holds a {type(obj).__name__}, not prototypes (expected a train_classifier.py "
                        "checkpoint, the authors' best_model.pt, or a [classes, dim] tensor)")
    if protos.ndim != 2 or not protos.is_floating_point():
        raise UserError(f"prototypes in {path} have shape {tuple(protos.shape)} and dtype {protos.dtype}; "
                        "expected a float [classes, dim] matrix")
    return protos.float().contiguous(), source


def load_classifier(path: str) -> PrototypeClassifier:
    """A ready prototype classifier from our checkpoint or the authors' pickle (in eval mode, on CPU)."""
    return classifier_in(read_prototype_file(path), path)


def classifier_in(obj: object, path: str) -> PrototypeClassifier:
    """The classifier a prototype file's contents hold (in eval mode, on CPU)."""
    if isinstance(obj, PrototypeClassifier):
        return obj.eval()
    if isinstance(obj, dict) and obj.get("format") == FORMAT:
        cfg = obj["config"]
        model = PrototypeClassifier(len(obj["classes"]), cfg["cdim"], cfg["scale"])
        model.load_state_dict(obj["classifier"])
        return model.eval()
    raise UserError(f"{path} holds no classifier weights (a bare prototype tensor cannot score images)")


def load_class_means(path: str, train_split: Callable[[], tuple[torch.Tensor, torch.Tensor]],
                     device: torch.device) -> tuple[torch.Tensor, str]:
    """Each class's mean classifier feature [C, D] over the training split: stored by train_classifier.py, or
    computed with the file's classifier on `train_split()` (uint8 images, labels); and where it came from."""
    obj = read_prototype_file(path)
    if isinstance(obj, dict) and "class_means" in obj:
        return obj["class_means"].float(), "class means stored by train_classifier.py"
    model = classifier_in(obj, path).to(device)
    images, labels = train_split()
    means, _ = class_statistics(model, images.to(device), labels.to(device))
    kind = "authors'" if isinstance(obj, PrototypeClassifier) else "checkpoint's"
    return means.cpu(), f"class means of the {kind} classifier features over the training split"
