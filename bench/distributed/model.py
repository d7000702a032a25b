#!/usr/bin/env python3
"""Predicted data-parallel scaling of qmomentum beyond this machine (doc/distributed.md).

Weak scaling: every node computes a per-rank batch of 128 (the global batch grows with N, as
large data-parallel jobs run), one rank per node, synchronous SGD, one allreduce of the whole
gradient per step, no overlap of the allreduce with the backward pass:

    T_step(N) = T_compute + T_allreduce(N)
    T_allreduce(N) = 2·ceil(log2 N)·alpha + 2·(N−1)/N · bytes / bandwidth

(Rabenseifner's reduce-scatter + allgather: the bandwidth term of a ring, the latency term of a
tree; Open MPI's tuned component picks algorithms of this cost for these sizes.) Efficiency is
T_compute / T_step: the fraction of the ideal N× speed-up in samples/s.

Inputs: T_compute is measured here (1 core per rank, see bench/distributed/run.sh); alpha and
bandwidth are assumptions for the links (stated in the table), not measurements: this machine has
no network.
"""
import math
import sys

# Measured on this machine (2026-11-25, Zen 5, 1 core per rank), seconds per step at 128 rows:
# the 2 ranks × 1 thread runs of bench/distributed/run.sh, communication time removed, per-rank
# rows scaled from 64 (MLP) / 128 (cnn-small) to 128.
T_COMPUTE = {
    "MLP (437,544 B of gradient)": (float(sys.argv[1]) if len(sys.argv) > 1 else 0.90e-3, 437_544),
    "cnn-small (201,512 B)": (float(sys.argv[2]) if len(sys.argv) > 2 else 102e-3, 201_512),
}
# Links: (name, bandwidth in bytes/s, per-message latency alpha in s).
LINKS = [
    ("10 Gb/s Ethernet, TCP (α = 25 µs)", 10e9 / 8, 25e-6),
    ("25 Gb/s Ethernet, TCP (α = 15 µs)", 25e9 / 8, 15e-6),
    ("100 Gb/s InfiniBand/RoCE, RDMA (α = 2 µs)", 100e9 / 8, 2e-6),
]
NODES = [8, 64, 512]


def allreduce(n, nbytes, bw, alpha):
    return 2 * math.ceil(math.log2(n)) * alpha + 2 * (n - 1) / n * nbytes / bw


print("| model | link | " + " | ".join(f"N = {n}: allreduce ms / efficiency" for n in NODES) + " |")
print("|---|---|" + "---:|" * len(NODES))
for model, (tc, nbytes) in T_COMPUTE.items():
    for link, bw, alpha in LINKS:
        cells = []
        for n in NODES:
            ar = allreduce(n, nbytes, bw, alpha)
            cells.append(f"{ar * 1e3:.2f} / {100 * tc / (tc + ar):.0f} %")
        print(f"| {model}, step {tc * 1e3:.2f} ms | {link} | " + " | ".join(cells) + " |")
