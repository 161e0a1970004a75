"""Training-step throughput: the project's device-resident loader + trainer against a naive
torch Dataset + DataLoader with PIL transforms and an fp32 NCHW model of the same width.

Prints images/s of both, their ratio, FLOPs per image and achieved GFLOP/s (on CUDA also MFU
against the bf16 dense peak). Run:  python bench/train_throughput.py [--width 0.125] [--data CACHE]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
import torch.nn.functional as F
from torchvision import transforms

from vgg_xai.config import TrialConfig
from vgg_xai.data import DeviceSplit, load_cache, make_augment
from vgg_xai.model import build_model, flops_per_image
from vgg_xai.train import resolve_precision, train_epoch

# bf16 dense tensor-core peaks (FLOP/s) for MFU.
PEAKS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10": 125e12}


class PILDataset(torch.utils.data.Dataset):
    """What a first version looks like: PIL images, torchvision transforms per sample."""

    def __init__(self, x: np.ndarray, y: np.ndarray, mean, std, augment: bool):
        from PIL import Image

        self.images = [Image.fromarray(img.transpose(1, 2, 0)) for img in x]
        self.labels = y.tolist()
        steps = []
        if augment:  # the same augmentation as vgg_xai.data.make_augment
            steps = [
                transforms.RandomVerticalFlip(0.5),
                transforms.RandomApply([transforms.RandomAffine(15, (0.1, 0.1), (0.9, 1.1), 10)], p=0.5),
                transforms.RandomCrop(32, padding=4),
                transforms.RandomApply([transforms.ColorJitter(0.2, 0.2, 0.2, 0.05)], p=0.5),
            ]
        self.tf = transforms.Compose(steps + [transforms.ToTensor(), transforms.Normalize(mean, std)])

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i):
        return self.tf(self.images[i]), self.labels[i]


def naive(model, x, y, mean, std, augment, batch, n_images, workers, device) -> float:
    loader = torch.utils.data.DataLoader(PILDataset(x, y, mean, std, augment), batch_size=batch, shuffle=True,
                                         num_workers=workers, drop_last=True, persistent_workers=workers > 0)
    opt = torch.optim.Adam(model.parameters(), 1e-3)
    model.train()
    done, t0 = 0, None
    while done < n_images:
        for xb, yb in loader:
            xb, yb = xb.to(device), yb.to(device)
            loss = F.cross_entropy(model(xb), yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if t0 is None:  # first batch is warm-up (workers start, allocations)
                _sync(device)
                t0 = time.perf_counter()
                continue
            done += len(yb)
            if done >= n_images:
                break
    _sync(device)
    return done / (time.perf_counter() - t0)


def ours(model, split, augment, batch, n_images, device, dtype, channels_last) -> float:
    opt = torch.optim.Adam(model.parameters(), 1e-3)
    aug = make_augment().to(device) if augment else None
    kw = dict(generator=torch.Generator().manual_seed(0), augment=aug, dtype=dtype, channels_last=channels_last)
    train_epoch(model, opt, split, batch, max_batches=2, **kw)  # warm-up
    _sync(device)
    n_batches = max(1, n_images // batch)
    done, t0 = 0, time.perf_counter()
    while done < n_batches:
        k = min(n_batches - done, len(split) // batch)
        train_epoch(model, opt, split, batch, max_batches=k, **kw)
        done += k
    _sync(device)
    return done * batch / (time.perf_counter() - t0)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--width", type=float, default=0.125)
    ap.add_argument("--data", help="a prepared cache (.h5); default: 4,096 random images in memory")
    ap.add_argument("--images", type=int, default=None, help="images timed per measurement")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--workers", type=int, nargs="+", default=[0, 2],
                    help="DataLoader worker counts to try for the baseline; the ratio is against the fastest")
    ap.add_argument("--compile", action="store_true", help="torch.compile our model (CUDA)")
    args = ap.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    n_images = args.images or (20_000 if device.type == "cuda" else 2_048)
    if args.data:
        prep = load_cache(args.data)
        x, y = prep.splits["train"]
        mean, std = prep.mean, prep.std
    else:
        rng = np.random.default_rng(0)
        x = rng.integers(0, 256, size=(4096, 3, 32, 32), dtype=np.uint8)
        y = rng.integers(0, 10, size=4096)
        mean, std = np.array([0.49, 0.48, 0.45]), np.array([0.25, 0.24, 0.26])
    split = DeviceSplit(x, y, mean, std, device)
    dtype, channels_last = resolve_precision("auto", device)
    cfg = TrialConfig(variant="bn", width=args.width)
    flops = 3 * flops_per_image(build_model(cfg))  # forward + backward of a training step
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    peak = next((v for k, v in PEAKS.items() if k in name), None)
    print(f"device {name}, width {args.width}, batch {args.batch}, {n_images} images per figure, "
          f"ours: {dtype or 'fp32'}{' channels_last' if channels_last else ''}, baseline: fp32 NCHW, "
          f"DataLoader workers {args.workers} (best taken)")
    print(f"training FLOPs per image: {flops / 1e6:.1f} MFLOP")
    for augment in (False, True):
        torch.manual_seed(0)
        model = build_model(cfg).to(device)
        if channels_last:
            model = model.to(memory_format=torch.channels_last)
        m = torch.compile(model) if args.compile and device.type == "cuda" else model
        a = ours(m, split, augment, args.batch, n_images, device, dtype, channels_last)
        b = 0.0
        for w in args.workers:
            torch.manual_seed(0)
            b = max(b, naive(build_model(cfg).to(device), x, y, mean, std, augment, args.batch, n_images, w, device))
        line = (f"augment={'on ' if augment else 'off'}  ours {a:8.0f} img/s  baseline {b:8.0f} img/s  "
                f"ratio {a / b:5.2f}x  ours {a * flops / 1e9:8.1f} GFLOP/s")
        if peak:
            line += f"  MFU {a * flops / peak:6.1%}"
        print(line, flush=True)


if __name__ == "__main__":
    main()
