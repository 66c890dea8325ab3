"""Golden values of torch.optim.SGD, clip_grad_norm_ and the learning-rate schedulers for the
Rust optimizer parity test (tests/train_trainer.rs, `sgd_and_schedules_match_torch`).

Usage: python sgd_reference.py OUT_DIR   (writes OUT_DIR/sgd.json)

A fixed toy problem in float32: two trained parameters `w1` [4] and `w2` [2, 3] and one frozen
parameter `f` [2] (requires_grad False, in the optimizer anyway: torch skips it, so must we).
At step t the loss is

    sum((w2 @ x_t - y_t)^2) + 0.5 * sum(c * w1^2) + sum(w1) * sum(w2) + sum(f) * sum(w1)

with x_t, y_t given per step in the output. Each step: zero the gradients, backward,
`clip_grad_norm_` (when the case clips), `optimizer.step()`, then every scheduler's `step()`.

Schedules follow torchvision's detection reference: a per-iteration `LinearLR` warm-up
(start_factor = warmup_factor, total_iters = warmup_steps) chained with the decay scheduler,
both stepped every iteration (`MultiStepLR` or `CosineAnnealingLR(T_max = total_steps)`).
attrstream's `LrSchedule::lr_at` is the product warm-up factor x decay; torch's chained
schedulers give exactly that product for MultiStepLR and for CosineAnnealingLR with
eta_min = 0 (its recursive form is multiplicative then), and for CosineAnnealingLR with
eta_min > 0 without warm-up. (With both a warm-up and eta_min > 0, torch's recursive chaining
is not a product: that combination is not a parity case.)

Each case records its schedule and SGD settings in attrstream's serde form (`LrSchedule`,
`SgdConfig`) so the Rust test deserialises them directly.
"""

import json
import math
import os
import sys

import torch

STEPS = 10
C = [1.0, 2.0, 0.5, 3.0]
W1 = [0.5, -1.0, 2.0, 0.25]
W2 = [[0.3, -0.2, 0.1], [1.5, 0.7, -0.9]]
F = [0.75, -0.5]

CASES = [
    {
        "name": "warmup_cosine_momentum_wd_clip",
        "schedule": {
            "base_lr": 0.05,
            "warmup_steps": 3,
            "warmup_factor": 0.1,
            "decay": {"kind": "cosine", "min_lr": 0.0},
            "total_steps": STEPS,
        },
        "sgd": {"momentum": 0.9, "weight_decay": 1e-2},
        "clip": 2.0,
    },
    {
        "name": "warmup_multistep_momentum_wd_clip",
        "schedule": {
            "base_lr": 0.02,
            "warmup_steps": 4,
            "warmup_factor": 0.001,
            "decay": {"kind": "step", "milestones": [3, 6, 8], "gamma": 0.1},
            "total_steps": STEPS,
        },
        "sgd": {"momentum": 0.9, "weight_decay": 1e-4},
        # Some steps' gradients are below the limit, some above.
        "clip": 12.0,
    },
    {
        "name": "cosine_min_lr_plain_sgd",
        "schedule": {
            "base_lr": 0.03,
            "warmup_steps": 0,
            "warmup_factor": 1.0,
            "decay": {"kind": "cosine", "min_lr": 0.005},
            "total_steps": STEPS,
        },
        "sgd": {"momentum": 0.0, "weight_decay": 0.0},
        "clip": None,
    },
    {
        "name": "constant_momentum_no_wd",
        "schedule": {
            "base_lr": 0.01,
            "warmup_steps": 0,
            "warmup_factor": 1.0,
            "decay": {"kind": "constant"},
            "total_steps": STEPS,
        },
        "sgd": {"momentum": 0.5, "weight_decay": 0.0},
        "clip": None,
    },
]


def inputs(t):
    """The fixed data of step t."""
    x = [1.0 + 0.1 * t, -0.5 + 0.05 * t * t, math.cos(t)]
    y = [0.2 * t, math.sin(t)]
    return x, y


def schedulers(optimizer, schedule):
    """torchvision's reference: LinearLR warm-up chained with the decay, both per iteration."""
    result = []
    if schedule["warmup_steps"] > 0:
        result.append(
            torch.optim.lr_scheduler.LinearLR(
                optimizer, start_factor=schedule["warmup_factor"], total_iters=schedule["warmup_steps"]
            )
        )
    decay = schedule["decay"]
    if decay["kind"] == "cosine":
        result.append(
            torch.optim.lr_scheduler.CosineAnnealingLR(
                optimizer, T_max=schedule["total_steps"], eta_min=decay["min_lr"]
            )
        )
    elif decay["kind"] == "step":
        result.append(
            torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=decay["milestones"], gamma=decay["gamma"])
        )
    return result


def run(case):
    w1 = torch.tensor(W1, dtype=torch.float32, requires_grad=True)
    w2 = torch.tensor(W2, dtype=torch.float32, requires_grad=True)
    f = torch.tensor(F, dtype=torch.float32)
    c = torch.tensor(C, dtype=torch.float32)
    sgd = case["sgd"]
    optimizer = torch.optim.SGD(
        [w1, w2, f], lr=case["schedule"]["base_lr"], momentum=sgd["momentum"], weight_decay=sgd["weight_decay"]
    )
    chain = schedulers(optimizer, case["schedule"])
    steps = []
    for t in range(STEPS):
        x_list, y_list = inputs(t)
        x = torch.tensor(x_list, dtype=torch.float32)
        y = torch.tensor(y_list, dtype=torch.float32)
        optimizer.zero_grad()
        loss = ((w2 @ x - y) ** 2).sum() + 0.5 * (c * w1 * w1).sum() + w1.sum() * w2.sum() + f.sum() * w1.sum()
        loss.backward()
        clip = case["clip"]
        norm = torch.nn.utils.clip_grad_norm_([w1, w2], clip if clip is not None else float("inf"))
        lr = optimizer.param_groups[0]["lr"]
        optimizer.step()
        for scheduler in chain:
            scheduler.step()
        momentum = {}
        for name, p in (("w1", w1), ("w2", w2)):
            buf = optimizer.state[p].get("momentum_buffer")
            if buf is not None:
                momentum[name] = buf.flatten().tolist()
        steps.append(
            {
                "x": x_list,
                "y": y_list,
                "loss": loss.item(),
                "lr": lr,
                "grad_norm": norm.item(),
                "params": {"w1": w1.detach().flatten().tolist(), "w2": w2.detach().flatten().tolist()},
                "momentum": momentum,
                "f": f.tolist(),
            }
        )
    return {**case, "steps": steps}


def main(out_dir):
    torch.set_num_threads(1)
    result = {"c": C, "w1": W1, "w2": W2, "f": F, "cases": [run(case) for case in CASES]}
    with open(os.path.join(out_dir, "sgd.json"), "w") as fh:
        json.dump(result, fh, indent=1)


if __name__ == "__main__":
    main(sys.argv[1])
