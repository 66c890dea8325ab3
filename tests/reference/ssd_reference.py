"""Golden outputs of OpenCV DNN running TF OD API ssd_mobilenet_v2_coco_2018_03_29, for Rust tests.

Usage: python ssd_reference.py OUT_DIR [IMAGE...] [--model-dir DIR]

Needs numpy, opencv-python(-headless) >= 4.x and safetensors (the .venv-convert that
scripts/ssd/fetch_and_convert.sh creates has all three). DIR (default: .cache/ssd_mobilenet_v2
in the repository, as fetch_and_convert.sh leaves it; or $SSD_MODEL_DIR) must hold
frozen_inference_graph.pb and ssd_mobilenet_v2_coco_2018_03_29.pbtxt.

Besides the given images it generates two synthetic ones deterministically:
OUT_DIR/synthetic_shapes.png (480x360 gradient with coloured rectangles) and
OUT_DIR/synthetic_noise.png (257x199 uniform noise, odd sizes on purpose).

Per image it writes OUT_DIR/ssd_<stem>.safetensors (all float32 unless noted):

  image               uint8 [H, W, 3]  the decoded image, RGB (cv2.imread + BGR->RGB)
  input               [1, 3, 300, 300] the blob OpenCV feeds the graph: RGB, values 0..255
                      (cv2.dnn.blobFromImage(bgr, 1.0, (300, 300), (0,0,0), swapRB=True,
                      crop=False): uint8 cv2.resize INTER_LINEAR, then float). The graph then
                      computes input * 0.007843138 - 1 itself.
  features.0 .. features.5  NCHW outputs of the six tensors feeding the box predictors
                      ([1,576,19,19], [1,1280,10,10], [1,512,5,5], [1,256,3,3], [1,256,2,2],
                      [1,128,1,1]).
  box_encodings       [1917, 4] TensorFlow order (ty, tx, th, tw), i.e. TF's 'concat'/'Squeeze'.
                      (OpenCV's own 'BoxEncodingPredictor/concat' is (tx, ty, tw, th): its
                      importer swaps the channel pairs of the BoxEncodingPredictor weights; this
                      file swaps them back.)
  class_logits        [1917, 91] before the sigmoid (TF's 'concat_1'), class 0 = background
  class_scores        [1917, 91] sigmoid(class_logits) as OpenCV computes it
  anchors             [1917, 4] OpenCV's priors reordered to TF's (ymin, xmin, ymax, xmax),
                      normalized to [0, 1] (not clipped)
  priors_opencv       [1917, 4] OpenCV's PriorBox output as is: (xmin, ymin, xmax, ymax)
  prior_variances     [1917, 4] OpenCV's prior variances (0.1, 0.1, 0.2, 0.2 everywhere)
  detection_labels    int64 [K]  class id = COCO category id (index into the 91 labels)
  detection_scores    [K]
  detection_boxes     [K, 4] x1, y1, x2, y2 in pixels of the original image
                      (OpenCV's normalized box times width/height, not clipped)
  detection_boxes_normalized [K, 4] OpenCV's xmin, ymin, xmax, ymax in [0, 1] units

Anchor index order everywhere: layer 0..5, then y, then x, then anchor-at-location.
Detections are OpenCV DetectionOutput's, sorted by score (descending), with the pbtxt's
settings: confidence_threshold 0.01, nms_threshold 0.6, top_k 100 per class, keep_top_k 100.
OUT_DIR/cases.json lists the cases, the settings and the detections above 0.3 (the TF graph's
own score threshold) in readable form.
"""

import argparse
import hashlib
import json
import os
import sys

import cv2
import numpy as np
from safetensors.numpy import save_file

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.normpath(os.path.join(HERE, "..", ".."))
PB = "frozen_inference_graph.pb"
PBTXT = "ssd_mobilenet_v2_coco_2018_03_29.pbtxt"
REPORT_THRESHOLD = 0.3
UMASK = os.umask(0)
os.umask(UMASK)

FEATURES = [
    "FeatureExtractor/MobilenetV2/expanded_conv_13/expand/Relu6",
    "FeatureExtractor/MobilenetV2/Conv_1/Relu6",
    "FeatureExtractor/MobilenetV2/layer_19_2_Conv2d_2_3x3_s2_512/Relu6",
    "FeatureExtractor/MobilenetV2/layer_19_2_Conv2d_3_3x3_s2_256/Relu6",
    "FeatureExtractor/MobilenetV2/layer_19_2_Conv2d_4_3x3_s2_256/Relu6",
    "FeatureExtractor/MobilenetV2/layer_19_2_Conv2d_5_3x3_s2_128/Relu6",
]
OUTPUTS = [
    "detection_out",
    "BoxEncodingPredictor/concat",
    "ClassPredictor/concat",
    "ClassPredictor/concat/sigmoid",
    "PriorBox/concat",
] + FEATURES

sys.path.insert(0, os.path.join(REPO, "scripts", "ssd"))
from convert_ssd_mobilenet_v2 import coco_labels  # noqa: E402

COCO_LABELS = coco_labels()


def sha256(path):
    with open(path, "rb") as fh:
        return hashlib.sha256(fh.read()).hexdigest()


def synthetic_shapes(path):
    h, w = 360, 480
    yy, xx = np.mgrid[0:h, 0:w]
    img = np.stack([xx * 255 // (w - 1), yy * 255 // (h - 1), 255 - (xx + yy) * 255 // (w + h - 2)], axis=-1)
    img = img.astype(np.uint8)
    for (x1, y1, x2, y2), rgb in [
        ((40, 30, 200, 150), (220, 30, 30)),
        ((260, 60, 440, 300), (30, 200, 60)),
        ((100, 200, 230, 340), (40, 60, 220)),
        ((300, 10, 330, 40), (250, 250, 250)),
    ]:
        img[y1:y2, x1:x2] = rgb
    cv2.imwrite(path, cv2.cvtColor(img, cv2.COLOR_RGB2BGR))


def synthetic_noise(path):
    rng = np.random.default_rng(1234)
    img = rng.integers(0, 256, size=(199, 257, 3), dtype=np.uint8)
    cv2.imwrite(path, img)


def run_case(net, path):
    bgr = cv2.imread(path, cv2.IMREAD_COLOR)
    if bgr is None:
        raise SystemExit(f"cannot read {path}")
    h, w = bgr.shape[:2]
    blob = cv2.dnn.blobFromImage(bgr, 1.0, (300, 300), (0, 0, 0), swapRB=True, crop=False)
    net.setInput(blob)
    outs = dict(zip(OUTPUTS, net.forward(OUTPUTS)))

    det = outs["detection_out"].reshape(-1, 7)
    det = det[det[:, 2] > 0]
    order = np.argsort(-det[:, 2], kind="stable")
    det = det[order]
    norm = det[:, 3:7].astype(np.float32)
    pixels = (norm * np.array([w, h, w, h], np.float32)).astype(np.float32)

    n = 1917
    loc = outs["BoxEncodingPredictor/concat"].reshape(n, 4)
    box_encodings = loc[:, [1, 0, 3, 2]]  # OpenCV (tx, ty, tw, th) -> TF (ty, tx, th, tw)
    priors = outs["PriorBox/concat"].reshape(2, n, 4)
    tensors = {
        "image": np.ascontiguousarray(bgr[:, :, ::-1]),
        "input": blob.astype(np.float32),
        "box_encodings": np.ascontiguousarray(box_encodings),
        "class_logits": outs["ClassPredictor/concat"].reshape(n, 91),
        "class_scores": outs["ClassPredictor/concat/sigmoid"].reshape(n, 91),
        "anchors": np.ascontiguousarray(priors[0][:, [1, 0, 3, 2]]),
        "priors_opencv": np.ascontiguousarray(priors[0]),
        "prior_variances": np.ascontiguousarray(priors[1]),
        "detection_labels": det[:, 1].astype(np.int64),
        "detection_scores": det[:, 2].astype(np.float32),
        "detection_boxes": pixels,
        "detection_boxes_normalized": norm,
    }
    for i, name in enumerate(FEATURES):
        tensors[f"features.{i}"] = outs[name]
    tensors = {k: np.ascontiguousarray(v) for k, v in tensors.items()}
    readable = [
        {
            "label": int(d[1]), "name": COCO_LABELS[int(d[1])], "score": round(float(d[2]), 6),
            "box": [round(float(v), 2) for v in p],
        }
        for d, p in zip(det, pixels) if d[2] > REPORT_THRESHOLD
    ]
    return tensors, (w, h), readable


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out_dir")
    ap.add_argument("images", nargs="*")
    ap.add_argument("--model-dir", default=os.environ.get("SSD_MODEL_DIR", os.path.join(REPO, ".cache", "ssd_mobilenet_v2")))
    args = ap.parse_args()

    cv2.setNumThreads(int(os.environ.get("REFERENCE_THREADS", "2")))
    pb = os.path.join(args.model_dir, PB)
    pbtxt = os.path.join(args.model_dir, PBTXT)
    for p in (pb, pbtxt):
        if not os.path.exists(p):
            raise SystemExit(f"missing {p} (run scripts/ssd/fetch_and_convert.sh or pass --model-dir)")
    # The classic engine: the new one (OpenCV 5 default) refuses forward() of several
    # intermediate outputs. Both give the same detections (checked: max diff 5e-7).
    engine = getattr(cv2.dnn, "ENGINE_CLASSIC", None)
    net = cv2.dnn.readNetFromTensorflow(pb, pbtxt) if engine is None else cv2.dnn.readNetFromTensorflow(pb, pbtxt, engine)
    net.setPreferableBackend(cv2.dnn.DNN_BACKEND_OPENCV)
    net.setPreferableTarget(cv2.dnn.DNN_TARGET_CPU)

    os.makedirs(args.out_dir, exist_ok=True)
    shapes = os.path.join(args.out_dir, "synthetic_shapes.png")
    noise = os.path.join(args.out_dir, "synthetic_noise.png")
    synthetic_shapes(shapes)
    synthetic_noise(noise)

    cases = []
    stems = set()
    for path in list(args.images) + [shapes, noise]:
        stem = os.path.splitext(os.path.basename(path))[0]
        if stem in stems:
            raise SystemExit(f"two images named {stem}")
        stems.add(stem)
        tensors, (w, h), readable = run_case(net, path)
        out = os.path.join(args.out_dir, f"ssd_{stem}.safetensors")
        save_file(tensors, out, metadata={"image": os.path.abspath(path)})
        os.chmod(out, 0o666 & ~UMASK)  # safetensors creates files 0600
        cases.append({
            "name": stem,
            "image": os.path.abspath(path),
            "image_sha256": sha256(path),
            "width": w,
            "height": h,
            "output": os.path.basename(out),
            "num_detections": int(tensors["detection_scores"].shape[0]),
            "detections_above_report_threshold": readable,
        })
        summary = ", ".join(f"{d['name']} {d['score']:.3f}" for d in readable) or "nothing"
        print(f"{stem} ({w}x{h}): {summary}", file=sys.stderr)

    with open(os.path.join(args.out_dir, "cases.json"), "w") as fh:
        json.dump({
            "model": {
                "pb": os.path.abspath(pb), "pb_sha256": sha256(pb),
                "pbtxt": os.path.abspath(pbtxt), "pbtxt_sha256": sha256(pbtxt),
            },
            "opencv_version": cv2.__version__,
            "preprocessing": "cv2.dnn.blobFromImage(bgr, 1.0, (300, 300), (0, 0, 0), swapRB=True, crop=False)",
            "detection_output": {
                "confidence_threshold": 0.01, "nms_threshold": 0.6, "top_k": 100, "keep_top_k": 100,
                "clip": False, "background_label_id": 0, "code_type": "CENTER_SIZE",
            },
            "report_threshold": REPORT_THRESHOLD,
            "num_anchors": 1917,
            "anchor_order": "ymin, xmin, ymax, xmax (tensor 'anchors'); priors_opencv: xmin, ymin, xmax, ymax",
            "box_encoding_order": "ty, tx, th, tw",
            "cases": cases,
        }, fh, indent=1)


if __name__ == "__main__":
    main()
