"""Golden outputs of torchvision.ops for the Rust ops parity test.

Usage: python ops_reference.py OUT_DIR   (writes OUT_DIR/ops.safetensors)

Random inputs with the awkward cases that break NMS and RoIAlign implementations: tied
scores, zero-area and inverted boxes, boxes outside the feature map, empty inputs.
"""

import os
import sys

import torch
import torchvision
from safetensors.torch import save_file
from torchvision.models.detection import _utils as det_utils


def random_boxes(n, size, gen, degenerate=0.1):
    xy = torch.rand(n, 2, generator=gen) * size
    wh = torch.rand(n, 2, generator=gen) * size / 3
    wh[torch.rand(n, generator=gen) < degenerate] = 0.0  # zero-area boxes
    return torch.cat([xy, xy + wh], dim=1)


def main(out_dir):
    out = os.path.join(out_dir, "ops.safetensors")
    gen = torch.Generator().manual_seed(1234)
    t = {}
    # nms: ties (scores rounded to 2 decimals), duplicates, degenerate boxes.
    boxes = random_boxes(600, 100.0, gen)
    boxes[500:550] = boxes[:50]  # exact duplicates
    scores = (torch.rand(600, generator=gen) * 100).round() / 100
    t["nms.boxes"], t["nms.scores"] = boxes, scores
    for thr in (0.3, 0.5, 0.7):
        t[f"nms.keep.{thr}"] = torchvision.ops.nms(boxes, scores, thr)
    t["nms.empty_keep"] = torchvision.ops.nms(torch.zeros(0, 4), torch.zeros(0), 0.5)
    # batched_nms: small (coordinate trick) and large (per class) paths.
    for name, n in (("small", 300), ("large", 3000)):
        b = random_boxes(n, 200.0, gen)
        s = (torch.rand(n, generator=gen) * 50).round() / 50
        idx = torch.randint(0, 7, (n,), generator=gen)
        t[f"batched.{name}.boxes"], t[f"batched.{name}.scores"], t[f"batched.{name}.idxs"] = b, s, idx
        t[f"batched.{name}.keep"] = torchvision.ops.batched_nms(b, s, idx, 0.5)
    # box_iou, including zero-area pairs (0/0 = NaN in torchvision too).
    a, b = random_boxes(40, 50.0, gen), random_boxes(30, 50.0, gen)
    t["iou.a"], t["iou.b"], t["iou.out"] = a, b, torchvision.ops.box_iou(a, b)
    # roi_align: rois partly or fully outside the map, tiny and inverted rois.
    feat = torch.randn(2, 8, 20, 24, generator=gen)
    rois_xy = torch.rand(60, 2, generator=gen) * 120 - 10
    rois_wh = torch.rand(60, 2, generator=gen) * 60
    rois = torch.cat([torch.randint(0, 2, (60, 1), generator=gen).float(), rois_xy, rois_xy + rois_wh], dim=1)
    rois[0, 1:] = torch.tensor([5.0, 5.0, 5.0, 5.0])  # zero-size
    rois[1, 1:] = torch.tensor([30.0, 30.0, 20.0, 20.0])  # inverted
    rois[2, 1:] = torch.tensor([200.0, 200.0, 260.0, 240.0])  # outside
    t["roi.input"], t["roi.rois"] = feat, rois
    for scale in (0.25, 0.5):
        for ratio in (2, 0, -1):
            for aligned in (False, True):
                key = f"roi.out.{scale}.{ratio}.{int(aligned)}"
                t[key] = torchvision.ops.roi_align(feat, rois, (7, 5), scale, ratio, aligned)
    t["roi.empty"] = torchvision.ops.roi_align(feat, torch.zeros(0, 5), (7, 7), 0.25, 2, False)
    # Box coder, with deltas large enough to hit the exp clamp.
    props = random_boxes(50, 300.0, gen, degenerate=0.0) + torch.tensor([0.0, 0.0, 1.0, 1.0])
    codes = torch.randn(50, 12, generator=gen) * 2
    codes[0, 2] = 10.0
    coder = det_utils.BoxCoder((10.0, 10.0, 5.0, 5.0))
    t["coder.proposals"], t["coder.codes"] = props, codes
    t["coder.decoded"] = coder.decode(codes, [props])
    gt = random_boxes(50, 300.0, gen, degenerate=0.0) + torch.tensor([0.0, 0.0, 1.0, 1.0])
    t["coder.gt"] = gt
    t["coder.encoded"] = coder.encode_single(gt, props)
    # clip and remove_small_boxes
    t["clip.out"] = torchvision.ops.clip_boxes_to_image(boxes * 1.5 - 20, (90, 110))
    t["small.keep"] = torchvision.ops.remove_small_boxes(boxes, 5.0)
    save_file({k: v.contiguous() for k, v in t.items()}, out)


if __name__ == "__main__":
    main(sys.argv[1])
