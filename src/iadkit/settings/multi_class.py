"""The multi-class ("unified") setting: one model for all of a plant's products.

paper -> reference code -> ours
-------------------------------
- UniAD (You et al., NeurIPS 2022) and ADer's benchmark: one model trained on the union of
  the good training images of every category, tested on each category's test set, metrics
  per category and their mean; ADer summarises the seven metrics (I-AUROC, I-AP, I-F1max,
  P-AUROC, P-AP, P-F1max, AUPRO) by their mean, mAD -> a task plan (`iadkit.settings.tasks`)
  with one task per category, all learned at step 0: the benchmark fits the model once on
  the union and evaluates it per category; `iadkit.metrics.unified.mad` gives the mAD.
- Any method runs here without knowing (PatchCore then keeps one bank for every product);
  a method built for it declares ``multi_class = True`` (UniAD). The report puts the unified
  model beside the same method trained per category (vanilla cells of the same grid).
- Labelled training defects are dropped, as in vanilla; a zero-shot method is refused.
"""

from __future__ import annotations

from collections.abc import Sequence

from iadkit.settings import SettingError, register_setting
from iadkit.settings.tasks import Task, categories_in_order, make_task
from iadkit.types import Sample


@register_setting("multi_class", kind="tasks")
def multi_class(train: Sequence[Sample], test: Sequence[Sample], *, seed: int) -> list[Task]:
    """One task per category, all learned together (step 0): one model on the union.

    Parameters
    ----------
    train, test : sequences of Sample
        Several categories' samples (`Sample.category`).
    seed : int
        Unused (the protocol draws nothing); kept for the settings' signature.
    """
    categories = categories_in_order(train, test)
    if not categories:  # checking the parameters on an empty split (grid validation)
        return []
    if len(categories) < 2:
        raise SettingError(
            f"setting 'multi_class' needs at least two categories, got {categories[0]!r}; "
            "list two or more categories for the dataset in the grid (one category is the vanilla setting)"
        )
    return [make_task(c, [c], 0, train, test) for c in categories]


__all__ = ["multi_class"]
