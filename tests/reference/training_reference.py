"""Golden training losses and gradients of torchvision 0.28's Faster R-CNN for the Rust parity
test (tests/parity_training.rs).

Usage: python training_reference.py OUT_DIR

Builds the fine-tuning layout torchvision uses with pretrained weights:
`resnet50(norm_layer=FrozenBatchNorm2d)` -> `_resnet_fpn_extractor(body, 3)` ->
`FasterRCNN(backbone, num_classes=5, min_size=224, max_size=320)`, with seeded weights whose
batch-norm statistics are calibrated on real photos (a random network's are 0/1). Then, in
training mode, it runs the loss forward and backward on three small images (several boxes
and classes, one image without boxes) and writes:

* OUT_DIR/weights.safetensors      the state dict (FrozenBatchNorm2d layout, 5 classes)
* OUT_DIR/image_<i>.png            the input images
* OUT_DIR/cases.json               per case: targets, sampler sizes, losses, sampling counts,
                                   the trainable parameter names and which probes got no gradient
* OUT_DIR/case_<name>.safetensors  per case: the gradients of the probed parameters
* OUT_DIR/roi_align.safetensors    torchvision.ops.roi_align forward and input gradient

Deterministic cases replace `torch.randperm` by `torch.arange` during the forward, so the
balanced sampler takes positives and negatives in index order (attrstream's
`Sampler::first_k()`). The random case keeps torchvision's sampler after
`torch.manual_seed(RANDOM_SEED)`; attrstream's `Sampler::random()` after
`tch::manual_seed(RANDOM_SEED)` draws from the same generator stream.
"""

import json
import os
import sys

import torch
import torchvision
from PIL import Image
from safetensors.torch import save_file
from torchvision.models.detection import FasterRCNN
from torchvision.models.detection.backbone_utils import _resnet_fpn_extractor
from torchvision.ops.misc import FrozenBatchNorm2d
from torchvision.transforms.functional import pil_to_tensor

HERE = os.path.dirname(os.path.abspath(__file__))
SAMPLES = os.path.join(HERE, "..", "..", "assets", "samples")

NUM_CLASSES = 5
TRAINABLE_LAYERS = 3
MIN_SIZE = 224
MAX_SIZE = 320
MEAN = [0.485, 0.456, 0.406]
STD = [0.229, 0.224, 0.225]

# (sample photo, width, height) of each input image.
IMAGES = [("coffee.png", 240, 180), ("chelsea.png", 200, 256), ("astronaut.png", 176, 176)]
# Boxes (x1, y1, x2, y2) in original-image pixels and labels in 1..NUM_CLASSES-1.
TARGETS = [
    {"boxes": [[20.0, 30.0, 140.0, 160.0], [120.5, 10.0, 230.0, 90.0], [60.0, 100.0, 110.0, 150.0]],
     "labels": [1, 2, 3]},
    {"boxes": [[10.0, 20.0, 190.0, 240.0], [40.0, 60.0, 100.0, 130.0], [150.0, 8.0, 170.0, 30.0]],
     "labels": [4, 1, 4]},
    {"boxes": [], "labels": []},
]
EMPTY_TARGETS = [{"boxes": [], "labels": []} for _ in IMAGES]

# Parameters whose gradients are compared (trainable ones) or must be absent (frozen ones).
PROBES = [
    "roi_heads.box_predictor.cls_score.weight",
    "roi_heads.box_predictor.bbox_pred.weight",
    "roi_heads.box_predictor.bbox_pred.bias",
    "roi_heads.box_head.fc6.weight",
    "rpn.head.conv.0.0.weight",
    "rpn.head.cls_logits.weight",
    "rpn.head.bbox_pred.weight",
    "backbone.fpn.layer_blocks.0.0.weight",
    "backbone.fpn.inner_blocks.3.0.weight",
    "backbone.body.layer4.2.conv3.weight",
    "backbone.body.layer2.0.conv1.weight",
    "backbone.body.layer1.0.conv1.weight",
    "backbone.body.conv1.weight",
]

# Seed of the random case (attrstream seeds libtorch's generator the same way).
RANDOM_SEED = 3

# name, targets, (rpn batch, rpn positive fraction, roi batch, roi positive fraction), deterministic
CASES = [
    ("default_first_k", TARGETS, (256, 0.5, 512, 0.25), True),
    # Small batches: the positive caps bind, so "first k" order matters.
    ("small_batches_first_k", TARGETS, (12, 0.5, 40, 0.25), True),
    ("all_empty_first_k", EMPTY_TARGETS, (256, 0.5, 512, 0.25), True),
    # torchvision's own random sampler: which samples differ, how many do not.
    ("default_random", TARGETS, (256, 0.5, 512, 0.25), False),
]


def load(path):
    return pil_to_tensor(Image.open(path).convert("RGB")).float() / 255.0


def calibrated_body():
    """A ResNet-50 whose batch norms carry real statistics, as FrozenBatchNorm2d weights."""
    bn_body = torchvision.models.resnet50(weights=None)
    for m in bn_body.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None  # cumulative average over the calibration batches
            with torch.no_grad():
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
    bn_body.train()
    mean = torch.tensor(MEAN)[:, None, None]
    std = torch.tensor(STD)[:, None, None]
    with torch.no_grad():
        for name in ("coffee.png", "rocket.jpg"):
            x = (load(os.path.join(SAMPLES, name)) - mean) / std
            x = torch.nn.functional.interpolate(x[None], scale_factor=0.5, mode="bilinear")
            bn_body(x)
    body = torchvision.models.resnet50(weights=None, norm_layer=FrozenBatchNorm2d)
    body.load_state_dict(bn_body.state_dict())  # FrozenBatchNorm2d drops num_batches_tracked
    return body


def build_model():
    torch.manual_seed(0)
    backbone = _resnet_fpn_extractor(calibrated_body(), TRAINABLE_LAYERS)
    model = FasterRCNN(backbone, num_classes=NUM_CLASSES, min_size=MIN_SIZE, max_size=MAX_SIZE)
    with torch.no_grad():
        # Spread objectness and class scores so ranking and sampling order are well defined.
        model.rpn.head.cls_logits.weight.normal_(0, 0.2)
        model.rpn.head.bbox_pred.weight.normal_(0, 0.02)
        model.roi_heads.box_predictor.cls_score.weight.normal_(0, 0.05)
        model.roi_heads.box_predictor.bbox_pred.weight.normal_(0, 0.02)
    model.train()
    return model


class CountingSampler:
    """Wraps torchvision's BalancedPositiveNegativeSampler and records, per image, the number
    of positive and negative candidates and of sampled positives and negatives."""

    def __init__(self, inner):
        self.inner = inner
        self.counts = []

    def __call__(self, matched_idxs):
        pos, neg = self.inner(matched_idxs)
        for m, p, n in zip(matched_idxs, pos, neg):
            self.counts.append([int((m >= 1).sum()), int((m == 0).sum()), int(p.sum()), int(n.sum())])
        return pos, neg


def first_k_randperm(n, *args, **kwargs):
    return torch.arange(n, device=kwargs.get("device"))


def run_case(model, images, targets, sizes, deterministic):
    rpn_batch, rpn_fraction, roi_batch, roi_fraction = sizes
    model.zero_grad(set_to_none=True)
    model.rpn.fg_bg_sampler = CountingSampler(
        torchvision.models.detection._utils.BalancedPositiveNegativeSampler(rpn_batch, rpn_fraction))
    model.roi_heads.fg_bg_sampler = CountingSampler(
        torchvision.models.detection._utils.BalancedPositiveNegativeSampler(roi_batch, roi_fraction))
    tv_targets = [
        {"boxes": torch.tensor(t["boxes"], dtype=torch.float32).reshape(-1, 4),
         "labels": torch.tensor(t["labels"], dtype=torch.int64)}
        for t in targets
    ]
    original = torch.randperm
    if deterministic:
        torch.randperm = first_k_randperm
    else:
        torch.manual_seed(RANDOM_SEED)
    try:
        losses = model(images, tv_targets)
    finally:
        torch.randperm = original
    total = losses["loss_classifier"] + losses["loss_box_reg"] + losses["loss_objectness"] + losses["loss_rpn_box_reg"]
    total.backward()
    params = dict(model.named_parameters())
    grads = {f"grad.{n}": params[n].grad.contiguous() for n in PROBES if params[n].grad is not None}
    record = {
        "losses": {k: float(v.detach()) for k, v in losses.items()},
        "rpn_counts": model.rpn.fg_bg_sampler.counts,
        "roi_counts": model.roi_heads.fg_bg_sampler.counts,
        "no_grad": [n for n in PROBES if params[n].grad is None],
    }
    return record, grads


def roi_align_reference(out_dir):
    """torchvision.ops.roi_align forward and input gradient on awkward RoIs."""
    gen = torch.Generator().manual_seed(99)
    feat = torch.randn(2, 8, 20, 24, generator=gen)
    xy = torch.rand(40, 2, generator=gen) * 120 - 10
    wh = torch.rand(40, 2, generator=gen) * 60
    rois = torch.cat([torch.randint(0, 2, (40, 1), generator=gen).float(), xy, xy + wh], dim=1)
    rois[0, 1:] = torch.tensor([5.0, 5.0, 5.0, 5.0])  # zero-size
    rois[1, 1:] = torch.tensor([200.0, 200.0, 260.0, 240.0])  # outside the map
    rois[2, 1:] = torch.tensor([-30.0, -20.0, 10.0, 8.0])  # partly outside
    t = {"input": feat, "rois": rois}
    for ratio in (2, 0):
        for aligned in (False, True):
            x = feat.clone().requires_grad_(True)
            out = torchvision.ops.roi_align(x, rois, (7, 7), 0.25, ratio, aligned)
            grad_out = torch.randn(out.shape, generator=gen)
            (out * grad_out).sum().backward()
            key = f"{ratio}.{int(aligned)}"
            t[f"out.{key}"] = out.detach()
            t[f"grad_output.{key}"] = grad_out
            t[f"grad_input.{key}"] = x.grad
    save_file({k: v.contiguous() for k, v in t.items()}, os.path.join(out_dir, "roi_align.safetensors"))


def main(out_dir):
    os.makedirs(out_dir, exist_ok=True)
    torch.set_num_threads(int(os.environ.get("REFERENCE_THREADS", "2")))
    roi_align_reference(out_dir)
    model = build_model()
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, os.path.join(out_dir, "weights.safetensors"))
    trainable = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    images = []
    for i, (name, w, h) in enumerate(IMAGES):
        path = os.path.join(out_dir, f"image_{i}.png")
        Image.open(os.path.join(SAMPLES, name)).convert("RGB").resize((w, h), Image.BILINEAR).save(path)
        images.append(load(path))
    cases = []
    for name, targets, sizes, deterministic in CASES:
        record, grads = run_case(model, images, targets, sizes, deterministic)
        save_file(grads, os.path.join(out_dir, f"case_{name}.safetensors"))
        record.update({
            "name": name,
            "targets": targets,
            "rpn_batch_size_per_image": sizes[0],
            "rpn_positive_fraction": sizes[1],
            "box_batch_size_per_image": sizes[2],
            "box_positive_fraction": sizes[3],
            "deterministic": deterministic,
            "seed": None if deterministic else RANDOM_SEED,
        })
        cases.append(record)
        print(f"{name}: {record['losses']}", file=sys.stderr)
    summary = {
        "torchvision": torchvision.__version__,
        "torch": torch.__version__,
        "num_classes": NUM_CLASSES,
        "trainable_backbone_layers": TRAINABLE_LAYERS,
        "min_size": MIN_SIZE,
        "max_size": MAX_SIZE,
        "images": [f"image_{i}.png" for i in range(len(IMAGES))],
        "trainable": trainable,
        "probes": PROBES,
        "cases": cases,
    }
    with open(os.path.join(out_dir, "cases.json"), "w") as f:
        json.dump(summary, f, indent=1)


if __name__ == "__main__":
    main(sys.argv[1])
