"""The same MLP and hyper-parameters in PyTorch, with Keras's initialisation (glorot uniform,
zero bias) so that the accuracies are comparable. Prints one JSON line."""
import argparse
import json
import time

import torch
import torch.nn.functional as F

from common import load

ap = argparse.ArgumentParser()
ap.add_argument("--data", default="data/fashion-mnist")
ap.add_argument("--lr", type=float, default=0.001)
ap.add_argument("--seed", type=int, default=0)
ap.add_argument("--epochs", type=int, default=10)
a = ap.parse_args()
torch.set_num_threads(2)
torch.manual_seed(a.seed)
xtr, ytr, xte, yte = (torch.from_numpy(v) for v in load(a.data))
model = torch.nn.Sequential(torch.nn.Linear(784, 128), torch.nn.ReLU(), torch.nn.Linear(128, 64), torch.nn.ReLU(), torch.nn.Linear(64, 10))
for m in model:
    if isinstance(m, torch.nn.Linear):
        torch.nn.init.xavier_uniform_(m.weight)
        torch.nn.init.zeros_(m.bias)
opt = torch.optim.SGD(model.parameters(), lr=a.lr, momentum=0.9)
times = []
for epoch in range(a.epochs):
    t0 = time.perf_counter()
    perm = torch.randperm(len(xtr))
    for i in range(0, len(xtr), 128):
        idx = perm[i : i + 128]
        opt.zero_grad()
        F.cross_entropy(model(xtr[idx]), ytr[idx]).backward()
        opt.step()
    times.append(time.perf_counter() - t0)
with torch.inference_mode():
    acc = (model(xte).argmax(1) == yte).float().mean().item()
print(json.dumps({"peer": "torch", "lr": a.lr, "seed": a.seed, "epoch_s": sorted(times[1:])[len(times[1:]) // 2], "test_accuracy": acc}))
