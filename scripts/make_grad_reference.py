#!/usr/bin/env python3
"""Writes the PyTorch reference for tests/train_grad_reference.rs:

  tests/data/cnn_grad_model.safetensors      a tiny baseline CNN in this project's format
                                             (block{i}.conv.*, block{i}.bn.*, fc.*, with the
                                             shape metadata Cnn::load reads)
  tests/data/cnn_grad_reference.safetensors  its inputs (images, labels as f32) and PyTorch's
                                             results for one training-mode step: logits,
                                             loss, every parameter's gradient (grad.<name>),
                                             the updated BN running statistics (after.<name>)

The model: Conv3x3(3->2)+BN+ReLU+MaxPool, Conv3x3(2->3)+BN+ReLU+MaxPool, Linear(3*2*2 -> 2),
on 5 random 8x8 images, mean cross-entropy, fixed seed, f32. BN affine parameters are drawn
away from 1/0 so their gradients are exercised. Repeated flat regions (equal pixels) make
max-pool ties, so the tie rule is compared too.

Run: .venv-bench/bin/python scripts/make_grad_reference.py   (needs only torch)
"""
import json
import os
import struct

import torch
import torch.nn as nn
import torch.nn.functional as F

OUT = os.path.join(os.path.dirname(__file__), "..", "tests", "data")


def write_safetensors(path, tensors, metadata=None):
    """Minimal safetensors writer (f32, little endian), so that no extra package is needed."""
    header, blobs, offset = {}, [], 0
    for name, t in tensors.items():
        t = t.detach().to(torch.float32).contiguous()
        raw = struct.pack(f"<{t.numel()}f", *t.flatten().tolist())
        header[name] = {
            "dtype": "F32",
            "shape": list(t.shape),
            "data_offsets": [offset, offset + len(raw)],
        }
        blobs.append(raw)
        offset += len(raw)
    if metadata:
        header["__metadata__"] = metadata
    h = json.dumps(header, separators=(",", ":")).encode()
    h += b" " * ((8 - len(h) % 8) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(h)))
        f.write(h)
        for b in blobs:
            f.write(b)


def main():
    torch.manual_seed(1234)
    channels, size, classes, n = [2, 3], 8, 2, 5
    blocks, c_in = [], 3
    for c in channels:
        conv, bn = nn.Conv2d(c_in, c, 3, padding=1), nn.BatchNorm2d(c)
        with torch.no_grad():
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.3, 0.3)
        blocks.append((conv, bn))
        c_in = c
    side = size // 2 ** len(channels)
    fc = nn.Linear(c_in * side * side, classes)

    images = torch.rand(n, 3, size, size)
    # A flat 4x4 patch in image 0 (all channels): ties inside pooling windows.
    images[0, :, 2:6, 2:6] = 0.5
    labels = torch.tensor([0, 1, 1, 0, 1])

    model = {}
    for i, (conv, bn) in enumerate(blocks):
        model[f"block{i}.conv.weight"] = conv.weight
        model[f"block{i}.conv.bias"] = conv.bias
        model[f"block{i}.bn.weight"] = bn.weight
        model[f"block{i}.bn.bias"] = bn.bias
        model[f"block{i}.bn.running_mean"] = bn.running_mean.clone()
        model[f"block{i}.bn.running_var"] = bn.running_var.clone()
    model["fc.weight"] = fc.weight
    model["fc.bias"] = fc.bias
    meta = {
        "channels": json.dumps(channels),
        "input_size": str(size),
        "classes": str(classes),
    }
    os.makedirs(OUT, exist_ok=True)
    write_safetensors(os.path.join(OUT, "cnn_grad_model.safetensors"), model, meta)

    x = images
    for conv, bn in blocks:
        bn.train()
        x = F.max_pool2d(F.relu(bn(conv(x))), 2)
    logits = fc(x.flatten(1))
    loss = F.cross_entropy(logits, labels)
    loss.backward()

    ref = {"images": images, "labels": labels.float(), "logits": logits, "loss": loss.reshape(1)}
    for name, t in model.items():
        if "running" in name:
            continue
        ref[f"grad.{name}"] = t.grad
    for i, (_, bn) in enumerate(blocks):
        ref[f"after.block{i}.bn.running_mean"] = bn.running_mean
        ref[f"after.block{i}.bn.running_var"] = bn.running_var
    write_safetensors(
        os.path.join(OUT, "cnn_grad_reference.safetensors"),
        ref,
        {"torch": torch.__version__, "script": "scripts/make_grad_reference.py"},
    )
    print(f"loss {loss.item():.6f}; wrote {OUT}/cnn_grad_*.safetensors")


if __name__ == "__main__":
    main()
