"""Qwen-Image's flow-matching sampling schedules (templates for ``ds_models_core.flow_match_sigmas``)."""

from __future__ import annotations

from ds_models_core.schedules import FlowMatchTemplate

__all__ = ["BASE_SHIFT", "MAX_SHIFT", "SCHEDULES", "SHIFT_TERMINAL"]

# Qwen/Qwen-Image scheduler/scheduler_config.json: FlowMatchEulerDiscreteScheduler with use_dynamic_shifting,
# time_shift_type "exponential", base_image_seq_len 256 -> base_shift 0.5, max_image_seq_len 8192 -> max_shift 0.9,
# shift_terminal 0.02. The pipeline passes sigmas = linspace(1, 1/N, N), that is linspace(1, 0, N + 1)[:-1], and mu
# linear in the image's token count (latent height / 2 * latent width / 2; 6889 at 1328 x 1328), so the shift is
# exp(mu); the scheduler then stretches the shifted sigmas so the last one before 0 is 0.02.
BASE_SHIFT = (256, 0.5)
MAX_SHIFT = (8192, 0.9)
SHIFT_TERMINAL = 0.02

SCHEDULES: dict[str, FlowMatchTemplate] = {
    "qwen-image": FlowMatchTemplate("qwen-image", mu_points=(BASE_SHIFT, MAX_SHIFT), shift_terminal=SHIFT_TERMINAL),
    # lightx2v/Qwen-Image-Lightning (the 4- and 8-step distilled LoRAs): its scheduler config is exponential dynamic
    # shifting with base_shift = max_shift = ln 3 and no shift_terminal, so every resolution gets the static shift 3.
    "qwen-image-lightning": FlowMatchTemplate("qwen-image-lightning", shift=3.0),
}
