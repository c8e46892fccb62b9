#!/usr/bin/env python3
"""PyTorch side of scripts/bench_extract.sh (CPU) and scripts/gpu_check.sh (CUDA): VGG16's conv
stack (features only).

Builds the same 13-conv / 5-pool stack as torchvision's vgg16().features with random weights
(timing does not depend on the values, and this avoids a torchvision dependency), then prints
one line the shell script parses:

    RESULT impl=pytorch precision=<mode> batch=N size=S threads=T best_s=... ms_per_image=...
           images_per_s=... gflops=...

Modes: plain (NCHW), channels_last (NHWC memory format), bf16 (= --dtype bf16, channels_last).
--dtype picks the arithmetic: f32 (on CUDA with TF32 off in cuBLAS and cuDNN, PyTorch's cuDNN
default being on), tf32, f16, bf16. On CUDA cuDNN's autotuner is on, the clock stops after
torch.cuda.synchronize(), and peak_mib is torch.cuda.max_memory_allocated() over the timed runs.
Best of --reps timed runs after one warm-up run.
"""

import argparse
import time
import warnings

# torch warns at import when numpy is absent; the benchmark does not use numpy.
warnings.filterwarnings("ignore", message="Failed to initialize NumPy")
import torch  # noqa: E402
from torch import nn  # noqa: E402

CFG = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"]


def features() -> nn.Sequential:
    layers, cin = [], 3
    for v in CFG:
        if v == "M":
            layers.append(nn.MaxPool2d(2, 2))
        else:
            layers += [nn.Conv2d(cin, v, 3, padding=1), nn.ReLU(inplace=True)]
            cin = v
    return nn.Sequential(*layers)


def conv_gflop(size: int) -> float:
    total, cin, s = 0.0, 3, size
    for v in CFG:
        if v == "M":
            s //= 2
        else:
            total += 2 * 9 * cin * v * s * s
            cin = v
    return total / 1e9


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mode", choices=["plain", "channels_last", "bf16"], default="channels_last")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    ap.add_argument("--dtype", choices=["f32", "tf32", "f16", "bf16"], default="f32")
    args = ap.parse_args()
    if args.mode == "bf16":
        args.dtype = "bf16"

    cuda = args.device.startswith("cuda")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    if cuda:
        torch.backends.cudnn.benchmark = True
        tf32 = args.dtype == "tf32"
        torch.backends.cuda.matmul.allow_tf32 = tf32
        torch.backends.cudnn.allow_tf32 = tf32
    dtype = {"f32": torch.float32, "tf32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}[
        args.dtype
    ]
    model = features().eval().to(args.device, dtype)
    x = torch.randn(args.batch, 3, args.size, args.size).to(args.device, dtype)
    if args.mode in ("channels_last", "bf16"):
        model = model.to(memory_format=torch.channels_last)
        x = x.to(memory_format=torch.channels_last)

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    best = float("inf")
    with torch.inference_mode():
        model(x)  # warm-up: oneDNN primitive creation / cuDNN autotuning, allocator growth
        sync()
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        cpu_start = time.process_time()
        for _ in range(args.reps):
            t = time.perf_counter()
            out = model(x)
            sync()
            best = min(best, time.perf_counter() - t)
            del out
    cpu_per_image = (time.process_time() - cpu_start) / (args.reps * args.batch)
    peak = f" peak_mib={torch.cuda.max_memory_allocated() / 2**20:.0f}" if cuda else ""
    ips = args.batch / best
    print(
        f"RESULT impl=pytorch precision={args.mode} dtype={args.dtype} device={args.device} "
        f"batch={args.batch} size={args.size} "
        f"threads={torch.get_num_threads()} best_s={best:.4f} ms_per_image={1e3 * best / args.batch:.2f} "
        f"images_per_s={ips:.3f} gflops={ips * conv_gflop(args.size):.1f} "
        f"cpu_ms_per_image={1e3 * cpu_per_image:.0f}{peak} torch={torch.__version__}"
    )


if __name__ == "__main__":
    main()
