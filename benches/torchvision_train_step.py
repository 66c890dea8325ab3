"""torchvision side of `cargo bench --bench train_step`.

Usage: python torchvision_train_step.py WEIGHTS_OUT SPEC_JSON THREADS

Builds the fine-tuning layout torchvision uses with pretrained weights (FrozenBatchNorm2d
ResNet-50, `_resnet_fpn_extractor(body, trainable_layers)`, `FasterRCNN(num_classes,
min_size, max_size)`) with the seeded, calibrated weights of the training parity test
(tests/reference/training_reference.py), writes them to WEIGHTS_OUT for the Rust side, loads
the batch SPEC_JSON names (image paths, boxes, labels, settings) and builds
`torch.optim.SGD(momentum, weight_decay)` over the trainable parameters. When the spec says
`flush_denormal`, subnormal floats are flushed to zero first, as on the Rust side. Then it serves
commands on stdin, one JSON reply per line on stdout:

* first, unasked: {"ready": true, "trainable_parameters": N}
* "step SEED": one timed training step, exactly torchvision's reference loop
  (`zero_grad`, `model(images, targets)`, sum of the losses, `backward`, `optimizer.step`)
  after `torch.manual_seed(SEED)`, with the wall time of each stage (forward hooks on the
  transform, the ResNet body, the FPN, the RPN and the RoI heads; then backward and the
  optimizer) and the CPU time of the process:
  {"seconds": S, "cpu_seconds": C, "stages": {...}, "losses": {...}}
* "quit": {"peak_rss_mb": M} (this process's peak resident memory), then exit.

Run as a server so the Rust side can alternate steps of both implementations: on a shared
machine, load changes over minutes, and alternating exposes both to the same load.
"""

import json
import os
import resource
import sys
import time

import torch
from PIL import Image
from torchvision.models.detection import FasterRCNN
from torchvision.models.detection.backbone_utils import _resnet_fpn_extractor
from torchvision.transforms.functional import pil_to_tensor

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "reference"))
import training_reference as ref  # noqa: E402
from safetensors.torch import save_file  # noqa: E402


def build_model(spec):
    """The training parity test's seeded model, with the benchmark's class count, sizes and
    trainable layers."""
    torch.manual_seed(0)
    backbone = _resnet_fpn_extractor(ref.calibrated_body(), spec["trainable_layers"])
    model = FasterRCNN(
        backbone, num_classes=spec["num_classes"], min_size=spec["min_size"], max_size=spec["max_size"]
    )
    with torch.no_grad():
        # As the parity test: spread objectness and class scores.
        model.rpn.head.cls_logits.weight.normal_(0, 0.2)
        model.rpn.head.bbox_pred.weight.normal_(0, 0.02)
        model.roi_heads.box_predictor.cls_score.weight.normal_(0, 0.05)
        model.roi_heads.box_predictor.bbox_pred.weight.normal_(0, 0.02)
    model.train()
    return model


class StageClock:
    """Wall time per stage of a training step, from forward pre-hooks and hooks on the
    model's parts (each part runs once per step in training; a hook costs microseconds)."""

    PARTS = ("transform", "backbone.body", "backbone.fpn", "rpn", "roi_heads")

    def __init__(self, model):
        self.times = {}
        self.started = {}
        modules = dict(model.named_modules())
        for name in self.PARTS:
            modules[name].register_forward_pre_hook(self._start(name))
            modules[name].register_forward_hook(self._stop(name))

    def _start(self, name):
        def hook(*_):
            self.started[name] = time.perf_counter()

        return hook

    def _stop(self, name):
        def hook(*_):
            self.times[name] = time.perf_counter() - self.started[name]

        return hook


def step(model, optimizer, images, targets, seed, clock):
    torch.manual_seed(seed)
    cpu_start = time.process_time()
    start = time.perf_counter()
    optimizer.zero_grad()
    losses = model(images, targets)
    total = sum(losses.values())
    forward_done = time.perf_counter()
    total.backward()
    backward_done = time.perf_counter()
    optimizer.step()
    end = time.perf_counter()
    cpu = time.process_time() - cpu_start
    reply = {"seconds": end - start, "cpu_seconds": cpu, "losses": {k: float(v.detach()) for k, v in losses.items()}}
    stages = dict(clock.times)
    stages["forward"] = forward_done - start
    stages["backward"] = backward_done - forward_done
    stages["optimizer"] = end - backward_done
    reply["stages"] = stages
    return reply


def main():
    if len(sys.argv) != 4:
        sys.exit("usage: torchvision_train_step.py WEIGHTS_OUT SPEC_JSON THREADS")
    weights_out, spec_path, threads = sys.argv[1], sys.argv[2], int(sys.argv[3])
    with open(spec_path) as f:
        spec = json.load(f)
    # Before any parallel work, so that the OpenMP threads inherit it (as on the Rust side).
    if spec["flush_denormal"] and not torch.set_flush_denormal(True):
        sys.exit("this CPU cannot flush denormals: run with BENCH_FLUSH_DENORMAL=0")
    torch.set_num_threads(threads)
    model = build_model(spec)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, weights_out)
    images = [pil_to_tensor(Image.open(e["path"]).convert("RGB")).float() / 255.0 for e in spec["images"]]
    targets = [
        {
            "boxes": torch.tensor(e["boxes"], dtype=torch.float32).reshape(-1, 4),
            "labels": torch.tensor(e["labels"], dtype=torch.int64),
        }
        for e in spec["images"]
    ]
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(
        params, lr=spec["lr"], momentum=spec["momentum"], weight_decay=spec["weight_decay"]
    )
    clock = StageClock(model)
    print(json.dumps({"ready": True, "trainable_parameters": sum(p.numel() for p in params)}), flush=True)
    for line in sys.stdin:
        command = line.split()
        if not command:
            continue
        if command[0] == "step" and len(command) == 2:
            reply = step(model, optimizer, images, targets, int(command[1]), clock)
        elif command[0] == "quit":
            # ru_maxrss is in KiB on Linux.
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
            print(json.dumps({"peak_rss_mb": peak}), flush=True)
            return
        else:
            reply = {"error": f"unknown command {line.strip()!r}: expected 'step SEED' or 'quit'"}
        print(json.dumps(reply), flush=True)


if __name__ == "__main__":
    main()
