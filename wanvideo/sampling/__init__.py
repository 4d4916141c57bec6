"""Flow-matching schedulers and the denoising loop for Wan 2.1 (imports nothing from ComfyUI)."""
from .loop import Conditioning, make_noise, sample_video
from .schedulers import (SCHEDULERS, FlowDPMPP2MScheduler, FlowEulerScheduler, FlowScheduler, FlowUniPCScheduler,
                         flow_sigmas, make_scheduler, shift_sigmas)

__all__ = ["Conditioning", "make_noise", "sample_video", "SCHEDULERS", "FlowScheduler", "FlowEulerScheduler",
           "FlowUniPCScheduler", "FlowDPMPP2MScheduler", "flow_sigmas", "make_scheduler", "shift_sigmas"]
