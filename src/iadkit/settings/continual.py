"""The continual setting: a line changes products over time, and the model must learn each
new product without forgetting the old ones.

paper -> reference code -> ours
-------------------------------
- IM-IAD (FIELD.md section 5): train sequentially on tasks (categories) in order; after
  training task i, test on every task j <= i; report the final per-task metrics and the
  forgetting measure FM for every metric -> open-iad ``paradigms/centralized/c2d.py``: one
  data loader per task, ``train_model(loader, task_id)`` then ``prediction(loader, j)`` for
  j <= task_id -> a task plan (`iadkit.settings.tasks`): the categories in the order the grid
  lists them, one task each; the benchmark fills the accuracy matrix a[l][j] for every
  metric and derives FM with `iadkit.metrics.continual`.
- DNE's class-incremental splits (``dne.yaml``: "mul: 3+3+3+3+3", "one: 10+1+1+1+1+1") ->
  ``split="3+1+1"``: the first 3 categories form task 0 (learned together, tested on the
  union of their test sets), then one category per task. The sizes must add up to the
  number of categories.
- Labelled training defects are dropped (vanilla protocol within each task).

How a method learns the sequence is the method's business: a continual method
(``continual = True``) gets `partial_fit` for each new task; any other method is trained
task after task from its previous state (``fit(warm_start=True)``: naive sequential
fine-tuning, the forgetting baseline); a zero-shot method is refused (it learns nothing).
"""

from __future__ import annotations

from collections.abc import Sequence

from iadkit.settings import SettingError, register_setting
from iadkit.settings.tasks import Task, categories_in_order, make_task
from iadkit.types import Sample


def parse_split(split: str | None) -> list[int] | None:
    """``"3+1+1"`` -> [3, 1, 1]; None -> None (one category per task)."""
    if split is None:
        return None
    if isinstance(split, int) and not isinstance(split, bool):
        split = str(split)
    if not isinstance(split, str) or not split.strip():
        raise SettingError(
            f"setting 'continual': split must be task sizes joined by '+', e.g. \"3+1+1\", got {split!r}"
        )
    sizes = []
    for part in split.split("+"):
        part = part.strip()
        if not part.isdigit() or int(part) < 1:
            raise SettingError(
                f"setting 'continual': split {split!r} must be positive task sizes joined by '+', e.g. \"3+1+1\""
            )
        sizes.append(int(part))
    return sizes


@register_setting("continual", kind="tasks")
def continual(train: Sequence[Sample], test: Sequence[Sample], *, seed: int, split: str | None = None) -> list[Task]:
    """The categories of the split, in order, as a sequence of tasks learned one after the other.

    Parameters
    ----------
    train, test : sequences of Sample
        Several categories' samples (`Sample.category`), in the order the tasks come.
    seed : int
        Unused (the protocol draws nothing); kept for the settings' signature.
    split : str, optional
        Class-incremental task sizes, e.g. "3+1+1" (DNE's config); default one category per
        task. The sizes must add up to the number of categories.
    """
    sizes = parse_split(split)
    categories = categories_in_order(train, test)
    if not categories:  # checking the parameters on an empty split (grid validation)
        return []
    sizes = sizes or [1] * len(categories)
    if sum(sizes) != len(categories):
        raise SettingError(
            f"setting 'continual': split {split!r} groups {sum(sizes)} categories, but the dataset lists "
            f"{len(categories)} ({', '.join(categories)}); make the sizes add up to {len(categories)}"
        )
    if len(sizes) < 2:
        raise SettingError(
            f"setting 'continual' needs at least two tasks, got one ({', '.join(categories)}); "
            "list two or more categories for the dataset in the grid"
        )
    tasks, start = [], 0
    for step, size in enumerate(sizes):
        group = categories[start : start + size]
        start += size
        tasks.append(make_task("+".join(group), group, step, train, test))
    return tasks


__all__ = ["continual", "parse_split"]
