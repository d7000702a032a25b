#!/usr/bin/env python3
"""PyTorch reference of QAT with batch norm folded into the convolution (`layers/folded_bn.rs`).

Run once (CI does not need PyTorch; the JSON it writes is committed):

    /tmp/torch-venv/bin/python crates/qmomentum/tests/reference/conv_bn_qat.py

It builds PyTorch's own `torch.ao.nn.intrinsic.qat.ConvBn2d` (the `_forward_approximate` path:
scale factor γ/σ_run, fake-quantized folded weights, division by the factor, batch norm), with
the weight fake-quantizer qmomentum uses for 8-bit weights (per output channel, symmetric,
narrow range: s = max|w|/127, ŵ = s·round_half_even(clamp(w·(1/s), −127, 127)), straight-through
gradient), and records, for L = Σ r·y:

* training mode (batch statistics): y, ∂L/∂x, ∂L/∂W, ∂L/∂b, ∂L/∂γ, ∂L/∂β and the running
  statistics after the step (momentum 0.1, unbiased variance);
* frozen statistics (`freeze_bn_stats`): y and the same gradients;
* evaluation: y.

Tensors are stored in qmomentum's layouts: activations NHWC, the kernel HWIO flattened to
`[kh·kw·cin, cout]`.
"""
import json
import os

import torch
import torch.nn as nn
from torch.ao.nn.intrinsic.qat import ConvBn2d
from torch.ao.quantization import QConfig

HERE = os.path.dirname(os.path.abspath(__file__))


class WeightFakeQuant8(nn.Module):
    """qmomentum's `fake_quant_weights_per_channel(bits = 8, narrow = true)` with the STE."""

    def forward(self, w):
        m = w.detach().abs().amax(dim=(1, 2, 3), keepdim=True)
        s = torch.where(m > 0, m / 127.0, torch.ones_like(m))
        inv = 1.0 / s
        q = torch.round(torch.clamp(w.detach() * inv, -127.0, 127.0)) * s
        return w + (q - w).detach()


def nhwc(t):
    return t.detach().permute(0, 2, 3, 1).reshape(-1).tolist()


def hwio(w):
    # OIHW -> [kh, kw, cin, cout] -> flat
    return w.detach().permute(2, 3, 1, 0).reshape(-1).tolist()


def run(mod, x, r, mode):
    x = x.clone().requires_grad_(True)
    for p in mod.parameters():
        p.grad = None
    if mode == "train":
        mod.train()
    elif mode == "frozen":
        mod.train()
        mod.freeze_bn_stats()
    else:
        mod.eval()
    y = mod(x)
    out = {"y": nhwc(y)}
    if mode != "eval":
        (y * r).sum().backward()
        out.update(
            dx=nhwc(x.grad),
            dw=hwio(mod.weight.grad),
            db=mod.bias.grad.tolist(),
            dgamma=mod.bn.weight.grad.tolist(),
            dbeta=mod.bn.bias.grad.tolist(),
        )
    out["running_mean"] = mod.bn.running_mean.tolist()
    out["running_var"] = mod.bn.running_var.tolist()
    return out


def main():
    torch.manual_seed(0)
    n, cin, h, w, cout = 4, 3, 6, 6, 5
    qconfig = QConfig(activation=nn.Identity, weight=WeightFakeQuant8)
    mod = ConvBn2d(cin, cout, 3, padding=1, bias=True, eps=1e-5, momentum=0.1, qconfig=qconfig)
    with torch.no_grad():
        mod.weight.uniform_(-0.5, 0.5)
        mod.bias.uniform_(-0.2, 0.2)
        mod.bn.weight.copy_(torch.tensor([1.3, -0.7, 0.9, 0.4, 1.1]))
        mod.bn.bias.copy_(torch.tensor([0.1, -0.2, 0.05, 0.3, -0.1]))
        mod.bn.running_mean.copy_(torch.tensor([0.2, -0.1, 0.0, 0.3, -0.2]))
        mod.bn.running_var.copy_(torch.tensor([0.8, 1.5, 0.6, 2.0, 1.2]))
    x = torch.rand(n, cin, h, w) * 2 - 1
    r = torch.rand(n, cout, h, w) * 2 - 1
    init = {
        "x": nhwc(x),
        "r": nhwc(r),
        "weight": hwio(mod.weight),
        "bias": mod.bias.tolist(),
        "gamma": mod.bn.weight.tolist(),
        "beta": mod.bn.bias.tolist(),
        "running_mean": mod.bn.running_mean.tolist(),
        "running_var": mod.bn.running_var.tolist(),
    }
    state = {k: v.clone() for k, v in mod.state_dict().items()}
    train = run(mod, x, r, "train")
    mod.load_state_dict(state)
    frozen = run(mod, x, r, "frozen")
    mod.load_state_dict(state)
    mod.bn.training = False
    ev = run(mod, x, r, "eval")
    ref = {
        "torch": torch.__version__,
        "shape": {"batch": n, "h": h, "w": w, "cin": cin, "cout": cout, "kernel": 3, "padding": "same"},
        "init": init,
        "train": train,
        "frozen": frozen,
        "eval": ev,
    }
    with open(os.path.join(HERE, "conv_bn_qat.json"), "w") as f:
        json.dump(ref, f)
    print("wrote conv_bn_qat.json, torch", torch.__version__)


if __name__ == "__main__":
    main()
