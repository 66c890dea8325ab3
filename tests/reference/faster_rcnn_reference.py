"""Golden outputs of torchvision's fasterrcnn_resnet50_fpn for the Rust parity test.

Usage: python faster_rcnn_reference.py OUT_DIR

Builds torchvision 0.28's `fasterrcnn_resnet50_fpn(weights=None)` with a fixed seed, makes
its random weights produce realistic activations (batch-norm statistics calibrated on real
photos, head weights scaled so scores are spread out rather than uniform), moves them into
the layout of a pretrained model (FrozenBatchNorm2d, as `fasterrcnn_resnet50_fpn(weights=...)`
builds it), runs that model, and writes:

* OUT_DIR/weights.safetensors         the state dict with BatchNorm2d's num_batches_tracked
* OUT_DIR/weights_frozen_bn.safetensors  the same without them (FrozenBatchNorm2d layout)
* OUT_DIR/small.png                   a small synthetic image the transform upscales
* OUT_DIR/cases.json                  the inputs and settings of every case
* OUT_DIR/case_<name>.safetensors     per case: FPN features, RPN proposals, detections

Pretrained weights cannot be downloaded here; random weights exercise the same arithmetic.
"""

import json
import os
import sys

import numpy as np
import torch
import torchvision
from PIL import Image
from safetensors.torch import save_file
from torchvision.transforms.functional import pil_to_tensor

HERE = os.path.dirname(os.path.abspath(__file__))
SAMPLES = os.path.join(HERE, "..", "..", "assets", "samples")


def load(path):
    return pil_to_tensor(Image.open(path).convert("RGB")).float() / 255.0


def calibrate(model, images):
    """Gives batch norm real statistics (a random network's are 0/1, i.e. identity)."""
    body = model.backbone.body
    for m in body.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None  # cumulative average over the calibration batches
            with torch.no_grad():
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
    body.train()
    with torch.no_grad():
        for img in images:
            x = model.transform([img])[0].tensors
            body(x)
    body.eval()


def build_model():
    torch.manual_seed(0)
    model = torchvision.models.detection.fasterrcnn_resnet50_fpn(
        weights=None, weights_backbone=None, num_classes=91
    )
    calibrate(model, [load(os.path.join(SAMPLES, f)) for f in ("coffee.png", "rocket.jpg")])
    with torch.no_grad():
        # Spread objectness and class scores so ranking and thresholds are well defined.
        model.rpn.head.cls_logits.weight.normal_(0, 0.2)
        model.rpn.head.bbox_pred.weight.normal_(0, 0.02)
        model.roi_heads.box_predictor.cls_score.weight.normal_(0, 0.05)
        model.roi_heads.box_predictor.bbox_pred.weight.normal_(0, 0.02)
    model.eval()
    return model


def frozen_bn_model(trained):
    """The layout of a pretrained torchvision model (FrozenBatchNorm2d), with `trained`'s weights."""
    from torchvision.models.detection.backbone_utils import _resnet_fpn_extractor
    from torchvision.ops.misc import FrozenBatchNorm2d

    body = torchvision.models.resnet50(weights=None, norm_layer=FrozenBatchNorm2d)
    model = torchvision.models.detection.FasterRCNN(_resnet_fpn_extractor(body, 5), num_classes=91)
    model.load_state_dict(trained.state_dict(), strict=True)
    model.eval()
    return model


def small_image(path):
    rng = np.random.default_rng(7)
    h, w = 48, 64
    yy, xx = np.mgrid[0:h, 0:w]
    img = np.stack([xx * 4, yy * 5, (xx + yy) * 2], axis=-1).astype(np.float64)
    img[10:30, 20:45] = [230, 40, 40]
    img += rng.normal(0, 12, img.shape)
    Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(path)


def run_case(model, images, min_size, max_size, score_thresh):
    model.transform.min_size = (min_size,)
    model.transform.max_size = max_size
    model.roi_heads.score_thresh = score_thresh
    captured = {}
    h1 = model.backbone.register_forward_hook(lambda m, i, o: captured.update(features=o))
    h2 = model.rpn.register_forward_hook(lambda m, i, o: captured.update(proposals=o[0]))
    with torch.no_grad():
        out = model(images)
    h1.remove()
    h2.remove()
    tensors = {}
    for name, f in captured["features"].items():
        tensors[f"features.{name}"] = f.contiguous()
    for i, p in enumerate(captured["proposals"]):
        tensors[f"proposals.{i}"] = p.contiguous()
    for i, d in enumerate(out):
        tensors[f"boxes.{i}"] = d["boxes"].contiguous()
        tensors[f"scores.{i}"] = d["scores"].contiguous()
        tensors[f"labels.{i}"] = d["labels"].contiguous()
    return tensors


def main(out_dir):
    os.makedirs(out_dir, exist_ok=True)
    torch.set_num_threads(int(os.environ.get("REFERENCE_THREADS", "2")))
    trained = build_model()
    state = {k: v.contiguous() for k, v in trained.state_dict().items()}
    model = frozen_bn_model(trained)
    save_file(state, os.path.join(out_dir, "weights.safetensors"))
    frozen = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}
    save_file(frozen, os.path.join(out_dir, "weights_frozen_bn.safetensors"))
    small_image(os.path.join(out_dir, "small.png"))
    cases = [
        # A non-square photo at torchvision's defaults.
        {"name": "photo_default", "images": [os.path.join(SAMPLES, "coffee.png")],
         "min_size": 800, "max_size": 1333, "score_thresh": 0.02},
        # A small image the transform upscales 6.7x.
        {"name": "small_upscaled", "images": ["small.png"],
         "min_size": 320, "max_size": 1333, "score_thresh": 0.02},
        # Two differently sized images in one batch.
        {"name": "batch_two_sizes",
         "images": [os.path.join(SAMPLES, "chelsea.png"), os.path.join(SAMPLES, "astronaut.png")],
         "min_size": 512, "max_size": 853, "score_thresh": 0.02},
    ]
    for case in cases:
        # Relative paths name files generated into OUT_DIR (the folder may be renamed later).
        images = [load(os.path.join(out_dir, p)) for p in case["images"]]
        tensors = run_case(model, images, case["min_size"], case["max_size"], case["score_thresh"])
        save_file(tensors, os.path.join(out_dir, f"case_{case['name']}.safetensors"))
        counts = [int(tensors[f"scores.{i}"].numel()) for i in range(len(images))]
        props = [int(tensors[f"proposals.{i}"].shape[0]) for i in range(len(images))]
        print(f"{case['name']}: proposals {props}, detections {counts}", file=sys.stderr)
    with open(os.path.join(out_dir, "cases.json"), "w") as f:
        json.dump({"torchvision": torchvision.__version__, "torch": torch.__version__, "cases": cases}, f, indent=1)


if __name__ == "__main__":
    main(sys.argv[1])
