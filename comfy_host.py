"""What the nodes use from ComfyUI when it is there, and the stand-ins used when it is not.

Everything ComfyUI-specific the nodes touch goes through here, so the node files import and run on
a bare machine (tests, the example script) and inside ComfyUI alike. This is the only file that
imports ComfyUI.
"""
import inspect
import logging
import os
import weakref

import torch

from .wanvideo import api

logger = logging.getLogger(__name__)

try:
    import folder_paths
    import comfy.model_management as model_management
    import comfy.model_patcher as model_patcher
    import comfy.utils as comfy_utils
    IN_COMFYUI = True
except ImportError:
    folder_paths = model_management = model_patcher = comfy_utils = None
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
    """Ask ComfyUI to unload the models it manages (text encoder, VAE) before a large load (the
    loaders call it when they replace what they loaded before)."""
    if IN_COMFYUI:
        model_management.unload_all_models()
        model_management.soft_empty_cache()


# --- ComfyUI's memory management ---------------------------------------------------------------
# ComfyUI frees memory ("Unload Models", room for its text encoder or VAE, the retry after an
# out-of-memory error) by unloading the ModelPatchers listed in model_management.current_loaded_models,
# and only those. Our pipelines are no ModelPatchers, so each gets a MemoryHandle per device it holds
# memory on: a ModelPatcher around a weightless module, registered the way ComfyUI loads its own
# models (load_models_gpu). ComfyUI unloading a handle makes the pipeline step aside (to CPU memory,
# or its workers stop); our own run registers the handles again, which makes room and brings the
# pipeline back. The pipeline keeps its handles; a handle keeps only a weak reference to it.
# model_management is always called through the module: other packs replace its functions.

class WanVideoMultiGPUModel(torch.nn.Module):
    """The weightless module a MemoryHandle wraps; its class name is what ComfyUI's log shows."""


if IN_COMFYUI:
    class MemoryHandle(model_patcher.ModelPatcher):
        """The memory one pipeline holds on one device, as ComfyUI's model management sees it."""

        def __init__(self, pipeline, device, nbytes):
            # Set before ModelPatcher.__init__, which calls model_size().
            self._pipeline = weakref.ref(pipeline)
            self._nbytes = int(nbytes)
            self.wanted = False  # set while our own run registers: only then does partially_load bring it back
            super().__init__(WanVideoMultiGPUModel(), device, torch.device("cpu"), size=self._nbytes)

        def _owner(self):
            reference = getattr(self, "_pipeline", None)
            return reference() if reference is not None else None

        def _resident(self):
            owner = self._owner()
            return owner is not None and not owner.is_aside

        def loaded_size(self):
            return self._nbytes if self._resident() else 0

        def current_loaded_device(self):
            return self.load_device if self._resident() else self.offload_device

        def partially_load(self, device_to, extra_memory=0, force_patch_weights=False):
            # ComfyUI also reloads every listed model it thinks in use (controlnets, model patches):
            # only our own run, which sets `wanted`, brings the pipeline back.
            before, owner = self.loaded_size(), self._owner()
            if owner is not None and self.wanted:
                owner.come_back()
            return self.loaded_size() - before

        def partially_unload(self, device_to, memory_to_free=0, *args, **kwargs):
            return 0  # all or nothing: ComfyUI then detaches the handle and the pipeline steps aside

        def detach(self, unpatch_all=True):
            # unpatch_all=False comes from re-registering a listed handle and from __del__: no request for memory.
            owner = self._owner() if unpatch_all else None
            if owner is not None and not owner.is_aside:
                logger.info("ComfyUI frees %s: the Wan model steps aside.", self.load_device)
                owner.step_aside()
            return super().detach(unpatch_all)


def _device(device):
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device


def _unload_all_reaches_every_device():
    """Newer ComfyUI's unload_all_models frees every GPU; older ones only the main device."""
    try:
        return "get_all_torch_devices" in inspect.getsource(model_management.unload_all_models)
    except (OSError, TypeError):  # no source (frozen, or replaced by a C function): assume the older one
        return False


def manage_memory(pipeline):
    """Put a loaded pipeline under ComfyUI's memory management (see above): its handles are
    registered now, and each run registers them again through the pipeline's before_run hook.
    Returns the pipeline. Outside ComfyUI, nothing happens."""
    if not IN_COMFYUI:
        return pipeline
    handles = [MemoryHandle(pipeline, _device(device), nbytes)
               for device, nbytes in pipeline.memory_by_device().items()]
    main = _device(model_management.get_torch_device())
    if all(h.load_device != main for h in handles) and not _unload_all_reaches_every_device():
        handles.append(MemoryHandle(pipeline, main, 0))  # so that "Unload Models" reaches us at all
    pipeline.memory_handles = handles
    pipeline.before_run = _before_run
    # Dropping the handles drops their placeholders, whose finalizers take them off ComfyUI's list.
    pipeline.add_cleanup(handles.clear)
    _register(handles, memory_required=0)
    logger.info("Registered with ComfyUI's model management: %s.",
                ", ".join(f"{h.load_device} ({h.model_size() / 2**30:.2f} GiB)" for h in handles))
    return pipeline


def _register(handles, memory_required):
    for handle in handles:
        handle.wanted = True
    try:
        model_management.load_models_gpu(handles, memory_required=memory_required)
    finally:
        for handle in handles:
            handle.wanted = False


def _before_run(pipeline, noise, sampler_args):
    """The pipeline's before_run hook: ComfyUI frees what the run needs on our devices (its text
    encoder, VAE, other models) and calls our handles' partially_load, which brings the pipeline back."""
    try:
        needed = api.run_activation_bytes(pipeline, tuple(noise.shape), sampler_args.get("cfg", 5.0))
    except Exception as error:  # the estimate is advisory
        logger.debug("No activation estimate: %s", error)
        needed = 0
    _register(getattr(pipeline, "memory_handles", []), memory_required=needed)


class ProgressReporter:
    """ComfyUI's progress bar with latent previews; nothing outside ComfyUI (the loop's tqdm bar shows)."""

    def __init__(self, total_steps, latent_format="Wan21"):
        """latent_format: the model's ComfyUI latent format name ('Wan21'; 'Wan22' for TI2V-5B), for previews."""
        self.bar = comfy_utils.ProgressBar(total_steps) if IN_COMFYUI else None
        self.previewer = None
        if IN_COMFYUI:
            try:
                import latent_preview
                import comfy.latent_formats as latent_formats
                self.previewer = latent_preview.get_previewer(main_device(), getattr(latent_formats, latent_format)())
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
