"""Fit time of trained methods on ELPV `all` at 224 px, to compare two source trees (issue 9:
frozen features computed once vs every epoch).

    git worktree add --detach /tmp/before 6e64ecd^          # the tree before the feature cache
    PYTHONPATH=/tmp/before/src python bench/fit_cache_time.py before 2 stfpm reverse_distillation fastflow
    PYTHONPATH=$PWD/src        python bench/fit_cache_time.py after  2 stfpm reverse_distillation fastflow

Arguments: a label, the number of epochs, the methods. One thread; prints fit CPU and wall
seconds per method.
"""

from __future__ import annotations

import sys
import time

import torch

from iadkit import Model, load_dataset


def main() -> None:
    label, epochs, methods = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
    torch.set_num_threads(1)
    train = list(load_dataset("elpv", category="all").train)
    for method in methods:
        cpu, wall = time.process_time(), time.perf_counter()
        Model.create(method, image_size=224, epochs=epochs).fit(train, progress=False)
        row = {"fit_cpu_s": round(time.process_time() - cpu, 1), "fit_wall_s": round(time.perf_counter() - wall, 1)}
        print(label, method, epochs, len(train), row, flush=True)


if __name__ == "__main__":
    main()
