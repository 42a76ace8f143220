"""Benchmark configuration: the grid, read from YAML or TOML, and its expansion into cells.

A config file (YAML shown; TOML has the same keys)::

    name: my-bench
    methods:                       # a name, or a table with hyper-parameters
      - padim
      - name: patchcore
        image_size: 224            # default: the top-level image_size
        image_size_for: {elpv: 128}   # per dataset scheme (the part before ':')
        params: {coreset_ratio: 0.1}
    datasets:
      - source: synthetic:./synth  # any iadkit.data.load_dataset source
        categories: [fabric, tile] # omit for every category of the source
      - source: elpv
        categories: [mono, poly, all]
        subsample: {train: 100, test: 120}   # optional, for quick runs; labelled in results
      - source: mvtec:/data/my_parts
        options: {allow_missing_masks: true} # passed to the dataset reader (load_dataset)
    settings:                      # one cell per entry and value (see SettingSpec)
      - vanilla
      - {few_shot: {k: [1, 2, 4, 8]}}
      - {noisy: {ratio: [0.05, 0.1]}}
      - {name: semi_supervised, params: {k: 4}}
      - continual                  # tasks settings: one cell per dataset, over its categories
      - {continual: {split: "3+1+1"}}   # in the order listed (class-incremental groups)
      - multi_class                # one model on the union of the categories
    seeds: [0]
    image_size: 224
    device: auto                   # cpu | cuda | auto
    gallery_size: 3                # overlays kept per cell: top defects and worst false alarms
    imports: []                    # modules to import first (private methods, settings, sources)

A cell is one (method + hyper-parameters, dataset, category, setting, seed, image size).
Its identity is a hash of exactly these, so a rerun recognises finished cells, and
changing any of them makes a new cell instead of silently reusing an old result. A setting
of kind "tasks" (continual, multi_class) spans the dataset's categories: its cell's
`category` is the categories in order, joined by ","  (`Cell.categories`).
"""

from __future__ import annotations

import hashlib
import json
import tomllib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml  # type: ignore[import-untyped]  # PyYAML ships no type hints (stubs: types-PyYAML)
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from iadkit.errors import IadkitError

Size = int | tuple[int, int]


class BenchConfigError(IadkitError, ValueError):
    """A benchmark configuration file or preset is missing, unreadable or invalid."""


def _size(v: Any) -> tuple[int, int]:
    if isinstance(v, int):
        return (v, v)
    h, w = v
    return (int(h), int(w))


class MethodSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str
    params: dict[str, Any] = Field(default_factory=dict)
    image_size: Size | None = None
    image_size_for: dict[str, Size] = Field(default_factory=dict)

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, v: Any) -> Any:
        return {"name": v} if isinstance(v, str) else v


class SubsampleSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    train: int | None = Field(default=None, ge=1)
    test: int | None = Field(default=None, ge=2)


class DatasetSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    source: str
    categories: list[str] | None = None
    subsample: SubsampleSpec | None = None
    options: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, v: Any) -> Any:
        return {"source": v} if isinstance(v, str) else v

    @field_validator("categories", mode="before")
    @classmethod
    def _one_category(cls, v: Any) -> Any:
        if v == "*":
            return None
        return [v] if isinstance(v, str) else v

    @property
    def scheme(self) -> str:
        return self.source.partition(":")[0]


class SettingSpec(BaseModel):
    """One entry of `settings`: ``vanilla``, ``{name: few_shot, params: {k: 4}}``, or the
    short form ``{few_shot: {k: [1, 2, 4, 8]}}``. A list of values sweeps: one cell per value
    (several lists: every combination). A parameter that itself takes a list (few_shot's
    `augmentations`) sweeps only over a list of lists."""

    model_config = ConfigDict(extra="forbid")
    name: str = "vanilla"
    params: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, v: Any) -> Any:
        if isinstance(v, str):
            return {"name": v}
        if isinstance(v, dict) and len(v) == 1 and not {"name", "params"} & set(v):
            ((name, params),) = v.items()
            return {"name": name, "params": {} if params is None else params}
        return v

    def variants(self) -> list[dict[str, Any]]:
        """The concrete parameter sets of this entry (its sweeps expanded, in the order given)."""
        import itertools

        from iadkit.settings import sequence_parameters

        takes_lists = sequence_parameters(self.name)
        axes: list[list[Any]] = []
        for key, value in self.params.items():
            sweep = isinstance(value, list) and (key not in takes_lists or all(isinstance(x, list) for x in value))
            if sweep and not value:
                raise BenchConfigError(f"setting {self.name!r}: {key} lists no value to sweep over")
            axes.append(value if sweep else [value])
        return [dict(zip(self.params, combo)) for combo in itertools.product(*axes)]


class BenchConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = "benchmark"
    methods: list[MethodSpec] = Field(min_length=1)
    datasets: list[DatasetSpec] = Field(min_length=1)
    settings: list[SettingSpec] = Field(default_factory=lambda: [SettingSpec()])
    seeds: list[int] = Field(default_factory=lambda: [0], min_length=1)
    image_size: Size = 224
    batch_size: int = Field(default=16, ge=1)
    device: str = "auto"
    gallery_size: int = Field(default=3, ge=0)
    imports: list[str] = Field(default_factory=list)
    description: str = ""

    @classmethod
    def load(cls, path: str | Path) -> BenchConfig:
        path = Path(path)
        if not path.is_file():
            raise BenchConfigError(f"{path}: no such benchmark config file")
        text = path.read_text(encoding="utf-8")
        try:
            if path.suffix.lower() == ".toml":
                data = tomllib.loads(text)
            elif path.suffix.lower() in (".yaml", ".yml", ".json"):
                data = yaml.safe_load(text)
            else:
                raise BenchConfigError(f"{path}: unknown config format {path.suffix!r}; use .yaml, .yml or .toml")
        except (yaml.YAMLError, tomllib.TOMLDecodeError) as exc:
            raise BenchConfigError(f"{path}: cannot parse: {exc}") from exc
        return cls.parse(data, origin=str(path))

    @classmethod
    def parse(cls, data: Any, origin: str = "config") -> BenchConfig:
        if not isinstance(data, dict):
            raise BenchConfigError(
                f"{origin}: expected a table of keys (methods, datasets, ...), got {type(data).__name__}"
            )
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            lines = [f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors()]
            raise BenchConfigError(f"{origin}: invalid benchmark config:\n  " + "\n  ".join(lines)) from None


def canonical_json(obj: Any) -> str:
    """Key-sorted compact JSON: equal values always give equal text (and equal hashes)."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=_json_default)


def _json_default(o: Any) -> Any:
    if isinstance(o, tuple):
        return list(o)
    if hasattr(o, "item"):  # numpy scalars
        return o.item()
    raise TypeError(f"{type(o).__name__} is not JSON-serialisable")


TASKS_SEPARATOR = ","
"""Joins the categories of a tasks cell (continual, multi_class) into its `category`."""


@dataclass(frozen=True)
class Cell:
    """One fit-and-evaluate job. Everything a worker needs, and nothing that is not data."""

    method: str
    params: dict[str, Any]
    dataset: str
    category: str
    setting: str
    seed: int
    image_size: tuple[int, int]
    setting_params: dict[str, Any] = field(default_factory=dict)
    subsample: dict[str, int | None] | None = None
    dataset_options: dict[str, Any] = field(default_factory=dict)
    batch_size: int = 16
    device: str = "auto"
    gallery_size: int = 3
    imports: tuple[str, ...] = ()

    def identity(self) -> dict[str, Any]:
        """What makes two cells the same experiment (batch size, device, gallery do not).
        Dataset reader options count only when given, so older cells keep their ids."""
        extra = {"dataset_options": self.dataset_options} if self.dataset_options else {}
        return {
            **extra,
            "method": self.method,
            "params": self.params,
            "dataset": self.dataset,
            "subsample": self.subsample,
            "category": self.category,
            "setting": self.setting,
            "setting_params": self.setting_params,
            "seed": self.seed,
            "image_size": list(self.image_size),
        }

    @property
    def cell_id(self) -> str:
        return hashlib.sha256(canonical_json(self.identity()).encode()).hexdigest()[:16]

    @property
    def dataset_label(self) -> str:
        """Display name; a subsample says so, so nobody mistakes it for the full protocol."""
        if not self.subsample:
            return self.dataset
        parts = [f"{k}≤{v}" for k, v in sorted(self.subsample.items()) if v is not None]
        return f"{self.dataset} (subsample {', '.join(parts)})" if parts else self.dataset

    @property
    def setting_label(self) -> str:
        if not self.setting_params:
            return self.setting
        return self.setting + "(" + ",".join(f"{k}={v}" for k, v in sorted(self.setting_params.items())) + ")"

    @property
    def categories(self) -> list[str]:
        """The categories the cell uses: one, or several in order for a tasks setting."""
        return self.category.split(TASKS_SEPARATOR)

    def describe(self) -> str:
        return f"{self.method} · {self.dataset_label}/{self.category} · {self.setting_label} · seed {self.seed}"

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["image_size"] = list(self.image_size)
        d["imports"] = list(self.imports)
        return d


def expand(config: BenchConfig) -> list[Cell]:
    """Every cell of the grid, ordered dataset -> category -> setting -> seed -> method.

    That order keeps one category's data hot while every method runs on it, and fills the
    leaderboard row by row. Settings of kind "tasks" (continual, multi_class) come after
    a dataset's per-category cells: one cell per (setting, seed, method) over all the
    dataset's categories, in the order listed.
    """
    from iadkit.bench.datasets import list_source_categories
    from iadkit.settings import get_setting, setting_kind

    import_modules(config.imports)
    settings: list[tuple[str, dict[str, Any]]] = []
    for s in config.settings:
        get_setting(s.name)  # fail before any work on a typo
        for params in s.variants():
            _check_setting_params(s.name, params)
            settings.append((s.name, params))
    per_category = [(n, p) for n, p in settings if setting_kind(n) == "split"]
    spanning = [(n, p) for n, p in settings if setting_kind(n) == "tasks"]
    cells: list[Cell] = []
    for ds in config.datasets:
        categories = ds.categories if ds.categories is not None else list_source_categories(ds.source)
        if not categories:
            raise BenchConfigError(f"dataset {ds.source!r} has no categories")
        groups = [(c, per_category) for c in categories]
        if spanning:
            bad = [c for c in categories if TASKS_SEPARATOR in c]
            if bad:
                raise BenchConfigError(
                    f"dataset {ds.source!r}: category {bad[0]!r} contains {TASKS_SEPARATOR!r}, which the tasks "
                    "settings (continual, multi_class) use to join categories; rename it"
                )
            groups.append((TASKS_SEPARATOR.join(categories), spanning))
        for category, group_settings in groups:
            for setting, setting_params in group_settings:
                for seed in config.seeds:
                    for m in config.methods:
                        size = m.image_size_for.get(
                            ds.scheme, m.image_size if m.image_size is not None else config.image_size
                        )
                        cells.append(
                            Cell(
                                method=m.name,
                                params=dict(m.params),
                                dataset=ds.source,
                                category=category,
                                setting=setting,
                                setting_params=dict(setting_params),
                                seed=int(seed),
                                image_size=_size(size),
                                subsample=ds.subsample.model_dump() if ds.subsample else None,
                                dataset_options=dict(ds.options),
                                batch_size=config.batch_size,
                                device=config.device,
                                gallery_size=config.gallery_size,
                                imports=tuple(config.imports),
                            )
                        )
    ids = [c.cell_id for c in cells]
    if len(set(ids)) != len(ids):
        raise BenchConfigError(
            "the grid lists the same cell twice (same method, parameters, data, setting, seed and size)"
        )
    return cells


def _check_setting_params(name: str, params: dict[str, Any]) -> None:
    """Run the setting on an empty split, so that a wrong parameter (a typo, k=0) fails
    before any cell runs. Only the setting's own refusals count: a plugin that cannot take
    an empty split is left to fail in its cells."""
    from iadkit.settings import SettingError, apply_setting, apply_task_setting, setting_kind

    try:
        if setting_kind(name) == "tasks":
            apply_task_setting(name, [], [], seed=0, params=params)
        else:
            apply_setting(name, [], [], seed=0, params=params)
    except SettingError as exc:
        raise BenchConfigError(f"settings: {exc}") from None
    except Exception:
        pass


def import_modules(names: list[str] | tuple[str, ...]) -> None:
    """Import plugin modules (they register methods, settings or dataset sources)."""
    from importlib import import_module

    for name in names:
        try:
            import_module(name)
        except ImportError as exc:
            raise BenchConfigError(f"cannot import {name!r} listed in the benchmark's imports: {exc}") from exc
