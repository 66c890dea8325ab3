"""OpenCV DNN side of `cargo bench --bench ssd`.

Usage: python opencv_ssd.py MODEL_DIR THREADS ROUNDS IMAGE...

Runs the TF OD API ssd_mobilenet_v2_coco frozen graph with OpenCV's DNN module, one image
per forward pass (blobFromImage + forward, as OpenCV's sample does), and prints imgs/s as
one JSON line.
"""

import json
import os
import sys
import time

import cv2


def main():
    model_dir, threads, rounds, images = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4:]
    cv2.setNumThreads(threads)
    net = cv2.dnn.readNetFromTensorflow(
        os.path.join(model_dir, "frozen_inference_graph.pb"),
        os.path.join(model_dir, "ssd_mobilenet_v2_coco_2018_03_29.pbtxt"),
    )
    bgr = [cv2.imread(p) for p in images]

    def run(img):
        net.setInput(cv2.dnn.blobFromImage(img, 1.0, (300, 300), (0, 0, 0), swapRB=True, crop=False))
        return net.forward()

    for img in bgr:  # warm-up
        run(img)
    start = time.perf_counter()
    for _ in range(rounds):
        for img in bgr:
            run(img)
    elapsed = time.perf_counter() - start
    print(json.dumps({"imgs_per_s": rounds * len(bgr) / elapsed, "opencv": cv2.__version__}), flush=True)


if __name__ == "__main__":
    main()
