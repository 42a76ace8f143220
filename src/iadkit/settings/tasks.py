"""Task plans: what the settings that span several categories (continual, multi-class) hand
to the benchmark.

A plan is a list of `Task`. Each task is a unit of evaluation (its own test set) learned at a
training *step*: step s trains on the union of the training images of the tasks whose
``step == s``, and after step s every task with ``step <= s`` is tested. So

- continual, one category per task: task i is learned at step i; after step i the tasks
  0..i are tested, which fills the lower triangle of the T x T accuracy matrix a[l][j]
  (row l = after training step l, column j = tested on task j) of the forgetting measure
  (`iadkit.metrics.continual`);
- continual, class-incremental groups ("3+1+1"): a task holds several categories, trained
  together as one step and tested on the union of their test images;
- multi-class: one task per category, all learned at step 0 (one model on the union of every
  category's good images), each tested on its own category: a 1 x C matrix.

Tasks are plain data (sample lists), so a plan is reproducible from the cell alone.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from iadkit.types import GOOD, Sample


@dataclass(frozen=True)
class Task:
    """One task of a plan: its name, categories, training step and images.

    Parameters
    ----------
    name : str
        Display name: the category, or categories joined by "+" for a group.
    categories : tuple of str
        The dataset categories it holds.
    step : int
        The training step (0-based) at which it is learned.
    train : tuple of Sample
        Its good training images.
    test : tuple of Sample
        Its test images.
    """

    name: str
    categories: tuple[str, ...]
    step: int
    train: tuple[Sample, ...]
    test: tuple[Sample, ...]


def categories_in_order(*splits: Sequence[Sample]) -> list[str]:
    """The categories of the samples, in order of first appearance (train first, then test):
    the order in which the benchmark loaded them, i.e. the order the grid lists them in."""
    seen: dict[str, None] = {}
    for samples in splits:
        for s in samples:
            seen.setdefault(s.category, None)
    return list(seen)


def make_task(name: str, categories: Sequence[str], step: int, train: Sequence[Sample], test: Sequence[Sample]) -> Task:
    """The task of `categories`: their good training images (labelled training defects are
    not part of these protocols, as in vanilla) and their test images."""
    wanted = set(categories)
    return Task(
        name=name,
        categories=tuple(categories),
        step=int(step),
        train=tuple(s for s in train if s.category in wanted and s.label == GOOD),
        test=tuple(s for s in test if s.category in wanted),
    )


def n_steps(tasks: Sequence[Task]) -> int:
    return 1 + max((t.step for t in tasks), default=-1)


def step_training(tasks: Sequence[Task], step: int) -> list[Sample]:
    """The training images of step `step`: the union of its tasks' images, in task order."""
    return [s for t in tasks if t.step == step for s in t.train]


def tested_after(tasks: Sequence[Task], step: int) -> list[int]:
    """Indices of the tasks tested after training step `step`: those learned at or before it."""
    return [j for j, t in enumerate(tasks) if t.step <= step]


__all__ = ["Task", "categories_in_order", "make_task", "n_steps", "step_training", "tested_after"]
