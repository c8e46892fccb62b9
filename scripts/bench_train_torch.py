#!/usr/bin/env python3
"""Training-speed benchmark, PyTorch side of scripts/bench_train.sh: the same work as
crates/pipeline/examples/bench_train.rs, in f32 on the CPU with the threads given.

  bench_train_torch.py cnn  [images] [size] [batch] [epochs]
  bench_train_torch.py head [rows] [dim] [batch] [epochs]

Prints one "key value" line per measure (names as the Rust side, prefixed torch_).
"""
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F


def arg(i, default):
    return int(sys.argv[i]) if len(sys.argv) > i else default


def cnn():
    n, size, batch, epochs = arg(2, 1481), arg(3, 224), arg(4, 128), arg(5, 1)
    g = torch.Generator().manual_seed(1)
    images = torch.rand(n, 3, size, size, generator=g)
    labels = torch.arange(n) % 2
    torch.manual_seed(2)
    blocks = []
    c_in = 3
    for c in (4, 4):
        blocks += [nn.Conv2d(c_in, c, 3, padding=1), nn.BatchNorm2d(c), nn.ReLU(), nn.MaxPool2d(2)]
        c_in = c
    side = size // 4
    model = nn.Sequential(*blocks, nn.Flatten(), nn.Linear(4 * side * side, 2))
    model.train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    fwd = bwd = upd = 0.0
    steps = 0
    best = float("inf")
    for epoch in range(epochs):
        order = torch.randperm(n, generator=g)
        start = time.perf_counter()
        for s in range(0, n, batch):
            rows = order[s : s + batch]
            t0 = time.perf_counter()
            x = images.index_select(0, rows)
            loss = F.cross_entropy(model(x), labels[rows])
            loss.item()
            t1 = time.perf_counter()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            t2 = time.perf_counter()
            opt.step()
            t3 = time.perf_counter()
            if len(rows) == batch:
                fwd += t1 - t0
                bwd += t2 - t1
                upd += t3 - t2
                steps += 1
        secs = time.perf_counter() - start
        print(f"torch_cnn_epoch{epoch + 1} {secs:.3f}")
        best = min(best, secs)
    s = max(steps, 1)
    print(f"torch_cnn_epoch_best {best:.3f}")
    print(f"torch_cnn_step_forward {fwd / s:.4f}")
    print(f"torch_cnn_step_backward {bwd / s:.4f}")
    print(f"torch_cnn_step_optimizer {upd / s:.4f}")


def head():
    """Linear head, Adam, all rows train, the first fifth validates every epoch (as the Rust
    side's fit: loss and accuracy of the training batches, then validation in batches)."""
    n, dim, batch, epochs = arg(2, 1481), arg(3, 25088), arg(4, 128), arg(5, 30)
    g = torch.Generator().manual_seed(4)
    x = torch.rand(n, dim, generator=g)
    labels = torch.arange(n) % 2
    torch.manual_seed(5)
    model = nn.Linear(dim, 2)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    val = torch.arange(n // 5)
    start = time.perf_counter()
    for _ in range(epochs):
        model.train()
        order = torch.randperm(n, generator=g)
        loss_sum = correct = 0.0
        for s in range(0, n, batch):
            rows = order[s : s + batch]
            logits = model(x.index_select(0, rows))
            loss = F.cross_entropy(logits, labels[rows])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            loss_sum += loss.item() * len(rows)
            correct += (logits.argmax(1) == labels[rows]).sum().item()
        model.eval()
        with torch.no_grad():
            for s in range(0, len(val), batch):
                rows = val[s : s + batch]
                logits = model(x.index_select(0, rows))
                F.cross_entropy(logits, labels[rows]).item()
                (logits.argmax(1) == labels[rows]).sum().item()
    print(f"torch_head_total {time.perf_counter() - start:.3f}")


if __name__ == "__main__":
    torch.set_num_threads(int(__import__("os").environ.get("THREADS", "2")))
    {"cnn": cnn, "head": head}[sys.argv[1]]()
