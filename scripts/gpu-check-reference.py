"""torchvision side of scripts/gpu-check.

  gpu-check-reference.py reference WEIGHTS_OUT DEVICE WARM N IMAGE...
      Builds the parity test's seeded random Faster R-CNN (tests/reference), saves its state
      dict to WEIGHTS_OUT, then on DEVICE prints one JSON line per batch size (1, 4) with
      torchvision's imgs/s at min_size 800 (score threshold 0.05), timed on images N after
      WARM warm-up ones, the sample images cycled; and one line with its detections of each
      image at batch 1.
  gpu-check-reference.py report REFERENCE.jsonl RUNS.tsv WARM
      Compares attrstream's `detect` runs listed in RUNS.tsv (mode, batch, images, wall
      seconds, JSON-lines file) with the reference: imgs/s of the model alone (mean of the
      `inference_ms` of the records after the first WARM), imgs/s of the whole CLI (the
      difference of two runs' wall times), the ratios, and how far the detections are from
      torchvision's.

Both sides upload uint8 pixels, convert to float on the device and copy the boxes, scores and
labels back to the host, as attrstream's detector does.
"""

import json
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
SETTINGS = {"min_size": 800, "max_size": 1333, "score_thresh": 0.05}


def reference(weights_out, device, warm, n, paths):
    import torch
    from PIL import Image
    from safetensors.torch import save_file
    from torchvision.transforms.functional import pil_to_tensor

    sys.path.insert(0, os.path.join(HERE, "..", "tests", "reference"))
    import faster_rcnn_reference as ref

    trained = ref.build_model()  # torch.manual_seed(0), weights=None, weights_backbone=None
    save_file({k: v.contiguous() for k, v in trained.state_dict().items()}, weights_out)
    model = ref.frozen_bn_model(trained).to(device)
    model.transform.min_size = (SETTINGS["min_size"],)
    model.transform.max_size = SETTINGS["max_size"]
    model.roi_heads.score_thresh = SETTINGS["score_thresh"]
    pixels = [pil_to_tensor(Image.open(p).convert("RGB")) for p in paths]
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)

    def run(images, batch):
        results = []
        for i in range(0, len(images), batch):
            out = model([im.to(device).float() / 255.0 for im in images[i : i + batch]])
            results += [{k: v.cpu() for k, v in o.items()} for o in out]
        return results

    with torch.inference_mode():
        for batch in (1, 4):
            seq = [pixels[i % len(pixels)] for i in range(warm + n)]
            run(seq[:warm], batch)
            sync()
            start = time.perf_counter()
            run(seq[warm:], batch)
            sync()
            rate = n / (time.perf_counter() - start)
            print(json.dumps({"batch": batch, "imgs_per_s": rate}), flush=True)
        dets = [
            {"boxes": o["boxes"].tolist(), "scores": o["scores"].tolist(), "labels": o["labels"].tolist()}
            for o in run(pixels, 1)
        ]
        print(json.dumps({"detections": dets, "torch": torch.__version__}), flush=True)


def iou(a, b):
    w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = w * h
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def agreement(theirs, ours, png, top=10):
    """Counts, and for torchvision's `top` best detections the closest of ours with the same
    label, over the PNG photos (PIL and the image crate decode JPEGs slightly differently)."""
    counts = []
    worst_iou, worst_score = 1.0, 0.0
    for t, o in [(t, o) for t, o, p in zip(theirs, ours, png) if p]:
        counts.append(f"{len(t['scores'])}/{len(o)}")
        for box, score, label in list(zip(t["boxes"], t["scores"], t["labels"]))[:top]:
            same = [d for d in o if d["label_id"] == label]
            best = max(same, key=lambda d: iou(box, d["box_px"]), default=None)
            worst_iou = min(worst_iou, iou(box, best["box_px"]) if best else 0.0)
            worst_score = max(worst_score, abs(score - best["score"]) if best else 1.0)
    return f"PNG detections torchvision/ours {' '.join(counts)}; top {top}: min IoU {worst_iou:.3f}, max |score diff| {worst_score:.4f}"


def report(ref_file, runs_file, warm):
    ref = [json.loads(line) for line in open(ref_file) if line.startswith("{")]
    speed = {r["batch"]: r["imgs_per_s"] for r in ref if "batch" in r}
    theirs = next((r["detections"] for r in ref if "detections" in r), None)
    runs = {}
    for line in open(runs_file):
        mode, batch, images, wall, path = line.split()
        records = [json.loads(l) for l in open(path) if l.startswith("{")]
        runs.setdefault((mode, int(batch)), []).append((int(images), float(wall), records))
    print(f"{'path':<6} {'batch':>5} {'torchvision/s':>14} {'model/s':>9} {'ratio':>6} {'cli/s':>8} {'ratio':>6}")
    for (mode, batch), pair in sorted(runs.items()):
        if len(pair) < 2:
            continue
        (n_small, t_small, small), (n_big, t_big, big) = sorted(pair)
        timed = [r["inference_ms"] for r in big[warm:]]
        model_rate = 1000.0 * len(timed) / sum(timed) if timed and sum(timed) > 0 else float("nan")
        cli_rate = (n_big - n_small) / (t_big - t_small) if t_big > t_small else float("nan")
        tv = speed.get(batch, float("nan"))
        print(f"{mode:<6} {batch:>5} {tv:>14.2f} {model_rate:>9.2f} {model_rate / tv:>6.2f} {cli_rate:>8.2f} {cli_rate / tv:>6.2f}")
        if batch == 1 and theirs:
            ours = small[: len(theirs)]
            png = [r["image"].endswith(".png") for r in ours]
            print(f"       {mode}: {agreement(theirs, [r['detections'] for r in ours], png)}")
        if len(big) != n_big or any("error" in r for r in big):
            print(f"       {mode} batch {batch}: {len(big)} records for {n_big} images (errors?)")


if __name__ == "__main__":
    cmd, args = sys.argv[1], sys.argv[2:]
    if cmd == "reference":
        reference(args[0], args[1], int(args[2]), int(args[3]), args[4:])
    elif cmd == "report":
        report(args[0], args[1], int(args[2]))
    else:
        sys.exit(__doc__)
