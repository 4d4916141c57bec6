"""Loader nodes: the standard Wan model loader, the Multi-GPU loader that extends it with a
strategy, and the block swap, LoRA and compile settings that feed both."""
import logging
import weakref

from . import comfy_host
from .nodes_sampler import MODEL_TYPE
from .wanvideo import api

logger = logging.getLogger(__name__)

BLOCK_SWAP_TYPE = "WANVIDEO_MGPU_BLOCKSWAP"
LORA_TYPE = "WANVIDEO_MGPU_LORA"
COMPILE_TYPE = "WANVIDEO_MGPU_COMPILE"
CATEGORY = "WanVideoMultiGPU"
LORA_TARGETS = ("both", "high_noise", "low_noise")  # the LoRA chain's entries: (path, strength, applies_to)


def loras_for(chain, expert=None):
    """The chain's (path, strength) pairs that merge into `expert` ('high_noise' / 'low_noise' of a
    Wan 2.2 A14B pair; None: a single model, which takes every LoRA)."""
    return [(entry[0], entry[1]) for entry in chain or []
            if expert is None or (entry[2] if len(entry) > 2 else "both") in ("both", expert)]


class WanMultiGPUModelLoader:
    """Loads a Wan 2.1 or 2.2 diffusion model (t2v, i2v, flf2v; 1.3B, 14B, TI2V-5B, A14B expert pairs) from
    models/diffusion_models."""

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": (comfy_host.list_model_files("diffusion_models"), {
                    "tooltip": "A Wan 2.1 or 2.2 diffusion model (.safetensors) from models/diffusion_models: official or "
                               "ComfyUI-repackaged, bf16, fp16, fp32 or fp8."}),
                "base_precision": (["bf16", "fp16", "fp32"], {
                    "default": "bf16", "tooltip": "Precision of the computation and of the weights that are not "
                                                  "quantized. bf16 is Wan's own; fp32 needs twice the memory."}),
                "quantization": (list(api.QUANTIZATION_MODES), {
                    "default": "disabled", "tooltip": "Store the transformer blocks' large weights in fp8: half the "
                                                      "memory of bf16, small quality cost. fp8_e4m3fn is the more "
                                                      "precise; '_fast' variants also compute in fp8 on GPUs that support it."}),
                "load_device": (["main_device", "offload_device"], {
                    "default": "main_device", "tooltip": "Where the weights rest between runs: on the GPU (fastest), or "
                                                         "in CPU memory, moved to the GPU for each run."}),
                "attention_mode": (api.ATTENTION_MODES(), {
                    "default": "sdpa", "tooltip": "Attention implementation: PyTorch SDPA, or flash-attn / "
                                                  "SageAttention where installed. sage_triton (NVIDIA GPUs, needs "
                                                  "triton): this pack's own 8-bit attention (INT8 Q/K, FP8 P/V; "
                                                  "fp16 P/V before Ada/Hopper); experimental, small quality cost. "
                                                  "auto: on NVIDIA GPUs with triton, times sdpa against sage_triton "
                                                  "on the first call of each attention shape and keeps the faster "
                                                  "(logged); sdpa elsewhere."}),
            },
            "optional": {
                "lora": (LORA_TYPE, {"tooltip": "LoRAs from 'WanVideo LoRA Select (Multi-GPU pack)', merged at load."}),
                "block_swap_args": (BLOCK_SWAP_TYPE, {"tooltip": "Block swap settings: keep some blocks in CPU memory to "
                                                                 "fit a model larger than the GPU."}),
                "compile_args": (COMPILE_TYPE, {"tooltip": "torch.compile settings for the transformer blocks."}),
                "low_noise_model": (["none"] + comfy_host.list_model_files("diffusion_models"), {
                    "default": "none", "tooltip": "Wan 2.2 A14B only: the low-noise expert file (e.g. "
                                                  "wan2.2_t2v_low_noise_14B_fp16.safetensors); the main model is then "
                                                  "the high-noise expert. Both load with the same settings and strategy; "
                                                  "the sampler switches at the boundary. none: one model."}),
            },
        }

    RETURN_TYPES = (MODEL_TYPE,)
    RETURN_NAMES = ("model",)
    FUNCTION = "load"
    CATEGORY = CATEGORY
    DESCRIPTION = "Loads a Wan 2.1 or 2.2 model for 'WanVideo Sampler (Multi-GPU pack)'."

    @staticmethod
    def settings_from_inputs(base_precision, quantization, load_device, attention_mode, lora=None,
                             block_swap_args=None, compile_args=None):
        return api.LoadSettings(base_precision=base_precision, quantization=quantization, attention_mode=attention_mode,
                            load_device=load_device, loras=loras_for(lora), block_swap=block_swap_args,
                            compile_args=compile_args)

    @staticmethod
    def pair_inputs(low_noise_model, lora):
        """The api.load arguments of a Wan 2.2 A14B pair (none for one model): the low-noise file and
        each expert's LoRAs (the LoRA chain's applies_to)."""
        if low_noise_model in (None, "none"):
            return {}
        return {"low_noise_path": comfy_host.model_file_path("diffusion_models", low_noise_model),
                "loras_by_expert": {expert: loras_for(lora, expert) for expert in ("high_noise", "low_noise")}}

    def release_previous(self):
        """Unload what this node loaded last time: ComfyUI still caches it while the new load runs,
        and two copies of a 14B model (or two worker groups) rarely fit."""
        previous = getattr(self, "_previous", None)
        pipeline = previous() if previous is not None else None
        if pipeline is not None:
            pipeline.unload()
        comfy_host.free_memory_for_run()

    def remember(self, pipeline):
        """Keep a weak reference for release_previous, and put the pipeline under ComfyUI's memory
        management ('Unload Models' and ComfyUI's own need for memory make it step aside)."""
        self._previous = weakref.ref(pipeline)
        return comfy_host.manage_memory(pipeline)

    def load(self, model, base_precision, quantization, load_device, attention_mode, lora=None,
             block_swap_args=None, compile_args=None, low_noise_model="none"):
        path = comfy_host.model_file_path("diffusion_models", model)
        settings = self.settings_from_inputs(base_precision, quantization, load_device, attention_mode, lora,
                                             block_swap_args, compile_args)
        pair = self.pair_inputs(low_noise_model, lora)
        self.release_previous()
        pipeline = api.load(path, "none", settings=settings, device=comfy_host.main_device(),
                            offload_device=comfy_host.offload_device(), **pair)
        return (self.remember(pipeline),)


class WanVideoMultiGPULoader(WanMultiGPUModelLoader):
    """The standard loader plus a multi-GPU strategy: validates the GPUs, loads, applies the
    strategy and reports the plan (which blocks on which device, memory per device)."""

    @classmethod
    def INPUT_TYPES(cls):
        inputs = super().INPUT_TYPES()
        inputs["required"].update({
            "parallelism_type": (list(api.PARALLELISM_CHOICES), {
                "default": "auto", "tooltip": "auto: chosen from the checkpoint and the GPUs' free memory. "
                                              "data_parallel: a copy per GPU, CFG branches run side by side (speed, "
                                              "model must fit each GPU). block_distribution: blocks split across GPUs "
                                              "(memory: models larger than one GPU). distributed: a worker per GPU "
                                              "splitting the video's tokens (fastest on 2+ GPUs)."}),
            "gpu_ids": ("STRING", {"default": "0,1", "tooltip": "Comma-separated GPU indices as PyTorch numbers "
                                                                "them (after CUDA_VISIBLE_DEVICES), e.g. 0,1,2,3; "
                                                                "empty: every GPU. Ids that are not usable GPUs are "
                                                                "dropped with a warning."}),
            "enable_block_distribution": ("BOOLEAN", {
                "default": True, "tooltip": "Allow splitting blocks across the GPUs when the model fits no single "
                                            "GPU: data_parallel then falls back to block distribution."}),
            "pipeline_cfg_branches": ("BOOLEAN", {
                "default": True, "tooltip": "block_distribution: run CFG's cond and uncond as two micro-batches "
                                            "pipelined across the GPUs (both GPUs busy at once). Off: the stages "
                                            "take the whole batch in turn."}),
            "width": ("INT", {"default": 832, "min": 16, "max": 4096, "step": 16,
                              "tooltip": "Planned video width: sizes the activation reserve for 'auto' and the "
                                         "block split."}),
            "height": ("INT", {"default": 480, "min": 16, "max": 4096, "step": 16,
                               "tooltip": "Planned video height (activation reserve)."}),
            "num_frames": ("INT", {"default": 81, "min": 1, "max": 1025, "step": 4,
                                   "tooltip": "Planned frame count (activation reserve)."}),
            "shard_weights": (list(api.SHARD_WEIGHTS_CHOICES), {
                "default": "auto", "tooltip": "distributed only. on: each GPU holds 1/N of the weights and gathers "
                                              "each block from the others as it runs (runs a model no single GPU "
                                              "holds; adds traffic between the GPUs). off: every GPU holds a whole "
                                              "copy. auto: on when a whole copy does not fit a GPU's free memory."}),
        })
        return inputs

    RETURN_TYPES = (MODEL_TYPE, "STRING")
    RETURN_NAMES = ("model", "plan")
    DESCRIPTION = ("Loads a Wan 2.1 or 2.2 model across several GPUs with the chosen strategy; 'plan' tells which blocks "
                   "went to which GPU and the memory each holds.")

    def load(self, model, base_precision, quantization, load_device, attention_mode, parallelism_type="auto",
             gpu_ids="0,1", enable_block_distribution=True, pipeline_cfg_branches=True, width=832, height=480,
             num_frames=81, shard_weights="auto", lora=None, block_swap_args=None, compile_args=None,
             low_noise_model="none"):
        path = comfy_host.model_file_path("diffusion_models", model)
        settings = self.settings_from_inputs(base_precision, quantization, load_device, attention_mode, lora,
                                             block_swap_args, compile_args)
        pair = self.pair_inputs(low_noise_model, lora)  # the same strategy and settings for both experts
        is_valid, message = api.validate_gpu_setup(gpu_ids) if gpu_ids.strip() else (True, "")
        if not is_valid:
            logger.warning("GPU check: %s", message)
        if load_device == "offload_device":
            logger.info("load_device 'offload_device' applies to single-GPU loads; the strategy places the weights.")
        self.release_previous()
        pipeline = api.load(path, parallelism_type, gpu_ids, settings, width=width, height=height,
                            num_frames=num_frames, enable_block_distribution=enable_block_distribution,
                            pipeline_branches=pipeline_cfg_branches, shard_weights=shard_weights, **pair)
        plan = pipeline.describe() + "\n" + api.memory_per_device()
        logger.info("Multi-GPU plan:\n%s", plan)
        return (self.remember(pipeline), plan)


class WanMultiGPUBlockSwap:
    """Block swap settings for the loaders."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "blocks_to_swap": ("INT", {"default": 20, "min": 0, "max": 48, "tooltip": "How many transformer blocks "
                                       "(of 30 in 1.3B, 40 in 14B) stay in CPU memory and stream to the GPU as they run. "
                                       "Each 14B bf16 block is 0.7 GB."}),
            "prefetch_blocks": ("INT", {"default": 1, "min": 0, "max": 8, "tooltip": "Blocks uploaded ahead of use on a "
                                        "separate copy stream; 1 hides the transfers on PCIe 4/5 for most resolutions."}),
            "use_non_blocking": ("BOOLEAN", {"default": True, "tooltip": "Asynchronous copies from pinned memory; turn "
                                             "off only to debug."}),
            "offload_txt_emb": ("BOOLEAN", {"default": False, "tooltip": "Also keep the text embedding (~0.1 GB for "
                                            "14B) in CPU memory."}),
            "offload_img_emb": ("BOOLEAN", {"default": False, "tooltip": "Also keep the image-to-video CLIP projection "
                                            "in CPU memory."}),
        }}

    RETURN_TYPES = (BLOCK_SWAP_TYPE,)
    RETURN_NAMES = ("block_swap_args",)
    FUNCTION = "settings"
    CATEGORY = CATEGORY
    DESCRIPTION = "Block swap to pinned CPU memory with prefetch, for models larger than the GPU."

    def settings(self, blocks_to_swap, prefetch_blocks, use_non_blocking, offload_txt_emb, offload_img_emb):
        return (api.BlockSwapSettings(blocks_to_swap=blocks_to_swap, prefetch_blocks=prefetch_blocks,
                                  use_non_blocking=use_non_blocking, offload_txt_emb=offload_txt_emb,
                                  offload_img_emb=offload_img_emb),)


class WanMultiGPULoraSelect:
    """Chooses a LoRA and its strength; chain several."""

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "lora": (comfy_host.list_model_files("loras"), {"tooltip": "A Wan LoRA (.safetensors) from "
                                                                           "models/loras: ComfyUI, kohya/musubi or diffusers format."}),
                "strength": ("FLOAT", {"default": 1.0, "min": -10.0, "max": 10.0, "step": 0.01,
                                       "tooltip": "Multiplier of the LoRA's change; 0 leaves the model as it is."}),
            },
            "optional": {
                "prev_lora": (LORA_TYPE, {"tooltip": "LoRAs chosen before this one; they are merged in order."}),
                "applies_to": (list(LORA_TARGETS), {
                    "default": "both", "tooltip": "Wan 2.2 A14B pairs: which expert this LoRA merges into (both, "
                                                  "high_noise: the loader's main model, low_noise: its low_noise_model; "
                                                  "e.g. the lightx2v 4-step LoRAs come as a high- and a low-noise "
                                                  "file). A single model takes every LoRA."}),
            },
        }

    RETURN_TYPES = (LORA_TYPE,)
    RETURN_NAMES = ("lora",)
    FUNCTION = "select"
    CATEGORY = CATEGORY
    DESCRIPTION = "Selects a LoRA to merge into the model at load."

    def select(self, lora, strength, prev_lora=None, applies_to="both"):
        if applies_to not in LORA_TARGETS:
            raise ValueError(f"applies_to {applies_to!r} is not one of {', '.join(LORA_TARGETS)}.")
        return (list(prev_lora or []) + [(comfy_host.model_file_path("loras", lora), strength, applies_to)],)


class WanMultiGPUCompileSettings:
    """torch.compile per transformer block."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            # no CUDA-graph modes: compile_blocks refuses them (one graph serves every block, see its docstring)
            "mode": (["default", "max-autotune-no-cudagraphs"], {
                "default": "default", "tooltip": "torch.compile mode; max-autotune takes longer to compile."}),
            "dynamic": ("BOOLEAN", {"default": False, "tooltip": "Compile for varying shapes (fewer recompiles when "
                                                                  "the resolution changes, slightly slower kernels)."}),
            "fullgraph": ("BOOLEAN", {"default": False, "tooltip": "Fail instead of falling back when a block cannot "
                                                                   "be compiled whole."}),
        }}

    RETURN_TYPES = (COMPILE_TYPE,)
    RETURN_NAMES = ("compile_args",)
    FUNCTION = "settings"
    CATEGORY = CATEGORY
    DESCRIPTION = "Compiles each transformer block with torch.compile (works with block swap). Off unless connected."

    def settings(self, mode, dynamic, fullgraph):
        return ({"mode": None if mode == "default" else mode, "dynamic": dynamic, "fullgraph": fullgraph},)


NODE_CLASS_MAPPINGS = {
    "WanMultiGPUModelLoader": WanMultiGPUModelLoader,
    "WanVideoMultiGPULoader": WanVideoMultiGPULoader,
    "WanMultiGPUBlockSwap": WanMultiGPUBlockSwap,
    "WanMultiGPULoraSelect": WanMultiGPULoraSelect,
    "WanMultiGPUCompileSettings": WanMultiGPUCompileSettings,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "WanMultiGPUModelLoader": "WanVideo Model Loader (Multi-GPU pack)",
    "WanVideoMultiGPULoader": "WanVideo Multi-GPU Loader",
    "WanMultiGPUBlockSwap": "WanVideo Block Swap (Multi-GPU pack)",
    "WanMultiGPULoraSelect": "WanVideo LoRA Select (Multi-GPU pack)",
    "WanMultiGPUCompileSettings": "WanVideo Torch Compile (Multi-GPU pack)",
}
