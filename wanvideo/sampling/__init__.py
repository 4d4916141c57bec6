"""Flow-matching schedulers and the denoising loop for Wan 2.1 (imports nothing from ComfyUI)."""
from .experts import EXPERTS, HIGH_NOISE, I2V_BOUNDARY, LOW_NOISE, T2V_BOUNDARY, ExpertPair, official_boundary
from .loop import Conditioning, Inpaint, make_noise, sample_video
from .schedulers import (SCHEDULERS, FlowDPMPP2MScheduler, FlowEulerScheduler, FlowScheduler, FlowUniPCScheduler,
                         flow_sigmas, make_scheduler, shift_sigmas)

__all__ = ["Conditioning", "Inpaint", "make_noise", "sample_video", "SCHEDULERS", "FlowScheduler", "FlowEulerScheduler",
           "FlowUniPCScheduler", "FlowDPMPP2MScheduler", "flow_sigmas", "make_scheduler", "shift_sigmas",
           "ExpertPair", "EXPERTS", "HIGH_NOISE", "LOW_NOISE", "T2V_BOUNDARY", "I2V_BOUNDARY", "official_boundary"]
