"""Is bf16 autocast worth it on this CPU? Training steps of a timm model in fp32 and in bf16, interleaved.

    python benchmarks/cpu_precision.py                     # resnet18, 128 px, batch 16
    python benchmarks/cpu_precision.py --size 224 --bs 32

A step is what the trainer does on a CPU: channels-last forward, backward and PyTorch's fused AdamW,
with `torch.autocast("cpu", torch.bfloat16)` around the forward pass for bf16. The two take turns step
by step, so a busy machine slows them alike. The last line is one JSON object; whether the CPU computes
bf16 natively (AVX512-BF16 or AMX) is in it: elsewhere PyTorch emulates bf16.
"""
import argparse
import json
import time

from imagelab import run_cli


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--arch", default="resnet18")
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--bs", type=int, default=16)
    p.add_argument("--steps", type=int, default=4, help="timed steps of each, after one untimed")
    return p.parse_args(argv)


def main(argv=None):
    args = parse(argv)
    import timm
    import torch
    from imagelab.device import cpu_has_bf16
    torch.manual_seed(0)
    model = timm.create_model(args.arch, num_classes=2).to(memory_format=torch.channels_last)
    opt = torch.optim.AdamW(model.parameters(), fused=True)
    x = torch.randn(args.bs, 3, args.size, args.size).to(memory_format=torch.channels_last)
    y = torch.randint(0, 2, (args.bs,))

    def step(bf16):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad()

    seconds = {"fp32": 0.0, "bf16": 0.0}
    for name in seconds:
        step(name == "bf16")
    for _ in range(args.steps):
        for name in seconds:
            start = time.perf_counter()
            step(name == "bf16")
            seconds[name] += time.perf_counter() - start
    images = args.steps * args.bs
    out = {"arch": args.arch, "size": args.size, "bs": args.bs, "native_bf16": cpu_has_bf16(),
           "fp32_images_per_s": round(images / seconds["fp32"], 1),
           "bf16_images_per_s": round(images / seconds["bf16"], 1),
           "bf16_speedup": round(seconds["fp32"] / seconds["bf16"], 2)}
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    run_cli(main)
