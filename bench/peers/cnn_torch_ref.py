"""cnn-small in PyTorch with qmomentum's recipe, for side-by-side accuracy and epoch time: Conv(32,
3x3, same)-BN-ReLU-MaxPool2, Conv(64, 3x3, same)-BN-ReLU-MaxPool2, Flatten, Dense(10); Glorot-uniform
kernels and zero biases (qmomentum's and Keras's initialisation), BatchNorm2d's defaults (momentum
0.1, eps 1e-5, as configs/cnn_small.toml), SGD momentum 0.9 with lr outside the velocity (qmomentum
`--convention pytorch`), batch 128, and the learning-rate schedule of qmomentum's `--schedule`:
constant, or `cosine` = lr·½(1 + cos(π·step/total_steps)) per optimizer step. Prints one JSON line.

    python bench/peers/cnn_torch_ref.py --lr 0.05 --schedule cosine --seed 0
    qmomentum train --model cnn-small --lr 0.05 --schedule cosine --convention pytorch --seed 0
"""
import argparse
import json
import math
import time

import torch
import torch.nn as nn

from common import load

ap = argparse.ArgumentParser()
ap.add_argument("--data", default="data/fashion-mnist")
ap.add_argument("--lr", type=float, default=0.01)
ap.add_argument("--schedule", choices=["constant", "cosine"], default="constant")
ap.add_argument("--seed", type=int, default=0)
ap.add_argument("--epochs", type=int, default=10)
a = ap.parse_args()
torch.set_num_threads(2)
torch.manual_seed(a.seed)
xtr, ytr, xte, yte = (torch.from_numpy(v) for v in load(a.data))
xtr, xte = xtr.reshape(-1, 1, 28, 28), xte.reshape(-1, 1, 28, 28)
m = nn.Sequential(
    nn.Conv2d(1, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
    nn.Conv2d(32, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(), nn.MaxPool2d(2),
    nn.Flatten(), nn.Linear(64 * 7 * 7, 10),
)
for layer in m:
    if isinstance(layer, (nn.Conv2d, nn.Linear)):
        nn.init.xavier_uniform_(layer.weight)
        nn.init.zeros_(layer.bias)
opt = torch.optim.SGD(m.parameters(), lr=a.lr, momentum=0.9)
steps_per_epoch = math.ceil(len(xtr) / 128)
total = a.epochs * steps_per_epoch
factor = (lambda s: 0.5 * (1 + math.cos(math.pi * min(s / total, 1.0)))) if a.schedule == "cosine" else (lambda s: 1.0)
sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
lossf = nn.CrossEntropyLoss()
times = []
for epoch in range(a.epochs):
    m.train()
    perm = torch.randperm(len(xtr))
    t0 = time.perf_counter()
    for i in range(0, len(xtr), 128):
        b = perm[i : i + 128]
        opt.zero_grad()
        lossf(m(xtr[b]), ytr[b]).backward()
        opt.step()
        sched.step()
    times.append(time.perf_counter() - t0)
m.eval()
with torch.no_grad():
    acc = (m(xte).argmax(1) == yte).float().mean().item()
print(json.dumps({"peer": "torch", "net": "cnn-small", "lr": a.lr, "schedule": a.schedule, "seed": a.seed,
                  "epoch_s": sorted(times)[len(times) // 2], "test_accuracy": acc}))
