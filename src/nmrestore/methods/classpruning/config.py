"""ClassPruning's typed config: routes, classifier, labelling rule, stages, MAC target."""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field, model_validator

from nmrestore.sparsity.api import NMConfig
from nmrestore.sparsity.parametrization import GradMode

#: Attribute name of the classifier on a sparsified model.
CLASSIFIER_ATTR = "nm_route_classifier"


#: PSNR used in place of +inf (identical patches) so differences stay finite.
PSNR_CAP = 100.0


class ClassPruningConfig(NMConfig):
    """Input-adaptive N:M (``method: classpruning``): K routes over one weight tensor + a classifier.

    Routes are listed cheapest first. ``routes`` gives one uniform N per route (default 8/16/32 of
    32); ``route_budgets`` (fractions of the prunable MACs, ascending, 1.0 = dense) asks instead for
    a per-layer N per route searched by SLS (``route_search_steps`` steps per budget), made nested
    by a running maximum over the routes (``routes`` is then ignored).

    Stage A (sandwich route training) uses the recipe's ``train`` section (steps, lr, schedule).
    ``small_route_weight`` scales each smaller route's L1 + distillation: fine-tuning a trained
    dense net with every route at weight 1 lets the cheapest route (far worse at the start) pull
    the shared, highest-ranked weights its way and the full route loses more than 1 dB within a
    few dozen steps (edsr_small x2, held-out strips); at 0.3 every route ends better, the full one
    included.
    stages B (classifier) and C (joint soft routing) have their own steps and learning rates here.
    ``holdout_fraction`` of every training image (a strip at the bottom) is never trained on; it
    serves validation and the calibration of the cost shift (no selection on test images).

    ``inference`` picks the pipeline (:mod:`~nmrestore.methods.classpruning.pipeline`): ClassSR's
    overlapping ``patches`` or ``spatial`` routing, where every pixel is computed once. In spatial
    mode the per-patch MAC target is also the whole-image one; with patches the overlap comes on top.
    """

    method: Literal["classpruning"] = "classpruning"  # type: ignore[assignment]
    training_program: ClassVar[str | None] = "nmrestore.methods.classpruning.program.stages:train_adaptive"
    eval_hooks: ClassVar[str | None] = "nmrestore.methods.classpruning.program.hooks:ClassPruningHooks"
    m: int = Field(32, ge=2, le=255)
    routes: tuple[int, ...] | None = (8, 16, 32)
    grad_mode: GradMode = GradMode.HARD
    route_budgets: tuple[float, ...] | None = None
    route_search_steps: int = Field(200, ge=1)
    # classifier (ClassSR: 128 channels, three 1x1 convs, on 32x32 LR patches)
    classifier_channels: int = Field(128, ge=1)
    classifier_convs: int = Field(3, ge=0)
    patch_size: int = Field(32, ge=4, description="LR patch side at inference (and classifier training)")
    stride: int = Field(28, ge=1, description="LR stride between inference patches")
    blend: Literal["ramp", "mean"] = Field(
        "ramp", description="overlap average: border-distance weights or plain"
    )
    inference: Literal["patches", "spatial"] = Field(
        "patches",
        description="patches: ClassSR's overlapping patches, stitched; spatial: one whole-image pass, "
        "each patch_size tile on its route (no overlap; stride unused)",
    )
    # stage A
    distill_weight: float = Field(1.0, ge=0, description="L1 towards the full route's output, smaller routes")
    small_route_weight: float = Field(
        0.3, ge=0, description="stage A: weight of each smaller route's terms against the full route's L1"
    )
    refresh_every: int = Field(0, ge=0, description="stage A: recompute ranks every k steps (0: never)")
    # stage B
    labels: Literal["delta", "quantile", "budget"] = Field(
        "delta",
        description="delta: cheapest route within delta dB; quantile: ClassSR's PSNR terciles; "
        "budget: least total squared error at target_macs_fraction (Lagrangian)",
    )
    delta: float = Field(
        0.1, ge=0, description="dB: a patch's label is the cheapest route this close to the full one"
    )
    budget_weights: Literal["image", "none", "patch"] = Field(
        "image",
        description="labels: budget: weigh each patch's error by 1 / its image's MSE (the mean "
        "per-image PSNR), not at all (the PSNR of all pixels pooled), or by 1 / the patch's own "
        "full-route MSE (each patch's dB loss: the mean PSNR of tiles, as the paired intervals score)",
    )
    label_stride: int = Field(16, ge=1, description="LR stride of the labelled training patches")
    # 300 steps at 1e-3 left ClassSR's classifier at the majority label on the built-in photos
    # (budget labels, edsr_small x2); 2000 at 3e-3 reached 77% accuracy on unseen patches
    classifier_steps: int = Field(2000, ge=0)
    classifier_lr: float = Field(3e-3, gt=0)
    classifier_batch: int = Field(64, ge=1)
    # stage C
    joint_steps: int = Field(300, ge=0)
    joint_lr: float = Field(5e-5, gt=0)
    class_weight: float = Field(0.01, ge=0, description="w_c: ClassSR's class loss (pushes p to one-hot)")
    budget_weight: float = Field(0.05, ge=0, description="w_b: the budget loss")
    budget_loss: Literal["expected_macs", "equal_split"] = "expected_macs"
    target_macs_fraction: float = Field(
        0.55, gt=0, le=1, description="target average MACs / dense, classifier included"
    )
    # after training
    calibrate: bool = True
    holdout_fraction: float = Field(0.2, ge=0, lt=1)

    @model_validator(mode="after")
    def _routes_ok(self) -> ClassPruningConfig:
        if self.route_budgets is not None:
            budgets = list(self.route_budgets)
            if len(budgets) < 2:
                raise ValueError("route_budgets needs at least 2 routes")
            if any(not 0 < b <= 1 for b in budgets) or budgets != sorted(budgets):
                raise ValueError(f"route_budgets must be ascending fractions in (0, 1], got {budgets}")
        else:
            ns = list(self.route_ns())
            if len(ns) < 2:
                raise ValueError("classpruning needs at least 2 routes (e.g. routes: [8, 16, 32])")
            if ns != sorted(ns):
                raise ValueError(f"routes must be listed cheapest first (non-decreasing N), got {ns}")
        if self.stride > self.patch_size:
            raise ValueError(
                f"stride {self.stride} > patch_size {self.patch_size} would leave pixels uncovered"
            )
        return self

    def route_ns(self) -> tuple[int, ...]:
        if self.route_budgets is not None:  # placeholders until the SLS search sets per-layer N
            return (self.m,) * len(self.route_budgets)
        return super().route_ns()

    @property
    def num_routes(self) -> int:
        return len(self.route_ns())
