"""FLUX.1's flow-matching sampling schedules (templates for ``ds_models_core.flow_match_sigmas``)."""

from __future__ import annotations

from ds_models_core.schedules import FlowMatchTemplate

__all__ = ["SCHEDULES"]

SCHEDULES: dict[str, FlowMatchTemplate] = {
    # black-forest-labs/flux sampling.get_schedule: linspace(1, 0, N+1), mu from (256, 0.5) to (4096, 1.15).
    "flux.1": FlowMatchTemplate("flux.1", mu_points=((256, 0.5), (4096, 1.15))),
    # FLUX.1-schnell is sampled without the shift.
    "flux.1-schnell": FlowMatchTemplate("flux.1-schnell"),
}
