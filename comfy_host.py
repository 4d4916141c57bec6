"""What the nodes use from ComfyUI when it is there, and the stand-ins used when it is not.

Everything ComfyUI-specific the nodes touch goes through here, so the node files import and run on
a bare machine (tests, the example script) and inside ComfyUI alike.
"""
import logging
import os

import torch

logger = logging.getLogger(__name__)

try:
    import folder_paths
    import comfy.model_management as model_management
    import comfy.utils as comfy_utils
    IN_COMFYUI = True
except ImportError:
    folder_paths = model_management = comfy_utils = None
    IN_COMFYUI = False

# Outside ComfyUI, model folders come from these variables (defaults: ./models/<folder>).
FOLDER_ENVIRONMENT = {"diffusion_models": "WANVIDEO_DIFFUSION_MODELS_DIR", "loras": "WANVIDEO_LORAS_DIR"}
MODEL_SUFFIXES = (".safetensors", ".sft")


def _fallback_folder(folder):
    return os.environ.get(FOLDER_ENVIRONMENT[folder], os.path.join("models", folder))


def list_model_files(folder):
    """Files ComfyUI lists for `folder` ('diffusion_models' or 'loras'), safetensors only."""
    if IN_COMFYUI:
        names = folder_paths.get_filename_list(folder)
    else:
        root = _fallback_folder(folder)
        names = sorted(os.path.relpath(os.path.join(d, f), root) for d, _, files in os.walk(root) for f in files) \
            if os.path.isdir(root) else []
    return [n for n in names if n.lower().endswith(MODEL_SUFFIXES)]


def model_file_path(folder, name):
    """Full path of a listed file; a clear error when it is gone."""
    if IN_COMFYUI:
        path = folder_paths.get_full_path(folder, name)
    else:
        path = os.path.join(_fallback_folder(folder), name)
        path = path if os.path.isfile(path) else None
    if path is None:
        raise FileNotFoundError(f"{name!r} is not in the {folder} folder. Put the file in ComfyUI's models/{folder} "
                                "folder and refresh the page (R).")
    return path


def main_device():
    if IN_COMFYUI:
        return model_management.get_torch_device()
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def offload_device():
    if IN_COMFYUI:
        return model_management.unet_offload_device()
    return torch.device("cpu")


def check_interrupt():
    """Raises ComfyUI's interruption when the user pressed cancel; nothing outside ComfyUI."""
    if IN_COMFYUI:
        model_management.throw_exception_if_processing_interrupted()


def free_memory_for_run():
    """Ask ComfyUI to unload the models it manages (text encoder, VAE) before a large run."""
    if IN_COMFYUI:
        model_management.unload_all_models()
        model_management.soft_empty_cache()


class ProgressReporter:
    """ComfyUI's progress bar with latent previews; nothing outside ComfyUI (the loop's tqdm bar shows)."""

    def __init__(self, total_steps):
        self.bar = comfy_utils.ProgressBar(total_steps) if IN_COMFYUI else None
        self.previewer = None
        if IN_COMFYUI:
            try:
                import latent_preview
                from comfy.latent_formats import Wan21
                self.previewer = latent_preview.get_previewer(main_device(), Wan21())
            except Exception as error:  # previews are a nicety; never fail a run for them
                logger.debug("No latent previews: %s", error)

    @property
    def active(self):
        return self.bar is not None

    def __call__(self, step_index, total_steps, x0):
        if self.bar is None:
            return
        preview = None
        if self.previewer is not None:
            try:
                preview = self.previewer.decode_latent_to_preview_image("JPEG", x0)
            except Exception as error:
                logger.debug("Preview failed: %s", error)
                self.previewer = None
        self.bar.update_absolute(step_index + 1, total_steps, preview)
