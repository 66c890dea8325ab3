#!/usr/bin/env python3
"""A numpy implementation of ssd_mobilenet_v2_coco as ARCHITECTURE.md describes it, and its proof.

Usage:
  numpy_reference.py check WEIGHTS.safetensors REF_DIR [--no-network] [--cases a,b]
      For each case of REF_DIR/cases.json (written by tests/reference/ssd_reference.py):
      1. anchors by formula (ARCHITECTURE.md) against OpenCV's priors;
      2. decode + OpenCV DetectionOutput (re-implemented here) on OpenCV's raw tensors, against
         OpenCV's final detections (this proves the decode, the box-encoding order and the
         NMS description);
      3. the TF graph's postprocessor (re-implemented here) on the same raw tensors;
      4. unless --no-network: the whole network in float64 with the folded weights from
         WEIGHTS, fed OpenCV's input blob, against OpenCV's features, box encodings, logits
         and detections (this proves the conversion, the batch-norm folding, the layer list
         and the 'SAME' padding);
      5. preprocessing: the documented cv2 recipe against OpenCV's blob, and how far TF's own
         resize (and a half-pixel float resize) is from it.
      Exits with status 1 when a check fails.
  numpy_reference.py layers FROZEN_GRAPH.pb
      Prints the layer table of ARCHITECTURE.md, read from the graph, after checking that the
      layer list below (SPEC) is exactly the graph's.

Needs numpy and safetensors (cv2 optional: only for the preprocessing check).
"""

import argparse
import json
import os
import sys

import numpy as np
from safetensors.numpy import load_file

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

F32 = np.float32
PREFIX = "FeatureExtractor.MobilenetV2."

# ---------------------------------------------------------------------------------------------
# The network. (name, kind, stride, relu6); kind: conv | depthwise. Blocks are listed explicitly.
# ---------------------------------------------------------------------------------------------

# expanded_conv_i: (stride, residual); expanded_conv (i = 0) has no expand layer.
BLOCKS = [
    (1, False), (2, False), (1, True), (2, False), (1, True), (1, True), (2, False), (1, True),
    (1, True), (1, True), (1, False), (1, True), (1, True), (2, False), (1, True), (1, True), (1, False),
]
EXTRAS = [("2", 256, 512), ("3", 128, 256), ("4", 128, 256), ("5", 64, 128)]


def spec():
    """The layer list in execution order: dicts with key, kind, stride, relu6, and block info."""
    layers = [dict(key=PREFIX + "Conv", kind="conv", stride=2, relu6=True)]
    for i, (stride, residual) in enumerate(BLOCKS):
        name = PREFIX + ("expanded_conv" if i == 0 else f"expanded_conv_{i}")
        if i > 0:
            layers.append(dict(key=name + ".expand", kind="conv", stride=1, relu6=True, block=name))
        layers.append(dict(key=name + ".depthwise", kind="depthwise", stride=stride, relu6=True, block=name))
        layers.append(dict(key=name + ".project", kind="conv", stride=1, relu6=False, block=name, residual=residual))
    layers.append(dict(key=PREFIX + "Conv_1", kind="conv", stride=1, relu6=True))
    for idx, mid, out in EXTRAS:
        layers.append(dict(key=PREFIX + f"layer_19_1_Conv2d_{idx}_1x1_{mid}", kind="conv", stride=1, relu6=True))
        layers.append(dict(key=PREFIX + f"layer_19_2_Conv2d_{idx}_3x3_s2_{out}_depthwise", kind="depthwise", stride=2, relu6=True))
        layers.append(dict(key=PREFIX + f"layer_19_2_Conv2d_{idx}_3x3_s2_{out}", kind="conv", stride=1, relu6=True))
    return layers


FEATURE_KEYS = [
    PREFIX + "expanded_conv_13.expand",  # its Relu6 output, before the block's depthwise
    PREFIX + "Conv_1",
] + [PREFIX + f"layer_19_2_Conv2d_{idx}_3x3_s2_{out}" for idx, _, out in EXTRAS]


def same_pads(size, k, stride):
    """TF 'SAME': out = ceil(size / stride), total = max((out - 1) * stride + k - size, 0),
    before = total // 2 (top / left), after = total - before (bottom / right)."""
    out = -(-size // stride)
    total = max((out - 1) * stride + k - size, 0)
    return out, total // 2, total - total // 2


def conv2d(x, w, b, stride, depthwise=False):
    """x [C, H, W] float64, w [O, I, k, k] (depthwise: [C, 1, k, k]), TF 'SAME' padding."""
    k = w.shape[2]
    c, h, wd = x.shape
    oh, pt, pb = same_pads(h, k, stride)
    ow, pl, pr = same_pads(wd, k, stride)
    if k == 1 and stride == 1:
        y = np.tensordot(w[:, :, 0, 0], x, axes=(1, 0))
    else:
        xp = np.pad(x, ((0, 0), (pt, pb), (pl, pr)))
        win = np.lib.stride_tricks.sliding_window_view(xp, (k, k), axis=(1, 2))[:, ::stride, ::stride]
        assert win.shape[1:3] == (oh, ow)
        if depthwise:
            y = np.einsum("chwij,cij->chw", win, w[:, 0], optimize=True)
        else:
            y = np.tensordot(w, win, axes=([1, 2, 3], [0, 3, 4]))
    return y + b[:, None, None]


def forward(weights, blob):
    """blob [1, 3, 300, 300] (RGB 0..255, OpenCV's input) -> (features, box_encodings, logits)."""
    p = {k: v.astype(np.float64) for k, v in weights.items()}
    x = blob[0].astype(np.float64) * np.float64(F32(2.0 / 255.0)) - 1.0
    feats = {}
    block_input = None
    for layer in spec():
        key = layer["key"]
        if key.endswith(".expand") or key.endswith("expanded_conv.depthwise"):
            block_input = x
        x = conv2d(x, p[key + ".weight"], p[key + ".bias"], layer["stride"], layer["kind"] == "depthwise")
        if layer["relu6"]:
            x = np.clip(x, 0.0, 6.0)
        if layer.get("residual"):
            x = x + block_input
        if key in FEATURE_KEYS:
            feats[key] = x
    features = [feats[k] for k in FEATURE_KEYS]
    boxes, logits = [], []
    for i, f in enumerate(features):
        for name, out, n in (("BoxEncodingPredictor", boxes, 4), ("ClassPredictor", logits, 91)):
            key = f"BoxPredictor_{i}.{name}"
            y = conv2d(f, p[key + ".weight"], p[key + ".bias"], 1)
            # [A * n, H, W] -> [H, W, A * n] -> [H * W * A, n]
            out.append(y.transpose(1, 2, 0).reshape(-1, n))
    return features, np.concatenate(boxes), np.concatenate(logits)


# ---------------------------------------------------------------------------------------------
# Anchors, decode, postprocessing
# ---------------------------------------------------------------------------------------------

def anchors(feature_sizes=(19, 10, 5, 3, 2, 1), min_scale=0.2, max_scale=0.95,
            aspect_ratios=(1.0, 2.0, 0.5, 3.0, 0.3333)):
    """TF's anchors, bit-exact in float32: [1917, 4] (ymin, xmin, ymax, xmax), normalized."""
    n = len(feature_sizes)
    scales = [min_scale + (max_scale - min_scale) * i / (n - 1) for i in range(n)] + [1.0]
    out = []
    for layer, size in enumerate(feature_sizes):
        if layer == 0:
            sc = np.array([0.1, 0.2, 0.2], F32)
            ar = np.array([1.0, 2.0, 0.5], F32)
        else:
            interp = np.sqrt(F32(scales[layer]) * F32(scales[layer + 1]))  # float32 product
            sc = np.array([scales[layer]] * len(aspect_ratios) + [interp], F32)
            ar = np.array(list(aspect_ratios) + [1.0], F32)
        r = np.sqrt(ar)
        h, w = sc / r, sc * r
        stride = F32(1.0) / F32(size)
        c = np.arange(size, dtype=F32) * stride + F32(0.5) * stride
        cy, cx = c[:, None, None], c[None, :, None]
        half = F32(0.5)
        box = np.stack(np.broadcast_arrays(cy - half * h, cx - half * w, cy + half * h, cx + half * w), -1)
        out.append(box.reshape(-1, 4))
    return np.concatenate(out)


def decode_tf(rel, anc):
    """faster_rcnn_box_coder.decode in float32 with the graph's op order.
    rel [N, 4] (ty, tx, th, tw); anc [N, 4] (ymin, xmin, ymax, xmax) -> (ymin, xmin, ymax, xmax)."""
    rel = rel.astype(F32)
    anc = anc.astype(F32)
    ha = anc[:, 2] - anc[:, 0]
    wa = anc[:, 3] - anc[:, 1]
    yca = anc[:, 0] + ha / F32(2)
    xca = anc[:, 1] + wa / F32(2)
    ty, tx = rel[:, 0] / F32(10), rel[:, 1] / F32(10)
    th, tw = rel[:, 2] / F32(5), rel[:, 3] / F32(5)
    w = np.exp(tw) * wa
    h = np.exp(th) * ha
    yc = ty * ha + yca
    xc = tx * wa + xca
    return np.stack([yc - h / F32(2), xc - w / F32(2), yc + h / F32(2), xc + w / F32(2)], 1)


def decode_opencv(loc, priors, variances):
    """OpenCV DetectionOutput CENTER_SIZE decode (normalized, variance not in target), float32.
    loc [N, 4] (tx, ty, tw, th); priors [N, 4] (xmin, ymin, xmax, ymax) -> (xmin, ymin, xmax, ymax)."""
    loc, priors, variances = loc.astype(F32), priors.astype(F32), variances.astype(F32)
    pw = priors[:, 2] - priors[:, 0]
    ph = priors[:, 3] - priors[:, 1]
    pcx = (priors[:, 0].astype(np.float64) + pw.astype(np.float64) * 0.5).astype(F32)
    pcy = (priors[:, 1].astype(np.float64) + ph.astype(np.float64) * 0.5).astype(F32)
    cx = variances[:, 0] * loc[:, 0] * pw + pcx
    cy = variances[:, 1] * loc[:, 1] * ph + pcy
    w = np.exp(variances[:, 2] * loc[:, 2]) * pw
    h = np.exp(variances[:, 3] * loc[:, 3]) * ph
    d = lambda c, s, sign: (c.astype(np.float64) + sign * s.astype(np.float64) * 0.5).astype(F32)  # noqa: E731
    return np.stack([d(cx, w, -1), d(cy, h, -1), d(cx, w, 1), d(cy, h, 1)], 1)


def _size(b):
    """OpenCV BBoxSize (normalized): 0 for an inverted box."""
    valid = (b[..., 2] >= b[..., 0]) & (b[..., 3] >= b[..., 1])
    return np.where(valid, (b[..., 2] - b[..., 0]) * (b[..., 3] - b[..., 1]), F32(0)).astype(F32)


def detection_output_opencv(loc, scores, priors, variances, conf=0.01, nms=0.6, top_k=100, keep_top_k=100):
    """OpenCV's DetectionOutput (share_location, background 0, CENTER_SIZE, no clip).
    Returns (labels, scores, boxes (xmin, ymin, xmax, ymax) normalized), sorted by score."""
    boxes = decode_opencv(loc, priors, variances)
    sizes = _size(boxes)
    picked = []
    for c in range(1, scores.shape[1]):
        s = scores[:, c]
        cand = np.nonzero(s > F32(conf))[0]
        cand = cand[np.argsort(-s[cand], kind="stable")][:top_k]
        keep = []
        for i in cand:
            ok = True
            for j in keep:
                ib = np.array([max(boxes[i, 0], boxes[j, 0]), max(boxes[i, 1], boxes[j, 1]),
                               min(boxes[i, 2], boxes[j, 2]), min(boxes[i, 3], boxes[j, 3])], F32)
                inter = _size(ib)
                iou = inter / (sizes[i] + sizes[j] - inter) if inter > 0 else F32(0)
                if not iou <= F32(nms):
                    ok = False
                    break
            if ok:
                keep.append(i)
        picked += [(float(s[i]), c, i) for i in keep]
    picked.sort(key=lambda t: -t[0])  # std::sort in OpenCV: ties in any order
    picked = picked[:keep_top_k]
    labels = np.array([c for _, c, _ in picked], np.int64)
    sc = np.array([scores[i, c] for _, c, i in picked], F32)
    bx = np.array([boxes[i] for _, _, i in picked], F32).reshape(-1, 4)
    return labels, sc, bx


def _iou_tf(a, b):
    """TF NonMaxSuppression IOU for (ymin, xmin, ymax, xmax)."""
    ay1, ay2 = min(a[0], a[2]), max(a[0], a[2])
    ax1, ax2 = min(a[1], a[3]), max(a[1], a[3])
    by1, by2 = min(b[0], b[2]), max(b[0], b[2])
    bx1, bx2 = min(b[1], b[3]), max(b[1], b[3])
    area_a = (ay2 - ay1) * (ax2 - ax1)
    area_b = (by2 - by1) * (bx2 - bx1)
    if area_a <= 0 or area_b <= 0:
        return 0.0
    ih = max(min(ay2, by2) - max(ay1, by1), 0.0)
    iw = max(min(ax2, bx2) - max(ax1, bx1), 0.0)
    inter = ih * iw
    return inter / (area_a + area_b - inter)


def postprocess_tf(rel, scores, anc, score_threshold=0.3, iou_threshold=0.6, per_class=100, total=100):
    """The graph's postprocessor: decode, per class (1..90): score > threshold, clip to [0, 1],
    drop zero-area boxes, greedy NMS (suppress IoU > threshold, at most per_class), then all
    classes sorted by score (ties: earlier class/position first), at most `total`.
    Returns (labels (COCO ids), scores, boxes (ymin, xmin, ymax, xmax) normalized, clipped)."""
    boxes = decode_tf(rel, anc)
    out = []
    for c in range(1, scores.shape[1]):
        s = scores[:, c]
        idx = np.nonzero(s > F32(score_threshold))[0]
        b = np.clip(boxes[idx], F32(0), F32(1))
        area = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
        idx, b = idx[area > 0], b[area > 0]
        order = np.argsort(-s[idx], kind="stable")
        keep = []
        for o in order:
            if len(keep) >= per_class:
                break
            if all(_iou_tf(b[o], b[k]) <= iou_threshold for k in keep):
                keep.append(o)
        out += [(float(s[idx[k]]), c, b[k]) for k in keep]
    out.sort(key=lambda t: -t[0])  # python's sort is stable: ties keep class order
    out = out[:total]
    return (np.array([c for _, c, _ in out], np.int64), np.array([s for s, _, _ in out], F32),
            np.array([b for _, _, b in out], F32).reshape(-1, 4))


def sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


# ---------------------------------------------------------------------------------------------
# Preprocessing variants (for the report)
# ---------------------------------------------------------------------------------------------

def resize_tf_legacy(img, size=300):
    """TF1 ResizeBilinear(align_corners=False, half_pixel_centers=False) on float input:
    src = dst * (in / out), floor / ceil neighbours clamped at the last pixel."""
    img = img.astype(F32)
    h, w = img.shape[:2]

    def axis(n_in):
        scale = F32(n_in) / F32(size)
        src = np.arange(size, dtype=F32) * scale
        lo = np.floor(src).astype(np.int64)
        hi = np.minimum(lo + 1, n_in - 1)
        return lo, hi, (src - lo).astype(F32)

    y0, y1, fy = axis(h)
    x0, x1, fx = axis(w)
    top = img[y0][:, x0] + (img[y0][:, x1] - img[y0][:, x0]) * fx[None, :, None]
    bot = img[y1][:, x0] + (img[y1][:, x1] - img[y1][:, x0]) * fx[None, :, None]
    return top + (bot - top) * fy[:, None, None]


def resize_half_pixel(img, size=300):
    """Bilinear with half-pixel centres on float input (cv2 INTER_LINEAR on float32,
    torch interpolate(bilinear, align_corners=False, antialias=False))."""
    img = img.astype(np.float64)
    h, w = img.shape[:2]

    def axis(n_in):
        src = (np.arange(size) + 0.5) * (n_in / size) - 0.5
        src = np.clip(src, 0, None)
        lo = np.minimum(np.floor(src).astype(np.int64), n_in - 1)
        hi = np.minimum(lo + 1, n_in - 1)
        return lo, hi, src - lo

    y0, y1, fy = axis(h)
    x0, x1, fx = axis(w)
    top = img[y0][:, x0] * (1 - fx)[None, :, None] + img[y0][:, x1] * fx[None, :, None]
    bot = img[y1][:, x0] * (1 - fx)[None, :, None] + img[y1][:, x1] * fx[None, :, None]
    return top * (1 - fy)[:, None, None] + bot * fy[:, None, None]


def to_blob(rgb_hwc):
    return np.ascontiguousarray(rgb_hwc.transpose(2, 0, 1)[None].astype(F32))


# ---------------------------------------------------------------------------------------------
# check
# ---------------------------------------------------------------------------------------------

def _match(labels_a, scores_a, boxes_a, labels_b, scores_b, boxes_b, min_score=0.0):
    """Compares two detection lists above min_score: same labels in the same order?"""
    ka, kb = scores_a > min_score, scores_b > min_score
    la, lb = labels_a[ka], labels_b[kb]
    if len(la) != len(lb) or not np.array_equal(la, lb):
        return False, float("inf"), float("inf")
    if len(la) == 0:
        return True, 0.0, 0.0
    return True, float(np.abs(scores_a[ka] - scores_b[kb]).max()), float(np.abs(boxes_a[ka] - boxes_b[kb]).max())


def check(args):
    with open(os.path.join(args.ref_dir, "cases.json")) as fh:
        cases = json.load(fh)["cases"]
    if args.cases:
        wanted = set(args.cases.split(","))
        cases = [c for c in cases if c["name"] in wanted]
    weights = load_file(args.weights) if not args.no_network else None
    ok = True
    tf_anchors = anchors()

    def report(name, good, text):
        nonlocal ok
        ok &= bool(good)
        print(f"  [{'ok' if good else 'FAIL'}] {name}: {text}")

    for case in cases:
        ref = load_file(os.path.join(args.ref_dir, case["output"]))
        print(f"{case['name']} ({case['width']}x{case['height']}, {len(ref['detection_scores'])} OpenCV detections)")
        # 1. anchors
        d = np.abs(tf_anchors - ref["anchors"])
        worst = np.unravel_index(np.argmax(d), d.shape)
        ar_idx = np.array([i for i in range(1083, 1917) if (i - 1083) % 6 == 4])
        others = np.setdiff1d(np.arange(1917), ar_idx)
        report("anchors (formula) vs OpenCV priors", d[others].max() < 1e-6,
               f"max |diff| {d.max():.3g} (anchor {worst[0]}); without the aspect-ratio-0.3333 anchors "
               f"{d[others].max():.3g}")
        var_ok = np.allclose(ref["prior_variances"], np.array([0.1, 0.1, 0.2, 0.2], F32))
        report("OpenCV prior variances", var_ok, "all (0.1, 0.1, 0.2, 0.2)" if var_ok else "unexpected")

        # 2. OpenCV DetectionOutput from OpenCV's raw tensors
        loc_cv = ref["box_encodings"][:, [1, 0, 3, 2]]
        lab, sc, bx = detection_output_opencv(loc_cv, ref["class_scores"], ref["priors_opencv"], ref["prior_variances"])
        same, ds, db = _match(lab, sc, bx, ref["detection_labels"], ref["detection_scores"], ref["detection_boxes_normalized"])
        report("decode + DetectionOutput (numpy) vs OpenCV detections", same and db < 1e-5,
               f"{len(lab)} vs {len(ref['detection_labels'])} detections, labels equal: {same}, "
               f"max |score diff| {ds:.3g}, max |box diff| {db:.3g} (normalized)")
        # the same with TF's anchors instead of OpenCV's priors
        tf_as_cv = tf_anchors[:, [1, 0, 3, 2]]
        lab2, sc2, bx2 = detection_output_opencv(loc_cv, ref["class_scores"], tf_as_cv, ref["prior_variances"])
        same2, ds2, db2 = _match(lab2, sc2, bx2, ref["detection_labels"], ref["detection_scores"],
                                 ref["detection_boxes_normalized"], min_score=0.3)
        report("same with TF's own anchors (score > 0.3)", same2,
               f"labels equal: {same2}, max |box diff| {db2:.3g} normalized "
               f"= {db2 * max(case['width'], case['height']):.3g} px")
        # TF decode (ty, tx, th, tw) on OpenCV's priors must give the same boxes
        tf_boxes = decode_tf(ref["box_encodings"], ref["anchors"])[:, [1, 0, 3, 2]]
        cv_boxes = decode_opencv(loc_cv, ref["priors_opencv"], ref["prior_variances"])
        report("TF decode == OpenCV decode (all 1917 anchors)", np.abs(tf_boxes - cv_boxes).max() < 1e-5,
               f"max |diff| {np.abs(tf_boxes - cv_boxes).max():.3g}")

        # 3. TF postprocessor on OpenCV's raw tensors
        tl, ts, tb = postprocess_tf(ref["box_encodings"], ref["class_scores"], tf_anchors)
        keep = ref["detection_scores"] > 0.3
        ol, os_, ob = ref["detection_labels"][keep], ref["detection_scores"][keep], ref["detection_boxes_normalized"][keep]
        ob_clipped = np.clip(ob, 0, 1)[:, [1, 0, 3, 2]]
        same3 = len(tl) == len(ol) and np.array_equal(tl, ol)
        db3 = float(np.abs(tb - ob_clipped).max()) if same3 and len(tl) else 0.0
        report("TF postprocessor (numpy) vs OpenCV detections > 0.3", same3,
               f"TF: {[(int(a), round(float(b), 4)) for a, b in zip(tl, ts)]}; "
               f"max |box diff| vs OpenCV clipped to [0,1]: {db3:.3g}")

        # 4. the network
        if weights is not None:
            feats, rel, logits = forward(weights, ref["input"])
            worst_f = []
            for i, f in enumerate(feats):
                r = ref[f"features.{i}"][0].astype(np.float64)
                worst_f.append(float(np.abs(f - r).max()))
            db = float(np.abs(rel - ref["box_encodings"]).max())
            dl = float(np.abs(logits - ref["class_logits"]).max())
            report("network (float64, folded weights) vs OpenCV features", max(worst_f) < 1e-2,
                   "max |diff| per feature map " + ", ".join(f"{v:.2g}" for v in worst_f))
            report("network vs OpenCV box encodings / class logits", db < 1e-2 and dl < 1e-2,
                   f"max |diff| {db:.3g} / {dl:.3g} (values up to {np.abs(ref['box_encodings']).max():.3g} / "
                   f"{np.abs(ref['class_logits']).max():.3g})")
            scores = sigmoid(logits).astype(F32)
            nl, ns, nb = detection_output_opencv(rel[:, [1, 0, 3, 2]].astype(F32), scores,
                                                 ref["priors_opencv"], ref["prior_variances"])
            same4, ds4, db4 = _match(nl, ns, nb, ref["detection_labels"], ref["detection_scores"],
                                     ref["detection_boxes_normalized"], min_score=0.3)
            report("network + DetectionOutput vs OpenCV detections > 0.3", same4 and ds4 < 1e-3 and db4 < 1e-3,
                   f"labels equal: {same4}, max |score diff| {ds4:.3g}, max |box diff| {db4:.3g}")

        # 5. preprocessing
        img = ref["image"]
        try:
            import cv2
        except ImportError:
            cv2 = None
        if cv2 is not None:
            mine = to_blob(cv2.resize(img, (300, 300), interpolation=cv2.INTER_LINEAR))
            report("cv2.resize(uint8, INTER_LINEAR) -> float == OpenCV's blob", np.array_equal(mine, ref["input"]),
                   f"max |diff| {np.abs(mine - ref['input']).max():.3g}")
        hp = to_blob(resize_half_pixel(img))
        tfl = to_blob(resize_tf_legacy(img))
        print(f"  [info] blob differences (0..255 units): half-pixel float resize vs OpenCV "
              f"max {np.abs(hp - ref['input']).max():.3g} mean {np.abs(hp - ref['input']).mean():.3g}; "
              f"TF legacy resize vs OpenCV max {np.abs(tfl - ref['input']).max():.3g} "
              f"mean {np.abs(tfl - ref['input']).mean():.3g}")
        if weights is not None and args.preprocessing_variants:
            for name, blob in (("half-pixel float resize", hp), ("TF legacy resize", tfl)):
                _, rel_v, log_v = forward(weights, blob)
                vl, vs, _ = postprocess_tf(rel_v.astype(F32), sigmoid(log_v).astype(F32), tf_anchors)
                print(f"  [info] TF postprocessor with {name}: {[(int(a), round(float(b), 4)) for a, b in zip(vl, vs)]}")
    print("all checks passed" if ok else "SOME CHECKS FAILED")
    return 0 if ok else 1


# ---------------------------------------------------------------------------------------------
# layers
# ---------------------------------------------------------------------------------------------

def layers_table(args):
    import convert_ssd_mobilenet_v2 as conv
    import tf_graphdef

    nodes = tf_graphdef.read_graph(args.pb)
    _, layers, _ = conv.extract(nodes)
    memo = {}
    for e in layers:
        e["in_size"] = conv.spatial_size(nodes, e["input"], 300, memo)
    graph = [e for e in layers if e["scope"].startswith("FeatureExtractor/")]
    def residual(e):
        # project -> BatchNorm add_1 -> Identity -> .../add
        block = e["scope"].rsplit("/", 1)[0]
        return (block + "/add") in nodes and nodes[block + "/add"].op == "Add"

    mine = spec()
    assert len(mine) == len(graph), (len(mine), len(graph))
    for m, g in zip(mine, graph):
        assert m["key"] == g["key"], (m["key"], g["key"])
        assert m["kind"] == g["kind"] and m["stride"] == g["stride"] and m["relu6"] == g["relu6"], (m, g)
        assert bool(m.get("residual")) == (g["key"].endswith(".project") and residual(g)), m["key"]
    # predictors read the FEATURE_KEYS outputs
    for i, fk in enumerate(FEATURE_KEYS):
        src = nodes[f"BoxPredictor_{i}/BoxEncodingPredictor/Conv2D"].inputs[0]
        while nodes[conv.strip(src)].op == "Identity":
            src = nodes[conv.strip(src)].inputs[0]
        assert conv.strip(src) == fk.replace(".", "/") + "/Relu6", (src, fk)

    print("| # | key (prefix `FeatureExtractor.MobilenetV2.`) | kind | k | s | in→out ch | in→out size | pad t/l, b/r | ReLU6 | note |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    feature_of = {k: i for i, k in enumerate(FEATURE_KEYS)}
    for n, (m, g) in enumerate(zip(mine, graph)):
        k = g["kernel"][0]
        out, before, after = same_pads(g["in_size"], k, g["stride"])
        note = []
        if m.get("residual"):
            note.append("+ block input (residual)")
        if m["key"] in feature_of:
            note.append(f"**feature {feature_of[m['key']]}**")
        ch = f"{g['in']}→{g['out']}" if g["kind"] == "conv" else f"{g['out']} (dw)"
        print(f"| {n} | {m['key'][len(PREFIX):]} | {g['kind']} | {k} | {g['stride']} | {ch} | "
              f"{g['in_size']}→{out} | {before}, {after} | {'yes' if g['relu6'] else 'no'} | {'; '.join(note)} |")
    print()
    print("| predictor | input (feature) | size | in ch | box conv out (A×4) | class conv out (A×91) | anchors |")
    print("|---|---|---|---|---|---|---|")
    total = 0
    for i in range(6):
        b = next(e for e in layers if e["scope"] == f"BoxPredictor_{i}/BoxEncodingPredictor")
        c = next(e for e in layers if e["scope"] == f"BoxPredictor_{i}/ClassPredictor")
        size = b["in_size"]
        a = b["out"] // 4
        total += size * size * a
        print(f"| BoxPredictor_{i} | feature {i} | {size}×{size} | {b['in']} | {b['out']} (3×3, s1) | "
              f"{c['out']} (3×3, s1) | {size}·{size}·{a} = {size * size * a} |")
    print(f"\ntotal anchors: {total}")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("check")
    c.add_argument("weights")
    c.add_argument("ref_dir")
    c.add_argument("--no-network", action="store_true")
    c.add_argument("--preprocessing-variants", action="store_true",
                   help="also run the network on the half-pixel and TF-legacy resized blobs")
    c.add_argument("--cases")
    lt = sub.add_parser("layers")
    lt.add_argument("pb")
    args = ap.parse_args()
    if args.cmd == "check":
        sys.exit(check(args))
    layers_table(args)


if __name__ == "__main__":
    main()
