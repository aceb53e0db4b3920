"""What a study will cost, before it runs (`study.py --dry-run`): GPU-hours and disk from the one measured H200 rate
of the paper's UNet (docs/gpu.md), and, where the study file gives rates measured on a CPU (`[cpu_rates]`, with
the machine they were measured on), the hours there. Estimates from rates, not measurements of the study."""
import math

# one H200, 2026-11-26, the paper UNet at 32x32 (docs/gpu.md): training 1,596 img/s, DDIM-50 sampling 96 img/s at
# genbatch 1000; both scaled by pixels. The paper UNet's files (chmul 1,2,4,4): 452.2 MB full training state,
# 113.0 MB sampling weights.
TRAIN_IMG_S, SAMPLE_IMG_S, STATE_MB, WEIGHTS_MB = 1596, 96, 452.2, 113.0
TRAINING_IMAGES = {"cifar10": 50_000, "stl10": 13_000, "tiny-imagenet": 100_000, "fashion_mnist": 60_000,
                   "digits": 1_797}  # what train.py trains on
NATIVE = {"cifar10": 32, "stl10": 96, "tiny-imagenet": 64, "fashion_mnist": 28, "digits": 8}


def gpu_estimate(study: dict, n_runs: int, scored: int, images: int) -> str:
    """Per run and in all: GPU-hours of training and scoring and the disk, at the paper UNet's H200 rates."""
    size = study.get("image_size", -1)
    pixels = ((size if size > 0 else NATIVE.get(study["dataset"], 64)) / 32) ** 2
    train_h = study["epochs"] * images / (TRAIN_IMG_S / pixels) / 3600
    score_h = scored * study["evaluation"]["images"] / (SAMPLE_IMG_S / pixels) / 3600
    disk = (scored * WEIGHTS_MB + min(study.get("keep_last", 2), scored) * STATE_MB) / 1000
    return (f"# estimate per run (H200 rates of 2026-11-26, the paper UNet; not a measurement): training "
            f"{train_h:.1f} GPU-h ({study['epochs']} epochs x {images:,} images), scoring {scored} points "
            f"{score_h:.1f} GPU-h, disk {disk:.1f} GB; {n_runs} runs: {n_runs * (train_h + score_h):.0f} "
            f"GPU-h, {n_runs * disk:.0f} GB")


def cpu_estimate(study: dict, n_runs: int, scored: int, images: int) -> str:
    """Per run and in all: hours at the study file's CPU rates (img/s of one run while `jobs` run side by side)."""
    rates, jobs = study["cpu_rates"], max(1, study.get("jobs", 1))
    train_h = study["epochs"] * images / rates["train_img_s"] / 3600
    score_h = scored * study["evaluation"]["images"] / rates["sample_img_s"] / 3600
    other_h = rates.get("overhead_s", 0) / 3600  # process starts, data, checkpoints, the floor: measured per run
    return (f"# estimate per run ({rates.get('machine', 'a CPU')}, rates measured {rates.get('measured', '')}: "
            f"training {rates['train_img_s']} img/s, scoring {rates['sample_img_s']} img/s): training {train_h:.2f} h, "
            f"scoring {scored} points {score_h:.2f} h, the rest {other_h:.2f} h; {n_runs} runs, {jobs} side by side: "
            f"{math.ceil(n_runs / jobs) * (train_h + score_h + other_h):.1f} h, the classifiers apart")


def estimate(study: dict, n_runs: int, scored: int) -> str:
    """The dry run's estimate lines: the GPU one where the dataset's size is known, the CPU one where rates are given."""
    images = TRAINING_IMAGES.get(study["dataset"])
    if images is None:
        return (f"# estimate: none for {study['dataset']} (GPU rates are known for "
                f"{', '.join(TRAINING_IMAGES)} at the paper's UNet); {n_runs} runs, {scored} scored points each")
    lines = [gpu_estimate(study, n_runs, scored, images)]
    if "cpu_rates" in study:
        lines.append(cpu_estimate(study, n_runs, scored, images))
    return "\n".join(lines)
