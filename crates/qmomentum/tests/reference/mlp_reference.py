"""Reference for tests/reference.rs: a 6-5-4-3 MLP (relu, relu, softmax), sparse categorical
cross-entropy, and three steps of Momentum in both conventions, written directly from the
formulas in float64 with NumPy (independent of the Rust code).

Regenerate: python3 mlp_reference.py > mlp_reference.json
"""
import json
import numpy as np

rng = np.random.default_rng(1234)
sizes = [6, 5, 4, 3]
W = [rng.uniform(-0.8, 0.8, size=(sizes[i], sizes[i + 1])) for i in range(3)]
b = [rng.uniform(-0.1, 0.1, size=(sizes[i + 1],)) for i in range(3)]
X = rng.uniform(0, 1, size=(4, 6))
y = np.array([0, 2, 1, 2])
LR, MU = 0.1, 0.9


def forward_backward(W, b):
    a0 = X
    z1 = a0 @ W[0] + b[0]; a1 = np.maximum(z1, 0)
    z2 = a1 @ W[1] + b[1]; a2 = np.maximum(z2, 0)
    z3 = a2 @ W[2] + b[2]
    m = z3.max(axis=1, keepdims=True)
    p = np.exp(z3 - m); p /= p.sum(axis=1, keepdims=True)
    n = X.shape[0]
    loss = -np.log(p[np.arange(n), y]).mean()
    d3 = p.copy(); d3[np.arange(n), y] -= 1; d3 /= n
    gW3 = a2.T @ d3; gb3 = d3.sum(0)
    d2 = (d3 @ W[2].T) * (z2 > 0)
    gW2 = a1.T @ d2; gb2 = d2.sum(0)
    d1 = (d2 @ W[1].T) * (z1 > 0)
    gW1 = a0.T @ d1; gb1 = d1.sum(0)
    return z3, loss, [gW1, gW2, gW3], [gb1, gb2, gb3]


out = {"x": X.ravel().tolist(), "y": y.tolist(), "lr": LR, "momentum": MU,
       "w0": [w.ravel().tolist() for w in W], "b0": [v.tolist() for v in b]}
logits, loss, gW, gb = forward_backward(W, b)
out["logits"] = logits.ravel().tolist()
out["loss"] = float(loss)
out["grad_w"] = [g.ravel().tolist() for g in gW]
out["grad_b"] = [g.tolist() for g in gb]
for conv in ["lr_inside", "lr_outside"]:
    Wc = [w.copy() for w in W]; bc = [v.copy() for v in b]
    vel = [np.zeros_like(p) for p in Wc + bc]
    traj = []
    for step in range(3):
        _, l, gW, gb = forward_backward(Wc, bc)
        params = Wc + bc; grads = gW + gb
        for i, (p, g) in enumerate(zip(params, grads)):
            if conv == "lr_inside":          # v <- mu v + lr g ; theta <- theta - v (design doc, Keras)
                vel[i] = MU * vel[i] + LR * g
                p -= vel[i]
            else:                            # b <- g (first step) / mu b + g ; theta <- theta - lr b (PyTorch)
                vel[i] = g.copy() if step == 0 else MU * vel[i] + g
                p -= LR * vel[i]
        traj.append({"loss": float(l), "w": [w.ravel().tolist() for w in Wc], "b": [v.tolist() for v in bc]})
    out["steps_" + conv] = traj
print(json.dumps(out))
