#!/usr/bin/env python3
"""Writes the PyTorch reference for the block-5 fine-tuning test (tests/block5.rs):

  tests/data/block5_reference.safetensors   (all f64)
    features.24/26/28.weight / .bias   block 5's three convolutions (torchvision's names, so the
                                       file opens as the model's `Weights`), C -> C, 3x3
    fc.weight, fc.bias                 the linear head on block 5's pooled output
    x                                  block-4 activations [N, C, S, S] (ReLU'd: non-negative)
    labels                             class indices (as f64)
    logits, loss                       PyTorch's results (mean cross-entropy)
    grad.<name>                        the gradient of every parameter above

The model is exactly what `Block5Head` computes: (Conv3x3 pad 1 + ReLU) x 3, MaxPool2d(2),
flatten (C,H,W order), Linear. Small channels (C = 8, S = 6, N = 5, 3 classes), seeded,
in float64 so the Rust test can compare to 1e-5 relative.

Run: /work/venv-torch/bin/python scripts/make_block5_reference.py   (needs only torch)
"""
import json
import os
import struct

import torch
import torch.nn.functional as F

OUT = os.path.join(os.path.dirname(__file__), "..", "tests", "data")


def write_safetensors(path, tensors):
    """Minimal safetensors writer (f64, little endian), so that no extra package is needed."""
    header, blobs, offset = {}, [], 0
    for name, t in tensors.items():
        t = t.detach().to(torch.float64).contiguous()
        raw = struct.pack(f"<{t.numel()}d", *t.flatten().tolist())
        header[name] = {
            "dtype": "F64",
            "shape": list(t.shape),
            "data_offsets": [offset, offset + len(raw)],
        }
        blobs.append(raw)
        offset += len(raw)
    h = json.dumps(header, separators=(",", ":")).encode()
    h += b" " * ((8 - len(h) % 8) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(h)))
        f.write(h)
        for b in blobs:
            f.write(b)


def main():
    torch.manual_seed(2024)
    c, s, n, classes = 8, 6, 5, 3
    params = {}
    for index in (24, 26, 28):
        bound = 1.0 / (c * 9) ** 0.5
        params[f"features.{index}.weight"] = (torch.rand(c, c, 3, 3, dtype=torch.float64) * 2 - 1) * bound * 3
        params[f"features.{index}.bias"] = (torch.rand(c, dtype=torch.float64) * 2 - 1) * 0.1
    dim = c * (s // 2) ** 2
    params["fc.weight"] = (torch.rand(classes, dim, dtype=torch.float64) * 2 - 1) / dim**0.5
    params["fc.bias"] = (torch.rand(classes, dtype=torch.float64) * 2 - 1) / dim**0.5
    for p in params.values():
        p.requires_grad_(True)
    x = torch.relu(torch.randn(n, c, s, s, dtype=torch.float64))
    labels = torch.tensor([0, 2, 1, 1, 0])

    h = x
    for index in (24, 26, 28):
        h = F.relu(F.conv2d(h, params[f"features.{index}.weight"], params[f"features.{index}.bias"], padding=1))
    h = F.max_pool2d(h, 2).flatten(1)
    logits = h @ params["fc.weight"].t() + params["fc.bias"]
    loss = F.cross_entropy(logits, labels)
    loss.backward()

    out = dict(params)
    out["x"] = x
    out["labels"] = labels.to(torch.float64)
    out["logits"] = logits
    out["loss"] = loss.reshape(1)
    for name, p in params.items():
        out[f"grad.{name}"] = p.grad
    os.makedirs(OUT, exist_ok=True)
    path = os.path.join(OUT, "block5_reference.safetensors")
    write_safetensors(path, out)
    print(f"wrote {path}: loss {loss.item():.6f}")


if __name__ == "__main__":
    main()
