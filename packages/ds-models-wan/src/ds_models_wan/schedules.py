"""Wan's flow-matching sampling schedule (a template for ``ds_models_core.flow_match_sigmas``)."""

from __future__ import annotations

from ds_models_core.schedules import FlowMatchTemplate

__all__ = ["SCHEDULES"]

SCHEDULES: dict[str, FlowMatchTemplate] = {
    # Wan-Video/Wan2.1 and Wan2.2 FlowUniPCMultistepScheduler (their default solver): its training grid
    # 1 - linspace(1, 1/1000, 1000) runs from 0.999 to 0, so set_timesteps takes linspace(0.999, 0, N+1)[:-1],
    # shifts it (5 by default; the per-release sample_shift), and appends a terminal 0 (final_sigmas_type
    # "zero"). Their "dpm++" path starts at 1.0 instead (get_sampling_sigmas); we follow the default solver.
    "wan": FlowMatchTemplate("wan", sigma_max=0.999, shift=5.0, drop_terminal=True),
}
