"""A small stand-in for ComfyUI's model management, for tests without ComfyUI.

It behaves as ComfyUI (v0.3.40 to v0.3.64, comfy/model_management.py and comfy/model_patcher.py)
does where our memory handles meet it, written from reading those files:
  - current_loaded_models lists a LoadedModel per registered patcher, holding only a weak
    reference to it; a finalizer on the patcher's model takes the entry off when the model dies;
  - load_models_gpu(models, memory_required) detaches a patcher listed already with
    unpatch_all=False, frees memory on each (non-CPU) device first, then calls partially_load and
    puts the entries at the front of the list;
  - free_memory(required, device) unloads listed models of that device, most offloaded first, then
    least referenced, then smallest, until the free memory exceeds `required`: partially_unload
    when that could be enough, else detach(unpatch_all=True) and the entry leaves the list;
  - unload_all_models() is free_memory(1e30, main device): what "Unload Models" (POST /free) and
    the retry after an out-of-memory error call.
Free memory is a number the test sets (`free_bytes`), not a measurement.
"""
import sys
import types
import weakref

import torch


def _model_management():
    mm = types.ModuleType("comfy.model_management")
    mm.current_loaded_models = []
    mm.free_bytes = {}  # device -> bytes the fake reports free (default: plenty)
    mm.unloads = []     # (class name of the unloaded model, device), in order

    def get_torch_device():
        return torch.device("cpu")

    def get_free_memory(device):
        return mm.free_bytes.get(torch.device(device), 1 << 40)

    class LoadedModel:
        def __init__(self, model):
            self._model = weakref.ref(model)
            self.device = model.load_device
            self.real_model = None
            self.model_finalizer = None
            self.currently_used = True

        @property
        def model(self):
            return self._model()

        def model_memory(self):
            return self.model.model_size()

        def model_offloaded_memory(self):
            return self.model.model_size() - self.model.loaded_size()

        def model_memory_required(self, device):
            if device == self.model.current_loaded_device():
                return self.model_offloaded_memory()
            return self.model_memory()

        def model_load(self):
            self.model.model_patches_to(self.device)
            self.model.partially_load(self.device, 1e32)
            self.real_model = weakref.ref(self.model.model)
            self.model_finalizer = weakref.finalize(self.model.model, cleanup_models)

        def model_unload(self, memory_to_free=None, unpatch_weights=True):
            if memory_to_free is not None and memory_to_free < self.model.loaded_size():
                if self.model.partially_unload(self.model.offload_device, memory_to_free) >= memory_to_free:
                    return False
            mm.unloads.append((type(self.model.model).__name__, self.device))
            self.model.detach(unpatch_weights)
            self.model_finalizer.detach()
            self.model_finalizer = self.real_model = None
            return True

        def __eq__(self, other):
            return self.model is other.model

        def is_dead(self):
            return self.real_model is not None and self.real_model() is not None and self.model is None

    def free_memory(memory_required, device, keep_loaded=()):
        candidates = []
        for i, loaded in enumerate(mm.current_loaded_models):
            if loaded.device == device and loaded not in keep_loaded and not loaded.is_dead():
                candidates.append((-loaded.model_offloaded_memory(), sys.getrefcount(loaded.model),
                                   loaded.model_memory(), i))
        unloaded = []
        for *_, i in sorted(candidates):
            free = get_free_memory(device)
            if free > memory_required:
                break
            if mm.current_loaded_models[i].model_unload(memory_required - free):
                unloaded.append(i)
        return [mm.current_loaded_models.pop(i) for i in sorted(unloaded, reverse=True)]

    def load_models_gpu(models, memory_required=0, force_patch_weights=False, minimum_memory_required=None,
                        force_full_load=False):
        to_load = []
        for patcher in models:
            entry = LoadedModel(patcher)
            if entry in mm.current_loaded_models:
                entry = mm.current_loaded_models[mm.current_loaded_models.index(entry)]
            to_load.append(entry)
        for entry in to_load:  # a listed patcher (or a clone of one) is taken off and registered again
            for i in reversed(range(len(mm.current_loaded_models))):
                if entry.model.is_clone(mm.current_loaded_models[i].model):
                    listed = mm.current_loaded_models.pop(i)
                    listed.model.detach(unpatch_all=False)
                    listed.model_finalizer.detach()
        required = {}
        for entry in to_load:
            required[entry.device] = required.get(entry.device, 0) + entry.model_memory_required(entry.device)
        for device, nbytes in required.items():
            if device != torch.device("cpu"):
                free_memory(nbytes * 1.1 + memory_required, device)
        for entry in to_load:
            entry.model_load()
            mm.current_loaded_models.insert(0, entry)

    def unload_all_models():
        free_memory(1e30, mm.get_torch_device())  # looked up on the module, as ComfyUI's global lookup is

    def cleanup_models():
        mm.current_loaded_models[:] = [m for m in mm.current_loaded_models
                                       if m.real_model is None or m.real_model() is not None]

    for function in (get_torch_device, get_free_memory, free_memory, load_models_gpu, unload_all_models,
                     cleanup_models):
        setattr(mm, function.__name__, function)
    mm.LoadedModel = LoadedModel
    mm.unet_offload_device = lambda: torch.device("cpu")
    mm.soft_empty_cache = lambda force=False: None
    mm.throw_exception_if_processing_interrupted = lambda: None
    return mm


def _model_patcher():
    mp = types.ModuleType("comfy.model_patcher")

    class ModelPatcher:
        def __init__(self, model, load_device, offload_device, size=0, weight_inplace_update=False):
            self.size, self.model = size, model
            self.model_options = {"transformer_options": {}}
            self.model_size()  # as ComfyUI's: before the attributes below exist
            self.load_device, self.offload_device = load_device, offload_device
            self.parent = None
            self.model.device = offload_device
            self.model.model_loaded_weight_memory = 0

        def model_size(self):
            return self.size

        def loaded_size(self):
            return self.model.model_loaded_weight_memory

        def current_loaded_device(self):
            return self.model.device

        def partially_load(self, device_to, extra_memory=0, force_patch_weights=False):
            self.model.device, self.model.model_loaded_weight_memory = device_to, self.size
            return self.size

        def partially_unload(self, device_to, memory_to_free=0):
            return 0

        def detach(self, unpatch_all=True):
            if unpatch_all:
                self.model.device, self.model.model_loaded_weight_memory = self.offload_device, 0
            return self.model

        def is_clone(self, other):
            return getattr(other, "model", None) is self.model

        def model_patches_to(self, device):
            pass

        def model_patches_models(self):
            return []

        def model_dtype(self):
            return None

        def __del__(self):
            self.detach(unpatch_all=False)

    mp.ModelPatcher = ModelPatcher
    return mp


def install(monkeypatch, models_folder):
    """Put fake `comfy`, `comfy.model_management`, `comfy.model_patcher`, `comfy.utils` and
    `folder_paths` modules into sys.modules (undone by monkeypatch) -> the fake model_management."""
    comfy = types.ModuleType("comfy")
    mm, mp = _model_management(), _model_patcher()
    utils = types.ModuleType("comfy.utils")

    class ProgressBar:
        def __init__(self, total):
            self.total = total

        def update_absolute(self, value, total=None, preview=None):
            pass

    utils.ProgressBar = ProgressBar
    comfy.model_management, comfy.model_patcher, comfy.utils = mm, mp, utils
    folder_paths = types.ModuleType("folder_paths")
    folder_paths.get_filename_list = lambda folder: sorted(p.name for p in models_folder.iterdir())
    folder_paths.get_full_path = lambda folder, name: str(models_folder / name) if (models_folder / name).is_file() \
        else None
    for name, module in (("comfy", comfy), ("comfy.model_management", mm), ("comfy.model_patcher", mp),
                         ("comfy.utils", utils), ("folder_paths", folder_paths)):
        monkeypatch.setitem(sys.modules, name, module)
    return mm
