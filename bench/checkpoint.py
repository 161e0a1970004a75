"""Per-epoch checkpoint cost: checkpoint.save (in-memory torch.save, sha256, fsync, the previous
one kept) and checkpoint.load (digest checked), against plain torch.save / torch.load to the same
folder, on the study's model with its Adam state.

Prints the median seconds of each, their ratios, and the checkpoint's size. Run:
python bench/checkpoint.py [--width 1] [--repeats 5] [--dir DIR]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from vgg_xai import checkpoint
from vgg_xai.config import TrialConfig
from vgg_xai.model import build_model


def median_s(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--width", type=float, default=1.0)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--dir", type=Path, default=None, help="where to write (default: a temp folder)")
    args = ap.parse_args()

    net = build_model(TrialConfig(width=args.width))
    opt = torch.optim.Adam(net.parameters())
    net(torch.randn(2, 3, 32, 32)).sum().backward()
    opt.step()  # Adam's moments exist, as after an epoch
    state = {"model": net.state_dict(), "optimizer": opt.state_dict(), "epoch": 0, "rng": torch.get_rng_state(),
             "config": {}, "history": []}
    with tempfile.TemporaryDirectory(dir=args.dir) as d:
        plain, ours = Path(d) / "plain.pt", Path(d) / "checkpoint.pt"
        t_plain = median_s(lambda: torch.save(state, plain), args.repeats)
        t_ours = median_s(lambda: checkpoint.save(state, ours, keep_previous=True), args.repeats)
        l_plain = median_s(lambda: torch.load(plain, map_location="cpu", weights_only=True), args.repeats)
        l_ours = median_s(lambda: checkpoint.load(ours), args.repeats)
        size = ours.stat().st_size
    print(f"width {args.width:g}: checkpoint {size / 1e6:.1f} MB, median of {args.repeats}")
    print(f"save  torch.save {t_plain:.3f} s   checkpoint.save {t_ours:.3f} s   ratio {t_ours / t_plain:.2f}x")
    print(f"load  torch.load {l_plain:.3f} s   checkpoint.load {l_ours:.3f} s   ratio {l_ours / l_plain:.2f}x")


if __name__ == "__main__":
    main()
