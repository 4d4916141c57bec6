"""LoRA merging into a loaded WanModel, in float32, for every key format Wan LoRAs ship in.

A LoRA file holds, per patched module, either a low-rank pair or a full difference:
  - `<stem>.lora_down.weight` [r, in] + `<stem>.lora_up.weight` [out, r] (+ `<stem>.alpha`), also
    spelled `lora_A` / `lora_B` (PEFT, optionally with an adapter name: `lora_A.default.weight`):
        W' = W + strength * (alpha / r) * (up @ down)      (alpha defaults to r)
  - `<stem>.diff` (full weight difference), `<stem>.diff_b` or `<stem>.lora_B.bias` (bias
    difference), `<stem>.diff_m` (difference of a block's or the head's `modulation`):
        P' = P + strength * diff
The stem names the module in one of these spellings (all mapped back to the official names):
  official       `blocks.0.self_attn.q`, prefixed `diffusion_model.`, `model.diffusion_model.`,
                 `transformer.`, `base_model.model.` (PEFT) or `pipe.dit.` (DiffSynth)
  diffusers      `blocks.0.attn1.to_q`, `attn2.add_k_proj`, `ffn.net.0.proj`, `condition_embedder.*`,
                 `proj_out`, bare or prefixed `transformer.` / `diffusion_model.` / `base_model.model.`
  kohya/musubi   `lora_unet_blocks_0_cross_attn_k_img` (also `lora_unet__` of Wan-Fun, `lycoris_`,
                 `lora_transformer_`), matched against every module name written with underscores,
                 so names with underscores of their own (`k_img`, `self_attn`) map back unambiguously.

Merging happens once, at load: the model then runs at full speed with no LoRA code in its forward.
fp8 weights (FP8Linear) are dequantized, merged and re-quantized once, whatever the number of LoRAs.
"""
import logging
import math
import re
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from .checkpoint import is_pickle_file
from .quantization import FP8Linear, quantize_weight

logger = logging.getLogger(__name__)

OFFICIAL_PREFIXES = ("", "diffusion_model.", "model.diffusion_model.", "transformer.", "base_model.model.", "pipe.dit.")
DIFFUSERS_PREFIXES = ("", "transformer.", "diffusion_model.", "base_model.model.")
UNDERSCORE_PREFIXES = ("lora_unet_", "lora_unet__", "lycoris_", "lora_transformer_")

# Official Wan 2.1 names -> diffusers WanTransformer3DModel names (parts inside a block, then the rest).
DIFFUSERS_BLOCK_NAMES = {
    "self_attn.q": "attn1.to_q", "self_attn.k": "attn1.to_k", "self_attn.v": "attn1.to_v",
    "self_attn.o": "attn1.to_out.0", "self_attn.norm_q": "attn1.norm_q", "self_attn.norm_k": "attn1.norm_k",
    "cross_attn.q": "attn2.to_q", "cross_attn.k": "attn2.to_k", "cross_attn.v": "attn2.to_v",
    "cross_attn.o": "attn2.to_out.0", "cross_attn.norm_q": "attn2.norm_q", "cross_attn.norm_k": "attn2.norm_k",
    "cross_attn.k_img": "attn2.add_k_proj", "cross_attn.v_img": "attn2.add_v_proj",
    "cross_attn.norm_k_img": "attn2.norm_added_k",
    "norm3": "norm2",  # diffusers numbers the norms in call order: official norm3 (cross-attn) is its norm2
    "ffn.0": "ffn.net.0.proj", "ffn.2": "ffn.net.2", "modulation": "scale_shift_table",
}
DIFFUSERS_TOP_NAMES = {
    "patch_embedding": "patch_embedding",
    "text_embedding.0": "condition_embedder.text_embedder.linear_1",
    "text_embedding.2": "condition_embedder.text_embedder.linear_2",
    "time_embedding.0": "condition_embedder.time_embedder.linear_1",
    "time_embedding.2": "condition_embedder.time_embedder.linear_2",
    "time_projection.1": "condition_embedder.time_proj",
    "head.head": "proj_out", "head.modulation": "scale_shift_table",
    "img_emb.proj.0": "condition_embedder.image_embedder.norm1",
    "img_emb.proj.1": "condition_embedder.image_embedder.ff.net.0.proj",
    "img_emb.proj.3": "condition_embedder.image_embedder.ff.net.2",
    "img_emb.proj.4": "condition_embedder.image_embedder.norm2",
    "img_emb.emb_pos": "condition_embedder.image_embedder.pos_embed",
}

# `<stem>.<kind>`: the kinds of tensor a LoRA file holds for one module.
KEY_PATTERN = re.compile(
    r"^(?P<stem>.+?)\.(?P<kind>lora_down\.weight|lora_up\.weight|lora_[AB](?:\.[^.]+)?\.weight|lora_B\.bias|"
    r"alpha|diff|diff_b|diff_m|lora_mid\.weight|dora_scale|hada_\w+|lokr_\w+|w_norm|b_norm)$")
KIND_ROLES = {"lora_down.weight": "down", "lora_up.weight": "up", "lora_B.bias": "diff_b",
              "alpha": "alpha", "diff": "diff", "diff_b": "diff_b", "diff_m": "diff_m"}
UNSUPPORTED_KINDS = {"lora_mid": "LoCon (lora_mid)", "dora_scale": "DoRA", "hada_": "LoHa", "lokr_": "LoKr",
                     "w_norm": "GLoRA norm", "b_norm": "GLoRA norm"}

# Substrings of keys that betray a LoRA for another model, checked in this order.
OTHER_ARCHITECTURES = (
    (("double_blocks", "single_blocks", "single_transformer_blocks"), "Flux or HunyuanVideo"),
    (("joint_blocks", "context_block"), "Stable Diffusion 3"),
    (("lora_unet_down_blocks", "lora_unet_up_blocks", "lora_unet_mid_block", "down_blocks.", "up_blocks.",
      "mid_block."), "a Stable Diffusion 1.x/2.x/SDXL UNet"),
    (("input_blocks", "output_blocks", "middle_block"), "a Stable Diffusion 1.x/2.x/SDXL UNet"),
    (("transformer_blocks",), "another diffusers transformer (LTX-Video, CogVideoX, Mochi, PixArt...)"),
    (("lora_te_", "lora_te1_", "lora_te2_", "text_encoder", "text_model"), "a text encoder (CLIP/T5) only"),
)


@dataclass
class LoraReport:
    """What one LoRA did: the parameters it changed and the keys that matched nothing."""
    name: str
    strength: float
    patched: list = field(default_factory=list)       # official parameter names
    unmatched_keys: list = field(default_factory=list)


def load_lora_state(path):
    """A LoRA .safetensors file -> {key: tensor} on the CPU. Pickle files are refused, never opened."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"LoRA file {str(path)!r} does not exist.")
    if is_pickle_file(path):
        raise ValueError(f"LoRA file {str(path)!r} is a pickle (torch.save) file, which can run arbitrary code "
                         "when opened; it was not loaded. Use the .safetensors version of this LoRA.")
    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError) as error:
        raise ValueError(f"LoRA file {str(path)!r} is not a valid safetensors file ({error}).") from error


def build_key_map(model):
    """{LoRA stem in any supported spelling: official name} for every module with parameters of its own
    and every parameter that is not a weight or bias (modulation, emb_pos), which `.diff` keys target."""
    owners = [name for name, module in model.named_modules()
              if name and any(True for _ in module.parameters(recurse=False))]
    owners += [name for name, _ in model.named_parameters() if name.rpartition(".")[2] not in ("weight", "bias")]
    key_map = {}
    for official in owners:
        aliases = [p + official for p in OFFICIAL_PREFIXES]
        aliases += [p + official.replace(".", "_") for p in UNDERSCORE_PREFIXES]
        diffusers = _diffusers_name(official)
        if diffusers is not None:
            aliases += [p + diffusers for p in DIFFUSERS_PREFIXES]
            aliases += [p + diffusers.replace(".", "_") for p in UNDERSCORE_PREFIXES]
        for alias in aliases:
            if key_map.setdefault(alias, official) != official:
                raise RuntimeError(f"LoRA key alias {alias!r} names both {key_map[alias]!r} and {official!r}.")
    return key_map


def _diffusers_name(official):
    match = re.fullmatch(r"blocks\.(\d+)\.(.+)", official)
    if match:
        inner = DIFFUSERS_BLOCK_NAMES.get(match.group(2))
        return None if inner is None else f"blocks.{match.group(1)}.{inner}"
    return DIFFUSERS_TOP_NAMES.get(official)


def apply_loras(model, loras):
    """Merge LoRAs into the model's weights, in place. Returns one LoraReport per LoRA.

    loras: list of (path or {key: tensor}, strength), merged in order. Every weight keeps its
    dtype and device; the update is computed in float32 on the weight's device. FP8Linear weights
    are dequantized, updated by all LoRAs, and re-quantized once (new scale_weight).
    """
    updates, reports = collect_lora_updates(model, loras)
    parameters = dict(model.named_parameters())
    with torch.no_grad():
        for param_name, param_updates in updates.items():
            _merge(model, param_name, parameters[param_name], param_updates)
    return reports


def collect_lora_updates(model, loras):
    """The LoRAs' updates, checked against the parameter shapes, without touching any weight ->
    ({official parameter name: [(kind, tensors, scale, lora key)]}, [LoraReport]).

    Works on a model on the meta device (only names and shapes are read), so a loader that fills
    parameters one tensor at a time (weight sharding) can merge each with `merge_lora_updates`
    before it keeps its slice."""
    key_map = build_key_map(model)
    parameters = dict(model.named_parameters())
    updates = defaultdict(list)  # official parameter name -> [(kind, tensors, scale, lora key)]
    reports = []
    for index, entry in enumerate(loras):
        if not (isinstance(entry, (tuple, list)) and len(entry) == 2):
            raise TypeError(f"Each LoRA is a (path or state dict, strength) pair; entry {index} is {entry!r}.")
        source, strength = entry
        name = Path(source).name if isinstance(source, (str, Path)) else f"LoRA #{index}"
        strength = float(strength)
        if not math.isfinite(strength):
            raise ValueError(f"LoRA {name!r}: strength {strength} is not a finite number.")
        state = load_lora_state(source) if isinstance(source, (str, Path)) else source
        if not state:
            raise ValueError(f"LoRA {name!r} holds no tensors.")
        report = LoraReport(name, strength)
        if strength != 0.0:
            _collect_updates(state, strength, name, key_map, parameters, updates, report)
        reports.append(report)
    for report in reports:
        logger.info("LoRA %s at strength %g: %d parameters patched.", report.name, report.strength,
                    len(set(report.patched)))
    return updates, reports


def merge_lora_updates(merged, param_updates):
    """Add one parameter's updates (from collect_lora_updates), in order, to `merged` (float32, the
    parameter's shape, on the device to compute on), in place -> merged."""
    for kind, tensors, scale, _ in param_updates:
        if kind == "lora":
            down, up = (t.to(merged.device, torch.float32) for t in tensors)
            merged += scale * (up.flatten(1) @ down.flatten(1)).reshape(merged.shape)
        else:
            merged += scale * tensors[0].to(merged.device, torch.float32)
    return merged


def _collect_updates(state, strength, name, key_map, parameters, updates, report):
    """Group a LoRA's keys by module, check every shape, and queue its updates."""
    groups = defaultdict(dict)  # stem -> role -> (key, tensor)
    for key, tensor in state.items():
        match = KEY_PATTERN.match(key)
        if match is None:
            report.unmatched_keys.append(key)
            continue
        kind = match.group("kind")
        for prefix, label in UNSUPPORTED_KINDS.items():
            if kind.startswith(prefix):
                raise ValueError(f"LoRA {name!r} is a {label} file (key {key!r}); only plain LoRA (up/down, A/B) "
                                 "and diff keys are supported. Convert it to a standard LoRA.")
        role = KIND_ROLES.get(kind) or ("down" if kind.startswith("lora_A") else "up")
        groups[match.group("stem")][role] = (key, tensor)

    for stem, roles in groups.items():
        official = key_map.get(stem)
        if official is None:
            report.unmatched_keys.extend(key for key, _ in roles.values())
            continue
        targets = _targets(official, roles, parameters)
        if not targets:
            report.unmatched_keys.extend(key for key, _ in roles.values())
            continue
        for param_name, kind, tensors, key in targets:
            scale = strength
            if kind == "lora":
                (down_key, down), (up_key, up) = tensors
                scale *= _alpha_over_rank(name, roles, down_key, down, up_key, up, parameters[param_name])
                tensors = (down, up)
            else:
                _check_diff_shape(name, key, tensors[0], param_name, parameters[param_name])
            updates[param_name].append((kind, tensors, scale, key))
            report.patched.append(param_name)

    if report.unmatched_keys:
        if not report.patched:
            raise ValueError(_no_match_message(name, report.unmatched_keys))
        logger.warning("LoRA %s: %d of %d keys match no module of this model and were skipped, e.g. %s.", name,
                       len(report.unmatched_keys), len(state), ", ".join(report.unmatched_keys[:4]))


def _targets(official, roles, parameters):
    """[(parameter name, 'lora' or 'diff', tensors, key)] that one module's LoRA keys update."""
    is_parameter = official in parameters  # a bare parameter (modulation, emb_pos) takes only `.diff`
    targets = []
    if "down" in roles or "up" in roles:
        if "down" not in roles or "up" not in roles:
            present, missing = ("down", "up") if "down" in roles else ("up", "down")
            raise ValueError(f"LoRA key {roles[present][0]!r} has no matching {missing} (lora_{missing} / "
                             f"lora_{'A' if missing == 'down' else 'B'}) tensor; the file is incomplete.")
        weight = official if is_parameter else official + ".weight"
        if weight in parameters:
            targets.append((weight, "lora", (roles["down"], roles["up"]), roles["up"][0]))
    for role, suffix in (("diff", ".weight"), ("diff_b", ".bias"), ("diff_m", ".modulation")):
        if role in roles:
            target = official if is_parameter and role == "diff" else official + suffix
            if target in parameters:
                targets.append((target, "diff", (roles[role][1],), roles[role][0]))
    return targets


def _alpha_over_rank(name, roles, down_key, down, up_key, up, param):
    """alpha / rank for a low-rank pair, after checking that the pair fits the weight."""
    rank = down.shape[0]
    out_features, in_features = param.shape[0], param[0].numel()
    if up.shape[1] != rank:
        raise ValueError(f"LoRA {name!r}: rank mismatch, {down_key!r} has rank {rank} (shape {list(down.shape)}) "
                         f"but {up_key!r} has shape {list(up.shape)}. The file is inconsistent.")
    if up.shape[0] != out_features or down[0].numel() != in_features or up[0].numel() != rank:
        raise ValueError(f"LoRA {name!r}: {up_key!r} {list(up.shape)} x {down_key!r} {list(down.shape)} does not fit "
                         f"the weight of shape {list(param.shape)}; the LoRA was made for another Wan model "
                         "(size 1.3B/14B or variant t2v/i2v).")
    alpha = roles.get("alpha")
    return (alpha[1].float().item() if alpha is not None else rank) / rank


def _check_diff_shape(name, key, diff, param_name, param):
    if diff.shape != param.shape:
        raise ValueError(f"LoRA {name!r}: {key!r} has shape {list(diff.shape)} but {param_name} has shape "
                         f"{list(param.shape)}; the LoRA was made for another Wan model (size or variant).")


def _merge(model, param_name, param, param_updates):
    """Add the float32 sum of the updates to one parameter, keeping its dtype, device and identity."""
    if param.is_meta:
        raise ValueError(f"Cannot merge a LoRA into {param_name}: the model is on the meta device; load it first.")
    module_name, _, attribute = param_name.rpartition(".")
    module = model.get_submodule(module_name)
    fp8 = isinstance(module, FP8Linear) and attribute == "weight"
    merged = merge_lora_updates(module.dequantized_weight(torch.float32) if fp8 else param.detach().float(),
                                param_updates)
    if fp8:
        weight, scale_weight = quantize_weight(merged, param.dtype)
        param.data.copy_(weight)
        module.scale_weight.copy_(scale_weight)
    else:
        param.data.copy_(merged)  # in place: pinned or swapped-out storage stays where it is


def _no_match_message(name, keys):
    for signatures, architecture in OTHER_ARCHITECTURES:
        hit = next((k for k in keys if any(s in k for s in signatures)), None)
        if hit is not None:
            return (f"LoRA {name!r} matches no module of this Wan 2.1 model: its keys look like {architecture} "
                    f"(e.g. {hit!r}). Use a LoRA trained for Wan 2.1.")
    return (f"LoRA {name!r} matches no module of this Wan 2.1 model ({len(keys)} keys, e.g. "
            f"{', '.join(map(repr, keys[:3]))}). Supported: kohya/musubi 'lora_unet_blocks_0_self_attn_q', "
            "ComfyUI 'diffusion_model.blocks.0.self_attn.q' and diffusers 'transformer.blocks.0.attn1.to_q' "
            "keys with lora_down/lora_up, lora_A/lora_B, alpha, diff and diff_b.")
