#!/usr/bin/env python3
"""PyTorch side of scripts/bench_block5.sh: the same work as
crates/pipeline/examples/bench_block5.rs.

  bench_block5_torch.py [images] [batch] [side]

VGG16's block 5 (three Conv2d(512, 512, 3, padding=1) + ReLU, MaxPool2d(2)) and
Linear(512 * (side/2)^2 -> 2), f32, on `images` random block-4 activations (ReLU'd normal
values), batch `batch`, cross-entropy, backward, Adam (convolutions at 0.1x the head's rate):
one pass after one warm-up step, torch.set_num_threads($THREADS). Prints `key value` lines.
"""
import os
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

STUDY_TRAIN_IMAGES = 1316


def main():
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 256
    batch = int(sys.argv[2]) if len(sys.argv) > 2 else 128
    side = int(sys.argv[3]) if len(sys.argv) > 3 else 14
    torch.set_num_threads(int(os.environ.get("THREADS", "2")))
    torch.manual_seed(5)
    c = 512
    convs = nn.ModuleList([nn.Conv2d(c, c, 3, padding=1) for _ in range(3)])
    fc = nn.Linear(c * (side // 2) ** 2, 2)
    opt = torch.optim.Adam(
        [{"params": convs.parameters(), "lr": 5e-5}, {"params": fc.parameters(), "lr": 5e-4}]
    )
    x = torch.relu(torch.randn(n, c, side, side))
    y = torch.arange(n) % 2

    def step(rows):
        t0 = time.perf_counter()
        h = x[rows]
        for conv in convs:
            h = F.relu(conv(h))
        logits = fc(F.max_pool2d(h, 2).flatten(1))
        loss = F.cross_entropy(logits, y[rows])
        loss.item()
        t1 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        t2 = time.perf_counter()
        opt.step()
        t3 = time.perf_counter()
        return t1 - t0, t2 - t1, t3 - t2

    idx = torch.arange(n)
    step(idx[:batch])  # warm-up
    fwd = bwd = st = 0.0
    for start in range(0, n, batch):
        a, b, c_ = step(idx[start : start + batch])
        fwd, bwd, st = fwd + a, bwd + b, st + c_
    print(f"torch_block5_forward_per_image {fwd / n:.5f}")
    print(f"torch_block5_backward_per_image {bwd / n:.5f}")
    print(f"torch_block5_optimizer_per_image {st / n:.5f}")
    print(f"torch_block5_epoch_scaled {(fwd + bwd + st) / n * STUDY_TRAIN_IMAGES:.2f}")


if __name__ == "__main__":
    main()
