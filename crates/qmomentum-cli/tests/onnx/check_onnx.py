#!/usr/bin/env python3
"""ONNX export checked by onnxruntime (run by .ci/run in a venv with onnx, onnxruntime, numpy).

For every scheme: trains a small model with the `qmomentum` binary (1 epoch; the MLP, and the CNN of
`cnn_tiny.toml`), exports it with
`export --format onnx` (and `.qmm` for quantized schemes), runs `onnx.checker.check_model` (full
check) and onnxruntime on the 10,000 Fashion-MNIST test images, and compares:

* fp32 (MLP and CNN): ONNX logits against ours (`predict --logits`): max |difference| <= 1e-4;
* quantized: ONNX predictions against the integer runtime's (`infer -o`): >= 99.5 % identical,
  test accuracies within 0.1 point; and for W8A8, onnxruntime fuses every dense layer into an
  integer kernel (no float Gemm is left in its optimized graph);
* file sizes: the W8A8 ONNX file is <= 0.3x the float one (the design document's MLP).

Usage: check_onnx.py --qmomentum PATH [--data DIR] [--work DIR] [--schemes a,b,...]
Prints a markdown table and ends with the line `onnx: N passed, M failed`.
"""

import argparse
import gzip
import json
import os
import subprocess
import sys
import tempfile

import numpy as np
import onnx
import onnxruntime as ort

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.abspath(os.path.join(HERE, "..", "..", "..", ".."))

CNN_TINY = os.path.join(HERE, "cnn_tiny.toml")
# name -> (train flags, (source scheme, quantize flags) or None): PTQ rows quantize a float
# checkpoint trained by an earlier row.
SCHEMES = {
    "fp32": (["--quant", "fp32"], None),
    "w8a8": (["--quant", "w8a8"], None),
    "w8a8-ptq": (None, ("fp32", ["--quant", "w8a8"])),
    "w4a8": (["--quant", "w4a8"], None),
    "w4a4": (["--quant", "w4a4"], None),
    "w2a2": (["--quant", "w2a2"], None),
    "ternary": (["--quant", "ternary"], None),
    "binary": (["--quant", "binary"], None),
    "binary-all": (["--quant", "binary-all"], None),
    "cnn-fp32": (["--config", CNN_TINY], None),
    "cnn-w8a8-ptq": (None, ("cnn-fp32", ["--quant", "w8a8"])),
    "cnn-w4a8-ptq": (None, ("cnn-fp32", ["--quant", "w4a8"])),
    # QAT with the batch norm folded into its convolution while it moves (layers/folded_bn.rs).
    "cnn-w8a8-qat-bn": (["--config", CNN_TINY, "--quant", "w8a8"], None),
}


def run(args):
    r = subprocess.run(args, capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed:\n{r.stdout}{r.stderr}")
    return r.stdout


def load_test(data):
    def read(name):
        path = os.path.join(data, name)
        if os.path.exists(path):
            return open(path, "rb").read()
        return gzip.open(path + ".gz").read()

    images = np.frombuffer(read("t10k-images-idx3-ubyte"), np.uint8, offset=16).reshape(-1, 784)
    labels = np.frombuffer(read("t10k-labels-idx1-ubyte"), np.uint8, offset=8).astype(np.int64)
    # The model input, computed as our data pipeline does: pixel * (1/255) in float32.
    x = images.astype(np.float32) * np.float32(1.0 / 255.0)
    return x, labels


def session(path, optimized=None):
    so = ort.SessionOptions()
    so.intra_op_num_threads = 2
    so.log_severity_level = 3
    if optimized:
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
        so.optimized_model_filepath = optimized
    return ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--qmomentum", required=True)
    ap.add_argument("--data", default=os.path.join(REPO, "data", "fashion-mnist"))
    ap.add_argument("--work", default=None)
    ap.add_argument("--schemes", default=",".join(SCHEMES))
    a = ap.parse_args()
    qm = os.path.abspath(a.qmomentum)
    work = a.work or tempfile.mkdtemp(prefix="qmomentum-onnx-")
    os.makedirs(work, exist_ok=True)
    x, labels = load_test(a.data)
    print(f"onnx {onnx.__version__}, onnxruntime {ort.__version__}, numpy {np.__version__}; work folder {work}")
    passed, failed, rows, sizes = 0, 0, [], {}

    def check(ok, what):
        nonlocal passed, failed
        if ok:
            passed += 1
        else:
            failed += 1
            print(f"FAILED: {what}")

    data = ["--data", a.data]
    for name in a.schemes.split(","):
        train, ptq = SCHEMES[name]
        d = os.path.join(work, name)
        ckpt = os.path.join(d, "checkpoint.safetensors")
        if not os.path.exists(ckpt):
            if train is not None:
                run([qm, "train", "--epochs", "1", "--lr", "0.01", "--quiet", "--out", d] + train + data)
            else:
                src = os.path.join(work, ptq[0], "checkpoint.safetensors")
                run([qm, "quantize", src, "--out", d] + ptq[1] + data)
        onnx_path = os.path.join(work, f"{name}.onnx")
        run([qm, "export", ckpt, "--format", "onnx", "-o", onnx_path])
        sizes[name] = os.path.getsize(onnx_path)
        model = onnx.load(onnx_path)
        try:
            onnx.checker.check_model(model, full_check=True)
            check(True, "")
        except Exception as e:  # noqa: BLE001 - reported, counted as a failure
            check(False, f"{name}: onnx.checker: {e}")
        opt_path = os.path.join(work, f"{name}.ort-optimized.onnx")
        logits = session(onnx_path, optimized=opt_path).run(["logits"], {"input": x})[0]
        ops = [n.op_type for n in onnx.load(opt_path).graph.node]
        fused = sorted({o for o in ops if o.startswith("Q") and o != "QuantizeLinear"})
        float_ops = sum(o in ("Gemm", "MatMul", "Conv", "FusedGemm", "FusedConv", "FusedMatMul") for o in ops)
        pred = logits.argmax(1)
        acc = float((pred == labels).mean())
        row = {"scheme": name, "bytes": sizes[name], "onnx_accuracy": acc, "fused": fused, "float_matmuls_left": float_ops}
        if name.endswith("fp32"):
            ours_path = os.path.join(work, f"{name}.logits.npy")
            run([qm, "predict", ckpt, "--logits", ours_path, "-o", os.devnull] + data)
            ours = np.load(ours_path)
            diff = float(np.abs(ours - logits).max())
            row["max_logit_diff"] = diff
            row["our_accuracy"] = float((ours.argmax(1) == labels).mean())
            row["agreement"] = float((ours.argmax(1) == pred).mean())
            check(diff <= 1e-4, f"{name}: max |logit difference| {diff:.3g} > 1e-4")
        else:
            qmm = os.path.join(work, f"{name}.qmm")
            run([qm, "export", ckpt, "-o", qmm])
            csv = os.path.join(work, f"{name}.infer.csv")
            run([qm, "infer", qmm, "-o", csv] + data)
            ours = np.loadtxt(csv, delimiter=",", skiprows=1, dtype=np.int64)
            assert (ours[:, 1] == labels).all(), "infer's labels are the test labels"
            agree = float((ours[:, 2] == pred).mean())
            our_acc = float((ours[:, 2] == labels).mean())
            row.update(agreement=agree, our_accuracy=our_acc, qmm_bytes=os.path.getsize(qmm))
            rt_logits = os.path.join(work, f"{name}.qmm.logits.npy")
            run([qm, "predict", qmm, "--logits", rt_logits, "-o", os.devnull] + data)
            row["max_logit_diff"] = float(np.abs(np.load(rt_logits) - logits).max())
            check(agree >= 0.995, f"{name}: {agree:.4f} identical predictions < 0.995")
            check(abs(acc - our_acc) <= 0.001 + 1e-9, f"{name}: accuracy ONNX {acc:.4f} vs ours {our_acc:.4f}")
            if "w8a8" in name:
                check(float_ops == 0, f"{name}: onnxruntime left {float_ops} float Gemm/MatMul/Conv (ops: {ops})")
        rows.append(row)
    if "fp32" in sizes and "w8a8" in sizes:
        ratio = sizes["w8a8"] / sizes["fp32"]
        print(f"W8A8 ONNX / fp32 ONNX file size: {sizes['w8a8']} / {sizes['fp32']} = {ratio:.3f}")
        check(ratio <= 0.3, f"W8A8 ONNX file {ratio:.3f}x the float one > 0.3x")
    print()
    print("| scheme | ONNX bytes | vs fp32 ONNX | .qmm bytes | agreement with ours | accuracy ONNX / ours | max abs logit diff | onnxruntime integer kernels |")
    print("|---|---|---|---|---|---|---|---|")
    base = sizes.get("fp32")
    for r in rows:
        rel = f"{r['bytes'] / base:.3f}x" if base and not r["scheme"].startswith("cnn") else "–"
        print(
            f"| {r['scheme']} | {r['bytes']:,} | {rel} | {r.get('qmm_bytes', '–')} | {r['agreement']:.4f} "
            f"| {r['onnx_accuracy']:.4f} / {r['our_accuracy']:.4f} | {r['max_logit_diff']:.2e} "
            f"| {', '.join(r['fused']) or 'none'} (float matmul/conv left: {r['float_matmuls_left']}) |"
        )
    with open(os.path.join(work, "results.json"), "w") as f:
        json.dump(rows, f, indent=1)
    print(f"onnx: {passed} passed, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
