"""Typed recipes: YAML validated into pydantic models that reject unknown keys.

A recipe is one readable file per experiment (BasicSR's habit), e.g.::

    name: edsr_small_x2_oneshot
    model: {name: edsr_small, scale: 2}
    data:
      train: {source: builtin, patch_size: 32, batch_size: 8}
    train: {steps: 500, lr: 2.0e-4, init_from: runs/dense/checkpoints/best.safetensors}
    sparsity: {method: oneshot, n: 2, m: 4}

``load_recipe(path, overrides=["train.steps=100"])`` applies ``a.b=value`` overrides (values are
parsed as YAML) before validation; any mistake raises :class:`RecipeError` naming the key and,
for unknown keys, the allowed ones.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializeAsAny,
    ValidationError,
    field_validator,
    model_validator,
)

from nmrestore.errors import RecipeError, SparsityError
from nmrestore.sparsity.api import NMConfig, method_config_type


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelSpec(_Strict):
    """Which network to build: ``create_model(name, scale=scale, **kwargs)``."""

    name: str = "edsr_small"
    scale: int = Field(2, ge=1, le=8)
    kwargs: dict[str, Any] = Field(default_factory=dict)


class DataSource(_Strict):
    """Where images come from: the built-in photos or a folder in a known layout."""

    source: Literal["builtin", "folder"] = "builtin"
    root: Path | None = None
    split: str | None = None  # e.g. "train" / "valid" for DIV2K
    max_images: int | None = Field(None, ge=1)

    @model_validator(mode="after")
    def _folder_needs_root(self) -> DataSource:
        if self.source == "folder" and self.root is None:
            raise ValueError("source 'folder' needs a 'root' folder")
        return self


class TrainData(DataSource):
    patch_size: int = Field(32, ge=4, description="LR patch size; the HR patch is patch_size * scale")
    batch_size: int = Field(8, ge=1, description="total over all processes")
    samples_per_epoch: int = Field(800, ge=1)
    num_workers: int = Field(0, ge=0)
    augment: bool = True


class DataSpec(_Strict):
    train: TrainData = Field(default_factory=TrainData)
    val: DataSource = Field(default_factory=lambda: DataSource(split="test"))


class Schedule(_Strict):
    kind: Literal["multistep", "cosine", "constant"] = "multistep"
    milestones: tuple[float, ...] = (0.5,)  # fractions of train.steps (or absolute steps if > 1)
    gamma: float = Field(0.5, gt=0, le=1)
    min_lr: float = Field(0.0, ge=0)


class TrainSpec(_Strict):
    steps: int = Field(1000, ge=1)
    lr: float = Field(2e-4, gt=0, le=1e30)  # beyond ~1e30 Adam's step overflows fp32
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = Field(0.0, ge=0)
    schedule: Schedule = Field(default_factory=Schedule)
    loss: Literal["l1", "mse", "charbonnier"] = "l1"
    grad_clip: float | None = Field(None, gt=0)
    val_every: int = Field(250, ge=1)
    ckpt_every: int = Field(250, ge=1)
    log_every: int = Field(25, ge=1)
    init_from: Path | None = None  # a checkpoint to start from (the dense model, for fine-tuning)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    amp: bool = False  # CUDA only
    tensorboard: bool = False
    threads: int | None = Field(None, ge=1)


class EvalSpec(_Strict):
    crop_border: int | None = Field(None, ge=0)  # None: the scale (SR protocol)
    test_y_channel: bool = True


class Recipe(_Strict):
    """One experiment: model, data, training, the sparsity method and evaluation."""

    name: str = "experiment"
    seed: int = 0
    model: ModelSpec = Field(default_factory=ModelSpec)
    data: DataSpec = Field(default_factory=DataSpec)
    train: TrainSpec = Field(default_factory=TrainSpec)
    # SerializeAsAny: dump the method's own fields, not only NMConfig's
    sparsity: SerializeAsAny[NMConfig] | None = None
    eval: EvalSpec = Field(default_factory=EvalSpec)

    @field_validator("sparsity", mode="before")
    @classmethod
    def _method_config(cls, value: Any) -> Any:
        if value is None or isinstance(value, NMConfig):
            return value
        if not isinstance(value, dict):
            raise ValueError("sparsity must be a mapping with a 'method' key")
        importlib.import_module("nmrestore.methods")  # registers every method
        method = value.get("method", "nm")
        if not isinstance(method, str):
            raise ValueError(f"sparsity.method must be a method name (a string), got {method!r}")
        try:
            config_type = method_config_type(method)
        except SparsityError as exc:
            raise ValueError(str(exc)) from exc
        try:
            return config_type.model_validate(value)
        except ValidationError as exc:
            problems = []
            for error in exc.errors():
                key = ".".join(str(p) for p in error["loc"])
                if error["type"] == "extra_forbidden":
                    allowed = ", ".join(sorted(config_type.model_fields))
                    problems.append(f"unknown key 'sparsity.{key}' for method '{method}'; allowed: {allowed}")
                else:
                    where = f"sparsity.{key}" if key else "sparsity"
                    problems.append(f"{where}: {str(error['msg']).removeprefix('Value error, ')}")
            raise ValueError("; ".join(problems)) from None

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


def _allowed_keys(model: type[BaseModel], loc: tuple[int | str, ...]) -> list[str]:
    """The field names of the sub-model that ``loc`` (minus its last element) points into."""
    current: Any = model
    for part in loc[:-1]:
        if not (isinstance(current, type) and issubclass(current, BaseModel)):
            return []
        field = current.model_fields.get(str(part))
        if field is None:
            return []
        annotation = field.annotation
        candidates = [annotation, *getattr(annotation, "__args__", ())]
        current = next((c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)), None)
    if isinstance(current, type) and issubclass(current, BaseModel):
        return sorted(current.model_fields)
    return []


def _explain(exc: ValidationError, source: str) -> RecipeError:
    messages = []
    for error in exc.errors():
        loc = tuple(p for p in error["loc"] if not (isinstance(p, str) and p.endswith("Config")))
        key = ".".join(str(p) for p in loc) or "(top level)"
        if error["type"] == "extra_forbidden":
            allowed = _allowed_keys(Recipe, loc)
            hint = f"; allowed: {', '.join(allowed)}" if allowed else ""
            messages.append(f"unknown key '{key}'{hint}")
        elif loc[:1] == ("sparsity",):
            messages.append(str(error["msg"]).removeprefix("Value error, "))
        else:
            messages.append(f"{key}: {error['msg']}")
    return RecipeError(f"{source}: " + "; ".join(messages))


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``a.b=value`` overrides (value parsed as YAML) to a nested dict, in place."""
    for item in overrides:
        if "=" not in item:
            raise RecipeError(f"override {item!r} must look like key.path=value")
        path, raw = item.split("=", 1)
        keys = path.strip().split(".")
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError as exc:
            raise RecipeError(f"override {item!r}: value is not valid YAML ({exc})") from exc
        node = data
        for key in keys[:-1]:
            child = node.get(key)
            if child is None:
                child = node[key] = {}
            if not isinstance(child, dict):
                raise RecipeError(f"override {item!r}: '{key}' is not a section")
            node = child
        node[keys[-1]] = value
    return data


def recipe_from_dict(data: dict[str, Any], source: str = "recipe") -> Recipe:
    try:
        return Recipe.model_validate(data)
    except ValidationError as exc:
        raise _explain(exc, source) from None


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> Recipe:
    """Read a YAML recipe (a file, or the name of a built-in recipe) and validate it."""
    file = resolve_recipe_path(path)
    try:
        data = yaml.safe_load(file.read_text()) or {}
    except (OSError, UnicodeDecodeError) as exc:
        raise RecipeError(f"cannot read recipe {file}: {exc}") from exc
    except yaml.YAMLError as exc:
        raise RecipeError(f"{file}: not valid YAML ({exc})") from exc
    if not isinstance(data, dict):
        raise RecipeError(f"{file}: a recipe must be a mapping of sections")
    apply_overrides(data, list(overrides or []))
    return recipe_from_dict(data, str(file))


BUILTIN_DIR = Path(__file__).resolve().parent


def builtin_recipes() -> list[str]:
    return sorted(p.stem for p in BUILTIN_DIR.glob("*.yaml"))


def resolve_recipe_path(path: str | Path) -> Path:
    """A path to a YAML file, or the name of a recipe shipped with nmrestore."""
    file = Path(path)
    if file.is_file():
        return file
    shipped = BUILTIN_DIR / f"{Path(path).stem}.yaml"
    if shipped.is_file() and file.suffix in ("", ".yaml"):
        return shipped
    raise RecipeError(f"recipe {path} not found (built-in recipes: {', '.join(builtin_recipes())})")
