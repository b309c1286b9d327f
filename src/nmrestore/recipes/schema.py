"""Typed recipes: YAML validated into pydantic models that reject unknown keys.

A recipe is one readable file per experiment (BasicSR's habit), e.g.::

    name: edsr_small_x2_oneshot
    model: {name: edsr_small, scale: 2}
    data:
      train: {source: builtin, patch_size: 32, batch_size: 8}
    train: {steps: 500, lr: 2.0e-4, init_from: runs/dense/checkpoints/best.safetensors}
    sparsity: {method: oneshot, n: 2, m: 4}

The ``task`` section picks what is restored: ``{kind: sr}`` (the default, and what a recipe
without the section means), ``{kind: deblur, blur: {...}}`` or ``{kind: denoise, sigma: 25}``.
Deblurring and denoising default to ``model.scale: 1`` and to the RGB, no-crop metrics
(``eval: {crop_border: 0, test_y_channel: false}``); explicit values win.

``load_recipe(path, overrides=["train.steps=100"])`` applies ``a.b=value`` overrides (values are
parsed as YAML) before validation; any mistake raises :class:`RecipeError` naming the key and,
for unknown keys, the allowed ones.

Recipes are untrusted input (a file from elsewhere, or the recipe embedded in a checkpoint): YAML
is read under size, depth and alias limits with duplicate keys refused
(:mod:`nmrestore.recipes.yaml_safe`), counts are strict integers with upper bounds (``steps:
true`` or ``1e29`` are not a number of steps), floats are finite, and ``name`` is one plain path
component, since it names the run folder.
"""

from __future__ import annotations

import importlib
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializeAsAny,
    SerializerFunctionWrapHandler,
    ValidationError,
    field_validator,
    model_serializer,
    model_validator,
)

from nmrestore.data.degradations import Degradation, GaussianNoise, MotionBlur
from nmrestore.errors import RecipeError, SparsityError, short_repr
from nmrestore.recipes.yaml_safe import MAX_BYTES, load_yaml
from nmrestore.sparsity.api import NMConfig, method_config_type

#: Upper bound of step counts and intervals: 10**9 steps is decades of training.
MAX_STEPS = 10**9
#: DataLoader worker processes (a constant, not this machine's core count: a recipe must mean the
#: same everywhere; each worker is a process holding a copy of the dataset).
MAX_WORKERS = 32
#: What a run's ``name`` may be: one plain path component (it names the run folder).
_PLAIN_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.:+=,@-]{0,127}")


def _count(default: int | None, ge: int, le: int, **kw: Any) -> Any:
    """A strict integer field: booleans, floats and strings are refused, not coerced."""
    return Field(default, ge=ge, le=le, strict=True, **kw)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class ModelSpec(_Strict):
    """Which network to build: ``create_model(name, scale=scale, **kwargs)``."""

    name: str = Field("edsr_small", max_length=128)
    scale: int = _count(2, 1, 8)
    kwargs: dict[str, Any] = Field(default_factory=dict)

    @field_validator("kwargs")
    @classmethod
    def _no_scale_in_kwargs(cls, value: dict[str, Any]) -> dict[str, Any]:
        if "scale" in value:
            raise ValueError("the scale is model.scale, not a model.kwargs entry")
        return value


class DataSource(_Strict):
    """Where images come from: the built-in photos or a folder in a known layout."""

    source: Literal["builtin", "folder"] = "builtin"
    root: Path | None = None
    split: str | None = Field(None, max_length=128)  # e.g. "train" / "valid" for DIV2K
    max_images: int | None = _count(None, 1, MAX_STEPS)

    @model_validator(mode="after")
    def _folder_needs_root(self) -> DataSource:
        if self.source == "folder" and self.root is None:
            raise ValueError("source 'folder' needs a 'root' folder")
        return self


class TrainData(DataSource):
    patch_size: int = _count(32, 4, 4096, description="LR patch size; the HR patch is patch_size * scale")
    batch_size: int = _count(8, 1, 65536, description="total over all processes")
    samples_per_epoch: int = _count(800, 1, MAX_STEPS)
    num_workers: int = _count(0, 0, MAX_WORKERS)
    augment: bool = True


class ValData(DataSource):
    """A validation set of its own. ``test_data: true`` states that it is the test data (e.g. the
    built-in ``test`` split): validation then picks checkpoints on the images that are scored."""

    test_data: bool = False

    @model_validator(mode="after")
    def _test_split_is_declared(self) -> ValData:
        if self.split is not None and self.split.lower() == "test" and not self.test_data:
            raise ValueError(
                "validation on the 'test' split picks checkpoints on the test images; leave data.val out "
                "(a held-out part of the training images is used), name a val/valid split, or set "
                "data.val.test_data: true to do it knowingly"
            )
        return self


class DataSpec(_Strict):
    """Training data and validation data. Without ``val``, the bottom ``holdout`` of every training
    image is kept out of training and validated on: nothing validated on is trained on or tested on."""

    train: TrainData = Field(default_factory=TrainData)
    val: ValData | None = None
    holdout: float = Field(0.1, ge=0, le=0.5, description="fraction of each training image's height held out")

    @model_validator(mode="after")
    def _something_to_validate_on(self) -> DataSpec:
        if self.val is None and self.holdout == 0:
            raise ValueError("data.holdout is 0 and there is no data.val: nothing to validate on")
        return self


class Schedule(_Strict):
    kind: Literal["multistep", "cosine", "constant"] = "multistep"
    milestones: tuple[Annotated[float, Field(ge=0)], ...] = Field((0.5,), max_length=1000)  # fractions of train.steps (or absolute steps if > 1)
    gamma: float = Field(0.5, gt=0, le=1)
    min_lr: float = Field(0.0, ge=0)


class TrainSpec(_Strict):
    steps: int = _count(1000, 1, MAX_STEPS)
    lr: float = Field(2e-4, gt=0, le=1e30)  # beyond ~1e30 Adam's step overflows fp32
    betas: tuple[Annotated[float, Field(ge=0, lt=1)], Annotated[float, Field(ge=0, lt=1)]] = (0.9, 0.999)
    weight_decay: float = Field(0.0, ge=0)
    schedule: Schedule = Field(default_factory=Schedule)
    loss: Literal["l1", "mse", "charbonnier"] = "l1"
    grad_clip: float | None = Field(None, gt=0)
    val_every: int = _count(250, 1, MAX_STEPS)
    ckpt_every: int = _count(250, 1, MAX_STEPS)
    log_every: int = _count(25, 1, MAX_STEPS)
    init_from: Path | None = None  # a checkpoint to start from (the dense model, for fine-tuning)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    amp: bool = False  # CUDA only
    tensorboard: bool = False
    threads: int | None = _count(None, 1, 1024)


class EvalSpec(_Strict):
    crop_border: int | None = _count(None, 0, 1024)  # None: the scale (SR protocol)
    test_y_channel: bool = True


class BlurSpec(_Strict):
    """Synthetic motion blur (see :class:`nmrestore.data.degradations.MotionBlur`): one random kernel per sample."""

    kernel_size: int = _count(17, 3, 63, description="odd; the kernel is kernel_size x kernel_size")
    trajectory: Literal["random_walk", "line"] = "random_walk"
    length: tuple[float, float] = Field(
        (0.3, 1.0), description="range of the path length, as a fraction of kernel_size - 1"
    )

    @model_validator(mode="after")
    def _check(self) -> BlurSpec:
        if self.kernel_size % 2 == 0:
            raise ValueError(f"blur.kernel_size must be odd, got {self.kernel_size}")
        low, high = self.length
        if not 0 <= low <= high <= 1:
            raise ValueError(f"blur.length must satisfy 0 <= min <= max <= 1, got {list(self.length)}")
        return self

    def degradation(self) -> MotionBlur:
        return MotionBlur(self.kernel_size, self.trajectory, self.length[0], self.length[1])


#: A PNG task name that is a noise level: ``sigma25``, ``s25`` or ``25``.
_NOISE_TASK = re.compile(r"(?:sigma|s)?(\d+(?:\.\d+)?)", re.IGNORECASE)


class TaskSpec(_Strict):
    """What is restored. ``sigma`` (0..255 scale) is for denoising, ``blur`` for deblurring only.

    Inputs are made from the clean images by this degradation when the data source has none of its
    own (built-in photos, HR-only folders); paired sources (GoPro, ``lq/`` + ``gt/``) are used as they are.
    """

    kind: Literal["sr", "deblur", "denoise"] = "sr"
    sigma: float | None = Field(None, gt=0, le=255, description="denoise: noise std on the 0..255 scale (25)")
    blur: BlurSpec | None = Field(None, description="deblur: the synthetic motion blur")

    @model_validator(mode="before")
    @classmethod
    def _defaults(cls, value: Any) -> Any:
        if isinstance(value, dict):
            value = dict(value)
            if value.get("kind") == "denoise" and value.get("sigma") is None:
                value["sigma"] = 25.0
            if value.get("kind") == "deblur" and value.get("blur") is None:
                value["blur"] = {}
        return value

    @model_validator(mode="after")
    def _fields_match_kind(self) -> TaskSpec:
        if self.sigma is not None and self.kind != "denoise":
            raise ValueError(f"task.sigma is for kind 'denoise', not {self.kind!r}")
        if self.blur is not None and self.kind != "deblur":
            raise ValueError(f"task.blur is for kind 'deblur', not {self.kind!r}")
        return self

    @property
    def restoration(self) -> bool:
        """True for deblurring and denoising (scale 1, RGB metrics without a border crop)."""
        return self.kind != "sr"

    def degradation(self) -> Degradation | None:
        """The synthetic degradation of this task (None for SR, whose inputs are bicubic LR)."""
        if self.kind == "denoise":
            assert self.sigma is not None
            return GaussianNoise(float(self.sigma))
        if self.kind == "deblur":
            assert self.blur is not None
            return self.blur.degradation()
        return None

    def for_png_task(self, name: str) -> TaskSpec:
        """This task as PNG task ``name`` sees it: a denoising task named ``sigma15`` denoises sigma 15."""
        if self.kind != "denoise":
            return self
        sigma = noise_task_sigma(name)
        if sigma is None:
            raise RecipeError(
                f"PNG task {short_repr(name)} of a denoising recipe must name its noise level (e.g. sigma15, sigma25)"
            )
        return self.model_copy(update={"sigma": sigma})


def noise_task_sigma(name: str) -> float | None:
    """The noise level a PNG task name stands for (``sigma25`` -> 25.0), None if it names none."""
    match = _NOISE_TASK.fullmatch(name.strip())
    if match is None:
        return None
    sigma = float(match.group(1))
    return sigma if 0 < sigma <= 255 else None


class Recipe(_Strict):
    """One experiment: model, data, training, the sparsity method and evaluation."""

    name: str = "experiment"
    seed: int = _count(0, 0, 2**31 - 1)  # numpy seeds must be below 2**32, and each rank adds its own

    task: TaskSpec = Field(default_factory=TaskSpec)
    model: ModelSpec = Field(default_factory=ModelSpec)
    data: DataSpec = Field(default_factory=DataSpec)
    train: TrainSpec = Field(default_factory=TrainSpec)
    # SerializeAsAny: dump the method's own fields, not only NMConfig's
    sparsity: SerializeAsAny[NMConfig] | None = None
    eval: EvalSpec = Field(default_factory=EvalSpec)

    @field_validator("name")
    @classmethod
    def _plain_name(cls, value: str) -> str:
        # the run folder is runs/<name>: one path component, never "..", "/x" or "a/../../b"
        if not _PLAIN_NAME.fullmatch(value):
            raise ValueError(
                f"must be a plain name (letters, digits and _ . : + = , @ -, not starting with '.' or '-', "
                f"at most 128 characters), got {short_repr(value, 60)}"
            )
        return value
    @model_validator(mode="before")
    @classmethod
    def _task_defaults(cls, value: Any) -> Any:
        """Deblurring/denoising: scale 1 and RGB metrics without a crop, unless the recipe says otherwise.

        Filled in before validation, so the saved recipe states them and a reloaded one matches.
        """
        if not isinstance(value, dict):
            return value
        task = value.get("task")
        kind = task.get("kind") if isinstance(task, dict) else getattr(task, "kind", None)
        if kind not in ("deblur", "denoise"):
            return value
        value = dict(value)
        for key, defaults in (("model", {"scale": 1}), ("eval", {"crop_border": 0, "test_y_channel": False})):
            section = value.get(key)
            if section is None:
                value[key] = dict(defaults)
            elif isinstance(section, dict):
                value[key] = {**defaults, **section}
        return value

    @model_validator(mode="after")
    def _task_consistent(self) -> Recipe:
        if self.task.restoration and self.model.scale != 1:
            raise ValueError(f"task '{self.task.kind}' needs model.scale 1, got {self.model.scale}")
        if self.task.kind == "denoise" and self.sparsity is not None and self.sparsity.method == "png":
            for name in getattr(self.sparsity, "tasks", None) or ():
                if noise_task_sigma(name) is None:
                    raise ValueError(
                        f"PNG task {short_repr(name)} of a denoising recipe must name its noise level (e.g. sigma15)"
                    )
        return self

    @model_serializer(mode="wrap")
    def _omit_sr_task(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        """Leave the default ``task: {kind: sr}`` out of dumps: SR recipes (and the checkpoints and
        benchmark-cache hashes made from them) stay byte-identical to those written before tasks existed."""
        data = handler(self)
        if isinstance(data, dict) and self.task == TaskSpec():
            data.pop("task", None)
        return data

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
            raise ValueError(f"sparsity.method must be a method name (a string), got {short_repr(method)}")
        try:
            config_type = method_config_type(method)
        except SparsityError as exc:
            raise ValueError(str(exc)) from exc
        try:
            return config_type.model_validate(value)
        except ValidationError as exc:
            problems = []
            for error in exc.errors():
                key = _key(error["loc"])
                if error["type"] == "extra_forbidden":
                    allowed = ", ".join(sorted(config_type.model_fields))
                    problems.append(f"unknown key 'sparsity.{key}' for method '{method}'; allowed: {allowed}")
                else:
                    where = f"sparsity.{key}" if key else "sparsity"
                    problems.append(f"{where}: {_msg(error)}")
            raise ValueError(_join(problems)) from None

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


def _key(loc: tuple[int | str, ...]) -> str:
    """A dotted key path, each part cut short: keys come from the file and may be huge."""
    return ".".join(str(p) if len(str(p)) <= 40 else str(p)[:37] + "..." for p in loc[:8])


def _msg(error: Any) -> str:
    return str(error["msg"]).removeprefix("Value error, ")[:300]


def _join(messages: list[str], most: int = 5) -> str:
    """At most ``most`` problems, so a file with thousands of mistakes still gives one short line."""
    text = "; ".join(messages[:most])
    return text + (f"; and {len(messages) - most} more" if len(messages) > most else "")


def _explain(exc: ValidationError, source: str) -> RecipeError:
    messages = []
    for error in exc.errors():
        loc = tuple(p for p in error["loc"] if not (isinstance(p, str) and p.endswith("Config")))
        key = _key(loc) or "(top level)"
        if error["type"] == "extra_forbidden":
            allowed = _allowed_keys(Recipe, loc)
            hint = f"; allowed: {', '.join(allowed)}" if allowed else ""
            messages.append(f"unknown key '{key}'{hint}")
        elif loc[:1] == ("sparsity",):
            messages.append(_msg(error))
        else:
            messages.append(f"{key}: {_msg(error)}")
    return RecipeError(f"{source}: " + _join(messages))


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``a.b=value`` overrides (value parsed as YAML) to a nested dict, in place."""
    for item in overrides:
        if "=" not in item:
            raise RecipeError(f"override {short_repr(item)} must look like key.path=value")
        path, raw = item.split("=", 1)
        keys = path.strip().split(".")
        value = load_yaml(raw, f"override {short_repr(item)}: value")
        node = data
        for key in keys[:-1]:
            child = node.get(key)
            if child is None:
                child = node[key] = {}
            if not isinstance(child, dict):
                raise RecipeError(f"override {short_repr(item)}: {short_repr(key, 40)} is not a section")
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
        with open(file, "rb") as f:
            text = f.read(MAX_BYTES + 1)  # never more than the limit, whatever the file's size
    except OSError as exc:
        raise RecipeError(f"cannot read recipe {file}: {exc}") from exc
    data = load_yaml(text, str(file))
    if data is None or data == {}:
        # an empty file used to mean "every default": 1000 steps of edsr_small nobody asked for
        raise RecipeError(f"{file}: the recipe is empty; give at least a name and a model")
    if not isinstance(data, dict):
        raise RecipeError(f"{file}: a recipe must be a mapping of sections, not a {type(data).__name__}")
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
