"""Distil EfficientAD's default teacher and write the packaged copy (float16) that iadkit ships.

    python bench/efficientad_teacher.py                 # distil (or reuse the cache), write, check
    python bench/efficientad_teacher.py --check-only    # only compare the packaged file with its target

The teacher is the one `EfficientAD()` would distil with its defaults (`distillation_config`;
cached in $IADKIT_CACHE_DIR like any other). The packaged file is that state in float16, with
its configuration and cost in the metadata; `cached_teacher` returns it instead of distilling
whenever a fit asks for the same configuration. The check draws general images from another
stream than the distillation's (seed 12345) and prints the distillation MSE of the float32
teacher, of its float16 copy and of an undistilled PDN (1.0 = predicting the channel mean).
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from iadkit.methods.efficientad import (
    PACKAGED_TEACHER,
    DistillationTarget,
    EfficientAD,
    distill_teacher,
    held_out_distillation_mse,
    read_teacher,
    save_teacher,
    teacher_cache_path,
)


def held_out_mse(config: dict, states: dict[str, dict[str, torch.Tensor]]) -> dict[str, float]:
    """Distillation MSE of each state on 32 general images of the check's own stream (seed 12345)."""
    return {k: round(v, 4) for k, v in held_out_distillation_mse(config, states, n=32, seed=12345).items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--check-only", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(1)
    config = EfficientAD().teacher_config()
    if not args.check_only:
        t0 = time.perf_counter()
        # the cache entry, distilled now if missing (not `cached_teacher`: it would return the packaged file)
        path = teacher_cache_path(config)
        if path.is_file():
            state, meta = read_teacher(path)
            info = meta.get("info", {})
        else:
            state, info = distill_teacher(config, progress=True)
            save_teacher(path, state, config, info)
        if "distill_target_mean" not in state:  # a cache entry written before the statistics were kept
            target = DistillationTarget(config)
            state["distill_target_mean"] = target.mean.reshape(-1).contiguous()
            state["distill_target_std"] = target.std.reshape(-1).contiguous()
        half = {k: v.half().contiguous() for k, v in state.items()}
        check = held_out_mse(config, {"float32": state, "float16": half, "undistilled": {}})
        info = {**info, "held_out_mse": check}
        save_teacher(PACKAGED_TEACHER, half, config, info)
        print(
            f"wrote {PACKAGED_TEACHER} ({PACKAGED_TEACHER.stat().st_size / 2**20:.1f} MiB) in {time.perf_counter() - t0:.0f} s"
        )
    state, meta = read_teacher(PACKAGED_TEACHER)
    assert meta["config"] == config, "the packaged teacher is not the default configuration's"
    print(
        json.dumps(
            {"config": config, **meta["info"], "check": held_out_mse(config, {"packaged": state, "undistilled": {}})}
        )
    )


if __name__ == "__main__":
    main()
