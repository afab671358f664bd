"""The model's training step alone, on any device: fp32 against bf16 autocast, and on a CUDA GPU cuDNN's choices.

    python benchmarks/model_step.py                                  # this CPU: resnet18, 128 px, batch 16
    python benchmarks/model_step.py --size 224 --bs 32
    python benchmarks/model_step.py --device cuda --size 224 --bs 64 --steps 20      # in gpu_check.sh

A step is what the trainer does: channels-last forward, cross-entropy, backward and PyTorch's fused AdamW,
with `torch.autocast(device, torch.bfloat16)` around the forward pass for bf16, on synthetic batches (no data
path, no fastai): the most the trainer could reach on this device. The variants take turns step by step, so
a busy machine slows them alike. On a CUDA GPU a third variant runs bf16 with cuDNN free to pick its fastest
algorithms (`cudnn.benchmark`, not deterministic); the others run as the trainer does, deterministic (fastai's
`set_seed(..., reproducible=True)`). The last line is one JSON object; whether a CPU computes bf16 natively
(AVX512-BF16 or AMX) is in it: elsewhere PyTorch emulates bf16.
"""
import json
import time

from imagelab import ArgumentParser, run_cli


def parse(argv=None):
    p = ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", default="resnet18", help="timm architecture")
    p.add_argument("--size", type=int, default=128, help="input size in pixels")
    p.add_argument("--bs", type=int, default=16, help="batch size")
    p.add_argument("--steps", type=int, default=4, help="timed steps of each, after one untimed")
    p.add_argument("--device", default="cpu", help="auto, cpu, cuda, cuda:N, mps")
    return p.parse_args(argv)


def main(argv=None):
    args = parse(argv)
    import timm
    import torch
    from imagelab.device import cpu_has_bf16, pick_device
    device = pick_device(args.device)
    torch.manual_seed(0)
    model = timm.create_model(args.arch, num_classes=2).to(device, memory_format=torch.channels_last)
    opt = torch.optim.AdamW(model.parameters(), fused=True)
    x = torch.randn(args.bs, 3, args.size, args.size, device=device).to(memory_format=torch.channels_last)
    y = torch.randint(0, 2, (args.bs,), device=device)
    cudnn = torch.backends.cudnn

    def step(variant):
        cudnn.deterministic = variant != "cudnn_benchmark"
        cudnn.benchmark = variant == "cudnn_benchmark"
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=variant != "fp32"):
            loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        elif device.type == "mps":
            torch.mps.synchronize()

    seconds = dict.fromkeys(["fp32", "bf16", *(["cudnn_benchmark"] if device.type == "cuda" else [])], 0.0)
    for name in seconds:
        step(name)
    for _ in range(args.steps):
        for name in seconds:
            start = time.perf_counter()
            step(name)
            seconds[name] += time.perf_counter() - start
    images = args.steps * args.bs
    out = {"arch": args.arch, "size": args.size, "bs": args.bs, "device": str(device),
           "native_bf16": cpu_has_bf16() if device.type == "cpu" else None,
           "fp32_images_per_s": round(images / seconds["fp32"], 1),
           "bf16_images_per_s": round(images / seconds["bf16"], 1),
           "bf16_speedup": round(seconds["fp32"] / seconds["bf16"], 2)}
    if "cudnn_benchmark" in seconds:  # bf16 again, with cuDNN's fastest algorithms over its deterministic ones
        out.update(cudnn_benchmark_images_per_s=round(images / seconds["cudnn_benchmark"], 1),
                   cudnn_benchmark_speedup=round(seconds["bf16"] / seconds["cudnn_benchmark"], 2))
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    run_cli(main)
