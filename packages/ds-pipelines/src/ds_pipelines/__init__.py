"""ds-pipelines: from prompt to pixels, and the sampling math that training shares."""

from .schedulers import FLOW_MATCH_TEMPLATES, FlowMatchScheduler, FlowMatchTemplate, shift_sigmas

__all__ = ["FLOW_MATCH_TEMPLATES", "FlowMatchScheduler", "FlowMatchTemplate", "shift_sigmas"]
