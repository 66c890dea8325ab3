"""torchvision side of `cargo bench --bench detector`.

Usage: python torchvision_detector.py WEIGHTS_OUT THREADS ROUNDS IMAGE...

Builds the same seeded Faster R-CNN as the parity test (FrozenBatchNorm2d layout), writes
its weights to WEIGHTS_OUT for the Rust side, then times eager inference for every
(min_size, batch) setting and prints one JSON line per setting.
"""

import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "reference"))
import faster_rcnn_reference as ref  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

SETTINGS = [(512, 1), (512, 4), (800, 1), (800, 4)]


def main():
    weights_out, threads, rounds, images = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4:]
    torch.set_num_threads(threads)
    trained = ref.build_model()
    save_file({k: v.contiguous() for k, v in trained.state_dict().items()}, weights_out)
    model = ref.frozen_bn_model(trained)
    model.roi_heads.score_thresh = 0.05
    tensors = [ref.load(p) for p in images]
    for min_size, batch in SETTINGS:
        model.transform.min_size = (min_size,)
        model.transform.max_size = 1333
        batches = [tensors[i : i + batch] for i in range(0, len(tensors), batch)]
        with torch.inference_mode():
            model(batches[0])  # warm-up
            start = time.perf_counter()
            count = 0
            for _ in range(rounds):
                for b in batches:
                    model(b)
                    count += len(b)
            elapsed = time.perf_counter() - start
        print(json.dumps({"min_size": min_size, "batch": batch, "imgs_per_s": count / elapsed}), flush=True)


if __name__ == "__main__":
    main()
