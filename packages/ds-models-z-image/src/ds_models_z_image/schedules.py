"""Z-Image's flow-matching sampling schedule (a template for ``ds_models_core.flow_match_sigmas``)."""

from __future__ import annotations

from ds_models_core.schedules import FlowMatchTemplate

__all__ = ["SCHEDULES"]

SCHEDULES: dict[str, FlowMatchTemplate] = {
    # The official pipeline (Tongyi-MAI/Z-Image src/zimage/pipeline.py) sets the scheduler's sigma_min to 0, so its
    # FlowMatchEulerDiscreteScheduler (scheduler_config.json: shift 3.0, no dynamic shifting) takes
    # linspace(1, 0, N+1)[:-1], shifts it statically by 3 and appends a terminal 0. diffusers' ZImagePipeline passes
    # sigmas=linspace(1, 1/N, N) to the same scheduler config: the same grid. That is linspace(1, 0, N+1) shifted
    # (the shift keeps 0 at 0). They compute in float32, we in float64 (differences ~1e-7).
    "z-image": FlowMatchTemplate("z-image", shift=3.0),
}
