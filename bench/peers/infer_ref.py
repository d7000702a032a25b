"""Integer inference of the design document's MLP in TFLite and onnxruntime, for a side-by-side
comparison with `qmomentum bench runtime` (driven by bench/peers/infer.sh).

  infer_ref.py prepare --out DIR    trains the Keras MLP (1 epoch, SGD lr 0.01 momentum 0.9),
                                    writes DIR/model_int8.tflite (full-integer int8, int8 in and
                                    out) and DIR/model_int8.onnx (onnxruntime static QDQ, U8S8,
                                    per-channel weights), both calibrated on 1000 train images
  infer_ref.py time --runtime tflite|ort --out DIR
  infer_ref.py time --runtime ort-qmomentum --model M.onnx --out DIR
  --net cnn-small                   the CNN issue's cnn-small instead (Keras, NHWC: conv 32 3x3
                                    same - BN - ReLU - max pool 2 - conv 64 3x3 same - BN - ReLU -
                                    max pool 2 - flatten - dense 10), TFLite only (prepare writes
                                    no ONNX model for it)
                                    (ort-qmomentum: onnxruntime running qmomentum's own ONNX
                                    export, `qmomentum export --format onnx`, input `input`)
                                    prints one JSON line: batch-1 latency (median of 2000 calls
                                    after 200 warm-up), batch-10000 samples/s (median of 7 calls
                                    after 1 warm-up), test accuracy; 2 threads

As in qmomentum's own timing, the input is quantized outside the timer for TFLite (int8 input)
and the batch-1 call includes setting the input and reading the output.
"""
import argparse
import json
import os
import statistics
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
import numpy as np  # noqa: E402

from common import load  # noqa: E402

ap = argparse.ArgumentParser()
ap.add_argument("mode", choices=["prepare", "time"])
ap.add_argument("--runtime", choices=["tflite", "ort", "ort-qmomentum"])
ap.add_argument("--model", help="the ONNX file of --runtime ort-qmomentum")
ap.add_argument("--out", required=True)
ap.add_argument("--data", default="data/fashion-mnist")
ap.add_argument("--net", choices=["mlp", "cnn-small"], default="mlp")
a = ap.parse_args()
xtr, ytr, xte, yte = load(a.data)
SHAPE = (784,) if a.net == "mlp" else (28, 28, 1)
xtr, xte = xtr.reshape((-1,) + SHAPE), xte.reshape((-1,) + SHAPE)
calib = xtr[:1000]


def prepare():
    import keras
    import tensorflow as tf

    tf.config.threading.set_intra_op_parallelism_threads(2)
    keras.utils.set_random_seed(0)
    L = keras.layers
    if a.net == "mlp":
        model = keras.Sequential([
            keras.Input(shape=(784,)),
            L.Dense(128, activation="relu"),
            L.Dense(64, activation="relu"),
            L.Dense(10, activation="softmax"),
        ])
    else:
        model = keras.Sequential([
            keras.Input(shape=(28, 28, 1)),
            L.Conv2D(32, 3, padding="same"), L.BatchNormalization(), L.ReLU(), L.MaxPooling2D(),
            L.Conv2D(64, 3, padding="same"), L.BatchNormalization(), L.ReLU(), L.MaxPooling2D(),
            L.Flatten(), L.Dense(10, activation="softmax"),
        ])
    model.compile(optimizer=keras.optimizers.SGD(learning_rate=0.01, momentum=0.9),
                  loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    model.fit(xtr, ytr, epochs=1, batch_size=128, verbose=0)
    os.makedirs(a.out, exist_ok=True)

    # TFLite full-integer int8.
    saved = os.path.join(a.out, "saved_model")
    model.export(saved, format="tf_saved_model", verbose=False)
    conv = tf.lite.TFLiteConverter.from_saved_model(saved)
    conv.optimizations = [tf.lite.Optimize.DEFAULT]
    conv.representative_dataset = lambda: ([calib[i:i + 1]] for i in range(len(calib)))
    conv.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    conv.inference_input_type = tf.int8
    conv.inference_output_type = tf.int8
    with open(os.path.join(a.out, "model_int8.tflite"), "wb") as f:
        f.write(conv.convert())
    if a.net != "mlp":
        return

    # ONNX fp32 from the same weights, then onnxruntime static quantization (QDQ, U8S8).
    import onnx
    from onnx import TensorProto, helper, numpy_helper
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    nodes, inits, prev = [], [], "x"
    for i, layer in enumerate(model.layers):
        w, b = layer.get_weights()
        inits += [numpy_helper.from_array(w.astype(np.float32), f"w{i}"),
                  numpy_helper.from_array(b.astype(np.float32), f"b{i}")]
        nodes.append(helper.make_node("Gemm", [prev, f"w{i}", f"b{i}"], [f"g{i}"]))
        prev = f"g{i}"
        if i < 2:
            nodes.append(helper.make_node("Relu", [prev], [f"r{i}"]))
            prev = f"r{i}"
    nodes.append(helper.make_node("Softmax", [prev], ["y"], axis=1))
    graph = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 784])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 10])], inits)
    fp32 = os.path.join(a.out, "model_fp32.onnx")
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), fp32)

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = iter(calib[i:i + 1] for i in range(len(calib)))

        def get_next(self):
            x = next(self.it, None)
            return None if x is None else {"x": x}

    quantize_static(fp32, os.path.join(a.out, "model_int8.onnx"), Reader(), quant_format=QuantFormat.QDQ,
                    per_channel=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)


def timed(call, n):
    v = []
    for _ in range(n):
        t0 = time.perf_counter_ns()
        call()
        v.append((time.perf_counter_ns() - t0) / 1e9)
    return statistics.median(v)


def time_tflite():
    import tensorflow as tf

    path = os.path.join(a.out, "model_int8.tflite")
    big = tf.lite.Interpreter(model_path=path, num_threads=2)
    inp = big.get_input_details()[0]
    scale, zp = inp["quantization"]
    q = np.clip(np.round(xte / scale) + zp, -128, 127).astype(np.int8)
    big.resize_tensor_input(inp["index"], [len(q), *SHAPE])
    big.allocate_tensors()
    big.set_tensor(inp["index"], q)
    out = big.get_output_details()[0]["index"]
    big.invoke()
    thr = len(q) / timed(big.invoke, 7)
    acc = float((big.get_tensor(out).argmax(1) == yte).mean())
    one = tf.lite.Interpreter(model_path=path, num_threads=2)
    one.allocate_tensors()
    i1 = one.get_input_details()[0]["index"]
    o1 = one.get_output_details()[0]["index"]
    k = [0]

    def call():
        r = k[0] % len(q)
        k[0] += 1
        one.set_tensor(i1, q[r:r + 1])
        one.invoke()
        one.get_tensor(o1)

    for _ in range(200):
        call()
    return timed(call, 2000), thr, acc


def time_ort(path, name):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = 2
    so.inter_op_num_threads = 1
    s = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
    outs = None if name == "x" else ["logits"]  # our export also has `probabilities`
    s.run(outs, {name: xte})
    res = [None]

    def big():
        res[0] = s.run(outs, {name: xte})[0]

    thr = len(xte) / timed(big, 7)
    acc = float((res[0].argmax(1) == yte).mean())
    k = [0]

    def call():
        r = k[0] % len(xte)
        k[0] += 1
        s.run(outs, {name: xte[r:r + 1]})

    for _ in range(200):
        call()
    return timed(call, 2000), thr, acc


if a.mode == "prepare":
    prepare()
else:
    if a.runtime == "tflite":
        lat, thr, acc = time_tflite()
    elif a.runtime == "ort":
        lat, thr, acc = time_ort(os.path.join(a.out, "model_int8.onnx"), "x")
    else:
        lat, thr, acc = time_ort(a.model, "input")
    print(json.dumps({"runtime": a.runtime.replace("-", "_") + "_int8", "latency_s": lat, "samples_per_s": thr, "accuracy": acc}))
