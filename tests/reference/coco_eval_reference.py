"""Randomized COCO evaluation cases and pycocotools' results on them, for
tests/coco_eval_reference.rs.

Usage: coco_eval_reference.py OUT_DIR

Writes OUT_DIR/cases.json (the case names) and per case OUT_DIR/<case>/gt.json,
OUT_DIR/<case>/results.json and OUT_DIR/<case>/expected.json with pycocotools' numbers. Every
float in expected.json is written as its IEEE-754 bit pattern (an unsigned 64-bit integer) so
the Rust side reads the exact double pycocotools computed.

The cases are seeded and cover: many images and classes, sparse and unsorted ids, crowd
regions (also absorbing several detections), all area ranges (and annotation areas that differ
from the box area), images without ground truth or without detections, more than 100
detections on an image, duplicate scores, categories with ground truth but no detections and
with detections but no ground truth, detections of categories the ground truth does not list
(pycocotools ignores them), zero-size detection boxes, and an "ignore" key that pycocotools
overwrites.
"""

import contextlib
import io
import json
import os
import random
import struct
import sys

import numpy as np
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval


def bits(x):
    return struct.unpack("<Q", struct.pack("<d", float(x)))[0]


def r2(x):
    """Two decimals: short decimal strings parse to the same double everywhere."""
    return round(float(x), 2)


def make_case(seed, n_images, n_cats, dense_images=0, unknown_cat_dets=0):
    rng = random.Random(seed)
    # Sparse, unsorted ids.
    image_ids = rng.sample(range(1, 10 * n_images + 10), n_images)
    cat_ids = rng.sample(range(1, 200), n_cats)
    categories = [{"id": c, "name": f"class_{c}", "supercategory": "thing"} for c in cat_ids]
    # The first category never gets a detection, the last never gets ground truth.
    assert n_cats >= 3
    no_det_cat, no_gt_cat = cat_ids[0], cat_ids[-1]
    gt_cats = cat_ids[:-1]
    det_cats = cat_ids[1:]

    images, annotations, results = [], [], []
    ann_id = rng.randint(1, 50)
    for n, img_id in enumerate(image_ids):
        w, h = rng.randint(64, 1200), rng.randint(64, 1000)
        images.append({"id": img_id, "width": w, "height": h, "file_name": f"{img_id}.jpg"})
        kind = n % 7
        n_gt = 0 if kind == 0 else rng.randint(1, 9)  # every 7th image: no ground truth
        objects = []
        for _ in range(n_gt):
            scale = rng.choice([8, 20, 30, 45, 80, 120, 300])  # small, medium and large
            bw = r2(max(1.0, rng.uniform(0.5, 1.5) * scale))
            bh = r2(max(1.0, rng.uniform(0.5, 1.5) * scale))
            x, y = r2(rng.uniform(0, max(1, w - bw))), r2(rng.uniform(0, max(1, h - bh)))
            crowd = 1 if rng.random() < 0.08 else 0
            if crowd:
                bw, bh = r2(bw * 2.5), r2(bh * 2.5)
            # COCO areas come from the segmentation: smaller than the box.
            area = r2(bw * bh * rng.uniform(0.55, 1.0))
            ann = {
                "id": ann_id,
                "image_id": img_id,
                "category_id": rng.choice(gt_cats),
                "bbox": [x, y, bw, bh],
                "area": area,
                "iscrowd": crowd,
                "segmentation": [],
            }
            if rng.random() < 0.05:
                ann["ignore"] = 1  # pycocotools overwrites it with iscrowd
            annotations.append(ann)
            objects.append(ann)
            ann_id += rng.randint(1, 3)
        if kind == 1:
            continue  # every 7th image: no detections
        for obj in objects:
            x, y, bw, bh = obj["bbox"]
            copies = rng.choice([0, 1, 1, 1, 2]) if not obj["iscrowd"] else rng.randint(1, 4)
            for _ in range(copies):
                jitter = rng.choice([0.02, 0.08, 0.15, 0.3])
                dx, dy = rng.gauss(0, jitter) * bw, rng.gauss(0, jitter) * bh
                sw, sh = rng.uniform(1 - jitter, 1 + jitter), rng.uniform(1 - jitter, 1 + jitter)
                if obj["iscrowd"]:
                    sw, sh = rng.uniform(0.1, 0.4), rng.uniform(0.1, 0.4)
                    dx, dy = rng.uniform(0, 0.5) * bw, rng.uniform(0, 0.5) * bh
                cat = obj["category_id"]
                if cat == no_det_cat or rng.random() < 0.1:
                    cat = rng.choice(det_cats)
                results.append(
                    {
                        "image_id": img_id,
                        "category_id": cat,
                        "bbox": [r2(x + dx), r2(y + dy), r2(bw * sw), r2(bh * sh)],
                        # Better boxes score higher, noisily; two decimals give many ties.
                        "score": round(min(1.0, max(0.01, 1.0 - 1.5 * jitter + rng.gauss(0, 0.15))), 2),
                    }
                )
        n_fp = rng.randint(0, 4)
        if n < dense_images:
            n_fp = rng.randint(101, 160)  # more than maxDets=100 on this image
        for _ in range(n_fp):
            bw, bh = r2(rng.uniform(2, 200)), r2(rng.uniform(2, 200))
            if rng.random() < 0.03:
                bw = 0.0  # zero-size box: IoU 0 with everything
            results.append(
                {
                    "image_id": img_id,
                    "category_id": rng.choice(det_cats),
                    "bbox": [r2(rng.uniform(0, w)), r2(rng.uniform(0, h)), bw, bh],
                    "score": round(rng.uniform(0.0, 0.8), 2),
                }
            )
    for _ in range(unknown_cat_dets):
        results.append(
            {
                "image_id": rng.choice(image_ids),
                "category_id": 1000 + rng.randint(0, 5),
                "bbox": [10.0, 10.0, 50.0, 50.0],
                "score": 0.99,
            }
        )
    # Detections in an order unrelated to images, as model output often is.
    rng.shuffle(results)
    rng.shuffle(images)
    gt = {"info": {"description": f"seed {seed}"}, "images": images, "annotations": annotations, "categories": categories}
    assert any(a["iscrowd"] for a in annotations)
    return gt, results, no_det_cat, no_gt_cat


def evaluate(gt_path, results_path):
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO(gt_path)
        coco_dt = coco_gt.loadRes(results_path)
        e = COCOeval(coco_gt, coco_dt, "bbox")
        e.evaluate()
        e.accumulate()
        e.summarize()
    return e


def main():
    out = sys.argv[1]
    cases = {
        "mixed": dict(seed=1, n_images=60, n_cats=8, dense_images=2),
        "many_classes": dict(seed=2, n_images=120, n_cats=25, dense_images=1, unknown_cat_dets=5),
        "dense": dict(seed=3, n_images=12, n_cats=3, dense_images=8),
        "small": dict(seed=4, n_images=9, n_cats=3),
    }
    for name, params in cases.items():
        case_dir = os.path.join(out, name)
        os.makedirs(case_dir)
        gt, results, no_det_cat, no_gt_cat = make_case(**params)
        gt_path = os.path.join(case_dir, "gt.json")
        results_path = os.path.join(case_dir, "results.json")
        with open(gt_path, "w") as f:
            json.dump(gt, f)
        with open(results_path, "w") as f:
            json.dump(results, f)
        e = evaluate(gt_path, results_path)
        precision = e.eval["precision"]  # [T, R, K, A, M]
        recall = e.eval["recall"]  # [T, K, A, M]
        cat_ids = e.params.catIds
        per_class = []
        for k, cat_id in enumerate(cat_ids):
            # The usual per-class AP (as detectron2 and mmdetection report it).
            p = precision[:, :, k, 0, -1]
            p50 = precision[0, :, k, 0, -1]
            per_class.append(
                {
                    "category_id": int(cat_id),
                    "ap": bits(np.mean(p[p > -1]) if (p > -1).any() else -1),
                    "ap50": bits(np.mean(p50[p50 > -1]) if (p50 > -1).any() else -1),
                }
            )
        curves = {}
        for key, t in (("iou50", 0), ("iou75", 5)):
            s = precision[t, :, :, 0, -1]  # [R, K]
            curves[key] = [bits(np.mean(row[row > -1]) if (row > -1).any() else -1) for row in s]
        expected = {
            "stats": [bits(v) for v in e.stats],
            "per_class": per_class,
            "curves": curves,
            "category_ids": [int(c) for c in cat_ids],
            "no_det_category": no_det_cat,
            "no_gt_category": no_gt_cat,
            "iou_thresholds": [bits(v) for v in e.params.iouThrs],
            "recall_thresholds": [bits(v) for v in e.params.recThrs],
            "precision_shape": list(precision.shape),
            "precision": [bits(v) for v in precision.ravel()],
            "recall": [bits(v) for v in recall.ravel()],
            "num_detections": len(results),
            "max_detections_per_image": max(
                sum(1 for d in results if d["image_id"] == i["id"]) for i in gt["images"]
            ),
        }
        with open(os.path.join(case_dir, "expected.json"), "w") as f:
            json.dump(expected, f)
    with open(os.path.join(out, "cases.json"), "w") as f:
        json.dump(sorted(cases), f)


if __name__ == "__main__":
    main()
