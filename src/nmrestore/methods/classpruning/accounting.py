"""What an image costs through the adaptive pipeline, counted against the dense network on the whole image.

ClassSR (and our earlier tables) divided the pipeline's MACs by the dense network run on the *same
patches*, which hides the patch overlap: at 32/28 patches a photograph's pixels are computed about
1.3 times. The figure this project leads with is :attr:`PipelineCost.fraction`: everything the
pipeline computes for one image -- each patch or tile on its route, overlap included, the
classifier on every window it rates, the blending of overlapping patches -- over the dense
network run once on the whole image. The per-patch figure (:attr:`PipelineCost.per_patch_fraction`)
is kept for comparison with ClassSR's numbers and is always labelled as such.

Convolutions cost the same per output pixel, so a route's MACs on any region are its MACs on one
patch scaled by the region's pixels; that is how tiles cut at the image border are counted.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, fields
from typing import Any

from nmrestore.methods.classpruning.classifier import RouteCosts


@dataclass(frozen=True)
class PipelineCost:
    """MACs of the adaptive pipeline on one image (or summed over several), by part."""

    network_macs: float  # every patch/tile on its route, overlap included
    classifier_macs: float  # the classifier on every window it rated
    stitch_macs: float  # blending overlapping patches (one multiply-add per output value)
    whole_image_dense_macs: float  # the dense network run once on the whole image
    patch_dense_macs: float  # the dense network on the pixels the pipeline computes (ClassSR's reference)
    computed_pixels: int  # LR pixels the network computed (overlap counted as often as computed)
    image_pixels: int  # LR pixels of the image(s)
    route_pixels: tuple[int, ...] = ()  # of computed_pixels, those on each route

    @property
    def total(self) -> float:
        return self.network_macs + self.classifier_macs + self.stitch_macs

    @property
    def fraction(self) -> float:
        """Whole-image MACs: the pipeline's total over the dense network run once on the whole image."""
        return self.total / self.whole_image_dense_macs if self.whole_image_dense_macs else float("nan")

    @property
    def per_patch_fraction(self) -> float:
        """ClassSR's convention: routes + classifier over the dense network on the same patches."""
        part = self.network_macs + self.classifier_macs
        return part / self.patch_dense_macs if self.patch_dense_macs else float("nan")

    @property
    def overlap(self) -> float:
        """Computed LR pixels per image pixel (1.0: every pixel once)."""
        return self.computed_pixels / self.image_pixels if self.image_pixels else float("nan")

    def to_dict(self) -> dict[str, Any]:
        return {
            **{f.name: getattr(self, f.name) for f in fields(self) if f.name != "route_pixels"},
            "route_pixels": list(self.route_pixels),
            "total_macs": self.total,
            "macs_fraction": self.fraction,
            "macs_fraction_per_patch": self.per_patch_fraction,
            "overlap": self.overlap,
        }


def pipeline_cost(
    costs: RouteCosts,
    route_pixels: Sequence[int],
    windows: int,
    whole_image_dense_macs: float,
    image_pixels: int,
    stitched_values: int = 0,
) -> PipelineCost:
    """The whole-image cost of one image through the pipeline.

    ``costs``: the routes' MACs on one ``costs.size`` patch (and the classifier's on one window of that
    size); ``route_pixels[k]``: LR pixels computed on route k (a pixel inside two overlapping patches
    counts twice); ``windows``: classifier windows rated; ``whole_image_dense_macs``: the dense network
    on the whole image; ``stitched_values``: output values accumulated by the overlap blend (patches
    x channels x HR pixels per patch; 0 when nothing is blended).
    """
    if len(route_pixels) != costs.num_routes:
        raise ValueError(f"{len(route_pixels)} pixel counts for {costs.num_routes} routes")
    area = costs.size[0] * costs.size[1]
    network = sum(p * m for p, m in zip(route_pixels, costs.route_macs, strict=True)) / area
    computed = int(sum(route_pixels))
    return PipelineCost(
        network_macs=float(network),
        classifier_macs=float(windows * costs.classifier_macs),
        stitch_macs=float(stitched_values),
        whole_image_dense_macs=float(whole_image_dense_macs),
        patch_dense_macs=float(computed * costs.dense_macs / area),
        computed_pixels=computed,
        image_pixels=int(image_pixels),
        route_pixels=tuple(int(p) for p in route_pixels),
    )


def pooled_cost(parts: Iterable[PipelineCost]) -> PipelineCost | None:
    """Several images' costs summed (fractions of the sum: images weigh by their size); None if empty."""
    items = list(parts)
    if not items:
        return None
    totals = {
        f.name: sum(getattr(p, f.name) for p in items)
        for f in fields(PipelineCost)
        if f.name != "route_pixels"
    }
    route_pixels = tuple(int(sum(v)) for v in zip(*(p.route_pixels for p in items), strict=True))
    return PipelineCost(**totals, route_pixels=route_pixels)


__all__ = ["PipelineCost", "pipeline_cost", "pooled_cost"]
