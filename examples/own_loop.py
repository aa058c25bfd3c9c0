"""Compress a torchvision ResNet-18 in a plain PyTorch training loop: knowledge distillation from
the float model, global magnitude pruning on a gradual schedule and 4-bit quantization-aware
training, all at once, then a ``.pcz`` file loaded back and evaluated.

    python examples/own_loop.py                          # synthetic 32x32 images, a few seconds
    python examples/own_loop.py --data fashion_mnist --steps 200 --epochs 3 --pretrain-steps 300

The compression calls are ``pycompress.loop.Compression``'s (see README, "Your own training
loop"); everything else is the loop you already have. tests/test_own_loop.py runs this file.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from typing import Any, Dict, List, Optional

import torch
import torch.nn.functional as F

from pycompress import export, models
from pycompress.data import make_loaders
from pycompress.loop import Compression
from pycompress.train import evaluate

# What to do to the model: the same mappings a recipe stage's prune: / quantize: / distill: take.
PRUNE = {
    "criterion": "global_magnitude",  # keep the largest |w| over all conv layers together
    "sparsity": 0.5,
    "schedule": "gradual",  # Zhu & Gupta's cubic ramp from 0 to 50% over the first 3/4 of the steps
    "update_interval": 2,
    "types": ["conv"],
}
QUANTIZE = {
    "weight_bits": 4,  # per output channel
    "act_bits": 8,  # per tensor, calibrated
    "first": {"weight_bits": 8},  # the stem conv and the classifier keep 8-bit weights
    "last": {"weight_bits": 8},
}
DISTILL = {"kind": "hinton", "alpha": 0.5, "temperature": 4}


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--data", choices=["synthetic", "fashion_mnist"], default="synthetic")
    p.add_argument("--data-root", default=None, help="where Fashion-MNIST is (default: found automatically)")
    p.add_argument("--epochs", type=int, default=2, help="compression epochs (default 2)")
    p.add_argument("--steps", type=int, default=5, help="optimizer steps per epoch (default 5)")
    p.add_argument("--pretrain-steps", type=int, default=30, help="plain float training first (default 30)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=0.02)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="own_loop.pcz", help="the artifact to write (default own_loop.pcz)")
    return p.parse_args(argv)


def loaders(args: argparse.Namespace):
    if args.data == "fashion_mnist":  # 28x28 padded to 32x32, one channel
        return make_loaders(
            "fashion_mnist", data_root=args.data_root, batch_size=args.batch_size, test_batch_size=256,
            seed=args.seed, pad=2, drop_last=True,
        )  # fmt: skip
    return make_loaders(
        "synthetic", batch_size=args.batch_size, test_batch_size=256, seed=args.seed, drop_last=True,
        num_classes=10, image_size=32, in_channels=3,
    )  # fmt: skip


def pretrain(model: torch.nn.Module, loader, steps: int, lr: float) -> None:
    """Your model, trained as usual (a stand-in for the checkpoint you would load)."""
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    model.train()
    done = 0
    while done < steps:
        for x, y in loader:
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            done += 1
            if done == steps:
                break


def main(argv: Optional[List[str]] = None) -> Dict[str, Any]:
    args = parse_args(argv)
    t0 = time.perf_counter()
    torch.manual_seed(args.seed)
    train_loader, test_loader, info = loaders(args)
    # torchvision's ResNet-18 (weights=None; a 1-channel stem for Fashion-MNIST), from the zoo so
    # that the artifact records how to rebuild it
    model = models.build("resnet18", in_channels=info.in_channels, num_classes=info.num_classes)
    pretrain(model, train_loader, args.pretrain_steps, args.lr)
    float_top1 = evaluate(model, test_loader)["top1"]
    teacher = copy.deepcopy(model)  # the float model teaches its compressed copy
    steps = min(args.steps, len(train_loader))

    # --- the compression loop ---------------------------------------------------------------
    comp = Compression(model, prune=PRUNE, quantize=QUANTIZE, distill=DISTILL, teacher=teacher, seed=args.seed)
    comp.calibrate(train_loader)  # activation ranges, before the first masks
    optimizer = comp.start(
        {"name": "sgd", "lr": args.lr, "momentum": 0.9, "weight_decay": 5e-4},
        epochs=args.epochs,
        steps_per_epoch=steps,
        schedule={"name": "cosine"},
    )
    for epoch in range(args.epochs):
        comp.begin_epoch(train_loader)  # seeds the epoch; train mode
        for step, (x, y) in enumerate(train_loader):
            if step == steps:
                break
            loss, logits = comp.loss(x, y)  # teacher + student forward, KD loss
            optimizer.zero_grad()
            loss.backward()
            comp.step()  # masked step, LR schedule, the pruning schedule's masks
        row = comp.end_epoch()
        print(f"epoch {row['epoch']}: loss {row['train_loss']:.4f}, lr {row['lr']:.4g}, sparsity {row['sparsity']:.1%}")
    # -----------------------------------------------------------------------------------------

    data = {"dataset": info.name, "in_channels": info.in_channels, "image_size": list(info.image_size)}
    art = comp.export(args.out, loader=test_loader, data=data, force=True)
    net = export.load(args.out)  # a plain module in eval mode, quantized codes and masks inside
    top1 = evaluate(net, test_loader)["top1"]

    sp = comp.sparsity()
    bits = {name: p["weight_bits"] for name, p in comp.plan.items()}
    wide = {n: b for n, b in bits.items() if b != QUANTIZE["weight_bits"]}
    print(f"sparsity: {sp.selected_sparsity:.1%} of the weights of {len(comp.pruner.layers)} conv layers are 0")
    print(
        f"quantized layers: {len(bits)} ({sum(b == QUANTIZE['weight_bits'] for b in bits.values())} with "
        f"{QUANTIZE['weight_bits']}-bit weights; {', '.join(f'{n} {b}-bit' for n, b in wide.items())}), "
        f"{QUANTIZE['act_bits']}-bit inputs"
    )
    print(
        f"{args.out}: {art['file_bytes']:,} bytes (float32: {art['fp32_bytes']:,}), test top-1 {top1:.2f}% "
        f"(float model before compression {float_top1:.2f}%) [{time.perf_counter() - t0:.1f} s]"
    )
    return {
        "path": args.out,
        "file_bytes": art["file_bytes"],
        "fp32_bytes": art["fp32_bytes"],
        "top1": top1,
        "export_top1": art.get("top1"),
        "float_top1": float_top1,
        "sparsity": sp.selected_sparsity,
        "weight_bits": bits,
        "history": comp.history,
    }


if __name__ == "__main__":
    main(sys.argv[1:])
    sys.exit(0)
