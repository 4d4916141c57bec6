"""LoRA merging: every key format, the merge formula, fp8 re-quantization, chaining, and bad input."""
import logging
import pickle

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from conftest import relative_error
from wanvideo import load_wan_model
from wanvideo.lora import apply_loras, build_key_map, load_lora_state
from wanvideo.quantization import FP8Linear

RANK = 4
# official module -> its diffusers name, written out by hand (independent of wanvideo.lora's tables)
TARGETS = {
    "blocks.0.self_attn.q": "blocks.0.attn1.to_q",
    "blocks.1.self_attn.o": "blocks.1.attn1.to_out.0",
    "blocks.2.cross_attn.k_img": "blocks.2.attn2.add_k_proj",
    "blocks.3.cross_attn.v": "blocks.3.attn2.to_v",
    "blocks.0.ffn.0": "blocks.0.ffn.net.0.proj",
    "blocks.3.ffn.2": "blocks.3.ffn.net.2",
    "text_embedding.0": "condition_embedder.text_embedder.linear_1",
    "time_projection.1": "condition_embedder.time_proj",
    "head.head": "proj_out",
    "img_emb.proj.1": "condition_embedder.image_embedder.ff.net.0.proj",
}
# format -> (stem of an official module name, down suffix, up suffix, stores alpha)
FORMATS = {
    "comfy_kohya": (lambda o: "diffusion_model." + o, "lora_down.weight", "lora_up.weight", True),
    "comfy_peft": (lambda o: "diffusion_model." + o, "lora_A.weight", "lora_B.weight", False),
    "bare_official": (lambda o: o, "lora_A.weight", "lora_B.weight", True),
    "diffusers": (lambda o: "transformer." + TARGETS[o], "lora_A.weight", "lora_B.weight", False),
    "diffusers_bare": (lambda o: TARGETS[o], "lora_down.weight", "lora_up.weight", True),
    "peft_adapter": (lambda o: "base_model.model." + o, "lora_A.default.weight", "lora_B.default.weight", True),
    "musubi": (lambda o: "lora_unet_" + o.replace(".", "_"), "lora_down.weight", "lora_up.weight", True),
    "wan_fun": (lambda o: "lora_unet__" + o.replace(".", "_"), "lora_down.weight", "lora_up.weight", True),
}


def make_pairs(model, targets=TARGETS, seed=0):
    """{official module: (down [r, in], up [out, r], alpha)} random low-rank updates."""
    g = torch.Generator().manual_seed(seed)
    pairs = {}
    for i, name in enumerate(targets):
        weight = model.get_submodule(name).weight
        down = torch.randn(RANK, weight.shape[1], generator=g) / weight.shape[1] ** 0.5
        up = torch.randn(weight.shape[0], RANK, generator=g) * 0.2
        pairs[name] = (down, up, float(1 + i % 3))
    return pairs


def lora_state(pairs, fmt):
    stem_of, down_suffix, up_suffix, with_alpha = FORMATS[fmt]
    state = {}
    for name, (down, up, alpha) in pairs.items():
        stem = stem_of(name)
        state[f"{stem}.{down_suffix}"], state[f"{stem}.{up_suffix}"] = down, up
        if with_alpha:
            state[f"{stem}.alpha"] = torch.tensor(alpha)
    return state


def expected_weight(weight, down, up, alpha, strength):
    return weight.float() + strength * (alpha / RANK) * (up @ down)


@pytest.fixture
def i2v_model(tiny_checkpoints):
    return load_wan_model(tiny_checkpoints["i2v"][0], base_precision="fp32")


def forward_once(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        return model([torch.randn(16, 3, 4, 6, generator=g)], torch.tensor([700.0]), [torch.randn(5, 32, generator=g)],
                     clip_fea=torch.randn(1, 257, 1280, generator=g), y=[torch.randn(20, 3, 4, 6, generator=g)])[0]


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_every_key_format_merges_the_formula(i2v_model, fmt):
    before = {k: v.clone() for k, v in i2v_model.state_dict().items()}
    pairs = make_pairs(i2v_model)
    strength = 0.7
    with_alpha = FORMATS[fmt][3]
    [report] = apply_loras(i2v_model, [(lora_state(pairs, fmt), strength)])
    assert sorted(report.patched) == sorted(f"{name}.weight" for name in TARGETS) and not report.unmatched_keys
    after = i2v_model.state_dict()
    for name, (down, up, alpha) in pairs.items():
        expected = expected_weight(before[f"{name}.weight"], down, up, alpha if with_alpha else RANK, strength)
        assert relative_error(after[f"{name}.weight"], expected) <= 1e-6, name
    untouched = [k for k in before if k not in {f"{n}.weight" for n in TARGETS}]
    assert all(torch.equal(before[k], after[k]) for k in untouched)


def test_merged_forward_equals_runtime_lora(tiny_checkpoints, i2v_model):
    """Independent check: the unmerged model with LoRA added at run time by forward hooks."""
    reference = load_wan_model(tiny_checkpoints["i2v"][0], base_precision="fp32")
    pairs = make_pairs(reference, seed=3)
    strength = 1.3
    for name, (down, up, alpha) in pairs.items():
        def add_lora(module, inputs, output, down=down, up=up, alpha=alpha):
            return output + strength * alpha / RANK * F.linear(F.linear(inputs[0], down), up)
        reference.get_submodule(name).register_forward_hook(add_lora)
    apply_loras(i2v_model, [(lora_state(pairs, "comfy_kohya"), strength)])
    expected = forward_once(reference)
    assert relative_error(forward_once(i2v_model), expected) <= 1e-5
    assert relative_error(forward_once(load_wan_model(tiny_checkpoints["i2v"][0], base_precision="fp32")),
                          expected) > 1e-3  # the LoRA changes the output


def test_diff_keys_patch_biases_norms_and_modulation(i2v_model):
    g = torch.Generator().manual_seed(1)
    before = {k: v.clone() for k, v in i2v_model.named_parameters()}
    targets = {  # lora key -> parameter it must change
        "diffusion_model.blocks.0.self_attn.q.diff_b": "blocks.0.self_attn.q.bias",
        "diffusion_model.blocks.1.ffn.2.diff_b": "blocks.1.ffn.2.bias",
        "diffusion_model.blocks.0.norm3.diff": "blocks.0.norm3.weight",
        "diffusion_model.blocks.0.norm3.diff_b": "blocks.0.norm3.bias",
        "diffusion_model.blocks.2.cross_attn.norm_k_img.diff": "blocks.2.cross_attn.norm_k_img.weight",
        "diffusion_model.blocks.1.diff_m": "blocks.1.modulation",
        "diffusion_model.head.modulation.diff": "head.modulation",
        "diffusion_model.head.head.diff": "head.head.weight",
        "transformer.blocks.3.attn2.to_out.0.lora_B.bias": "blocks.3.cross_attn.o.bias",
    }
    state = {key: torch.randn(before[param].shape, generator=g) for key, param in targets.items()}
    strength = -0.4
    [report] = apply_loras(i2v_model, [(state, strength)])
    assert sorted(report.patched) == sorted(targets.values())
    after = dict(i2v_model.named_parameters())
    for key, param in targets.items():
        assert relative_error(after[param], before[param] + strength * state[key]) <= 1e-6, key
    assert all(torch.equal(before[k], after[k]) for k in before if k not in targets.values())


def test_conv_patch_embedding_lora(i2v_model):
    """ComfyUI-style conv LoRA: down is a conv kernel, up a 1x1x1 conv; the update is their product."""
    g = torch.Generator().manual_seed(2)
    weight = i2v_model.patch_embedding.weight.detach().clone()  # [dim, in, 1, 2, 2]
    down = torch.randn(RANK, *weight.shape[1:], generator=g)
    up = torch.randn(weight.shape[0], RANK, 1, 1, 1, generator=g)
    apply_loras(i2v_model, [({"diffusion_model.patch_embedding.lora_down.weight": down,
                              "diffusion_model.patch_embedding.lora_up.weight": up}, 0.1)])
    expected = weight + 0.1 * torch.einsum("or,rikhw->oikhw", up[:, :, 0, 0, 0], down)
    assert relative_error(i2v_model.patch_embedding.weight, expected) <= 1e-6


def test_chained_loras_add_up_in_order(tiny_checkpoints, i2v_model):
    first, second = make_pairs(i2v_model, seed=4), make_pairs(i2v_model, dict.fromkeys(list(TARGETS)[:3]), seed=5)
    weights = {n: i2v_model.get_submodule(n).weight.detach().clone() for n in TARGETS}
    apply_loras(i2v_model, [(lora_state(first, "musubi"), 0.5), (lora_state(second, "diffusers"), -1.0)])
    for name in TARGETS:
        expected = expected_weight(weights[name], *first[name], 0.5)
        if name in second:
            down, up, _ = second[name]
            expected = expected_weight(expected, down, up, RANK, -1.0)  # diffusers format: no alpha
        assert relative_error(i2v_model.get_submodule(name).weight, expected) <= 1e-6
    one_by_one = load_wan_model(tiny_checkpoints["i2v"][0], base_precision="fp32")
    apply_loras(one_by_one, [(lora_state(first, "musubi"), 0.5)])
    apply_loras(one_by_one, [(lora_state(second, "diffusers"), -1.0)])
    assert relative_error(forward_once(one_by_one), forward_once(i2v_model)) <= 1e-6


def test_zero_strength_changes_nothing(i2v_model):
    before = {k: v.clone() for k, v in i2v_model.state_dict().items()}
    apply_loras(i2v_model, [(lora_state(make_pairs(i2v_model), "comfy_kohya"), 0.0)])
    assert all(torch.equal(before[k], v) for k, v in i2v_model.state_dict().items())


@pytest.mark.parametrize("quantization", ["fp8_e4m3fn", "fp8_e5m2"])
def test_fp8_weights_are_dequantized_merged_and_requantized(tiny_checkpoints, quantization):
    path = tiny_checkpoints["i2v"][0]
    model = load_wan_model(path, base_precision="fp32", quantization=quantization)
    layer = model.blocks[0].self_attn.q
    assert isinstance(layer, FP8Linear)
    fp8_dtype, old_scale = layer.weight.dtype, layer.scale_weight.clone()
    dequantized = layer.dequantized_weight(torch.float32)
    pairs = make_pairs(model, {"blocks.0.self_attn.q": None, "head.head": None})
    down, up, alpha = pairs["blocks.0.self_attn.q"]
    strength = 4.0
    apply_loras(model, [(lora_state(pairs, "comfy_kohya"), strength)])

    expected = expected_weight(dequantized, down, up, alpha, strength)
    assert layer.weight.dtype == fp8_dtype and layer.scale_weight.dtype == torch.float32
    assert torch.allclose(layer.scale_weight, expected.abs().max() / torch.finfo(fp8_dtype).max)
    assert not torch.equal(layer.scale_weight, old_scale)
    merged = layer.dequantized_weight(torch.float32)
    rounding = torch.finfo(fp8_dtype).eps / 2  # half an ulp, relative
    assert relative_error(merged, expected) <= rounding
    # the update is far above the fp8 rounding error: it was merged, not rounded away
    assert relative_error(expected, dequantized) > 5 * relative_error(merged, expected)
    # the head stays in the base precision: merged exactly
    head_down, head_up, head_alpha = pairs["head.head"]
    reference = load_wan_model(path, base_precision="fp32").head.head.weight
    assert relative_error(model.head.head.weight, expected_weight(reference, head_down, head_up, head_alpha,
                                                                   strength)) <= 1e-6


def test_bf16_weights_keep_dtype_and_merge_in_float32(tiny_checkpoints):
    model = load_wan_model(tiny_checkpoints["i2v"][0], base_precision="bf16")
    weight = model.blocks[1].ffn[0].weight
    original = weight.detach().clone()
    pairs = make_pairs(model, {"blocks.1.ffn.0": None})
    apply_loras(model, [(lora_state(pairs, "comfy_peft"), 0.8)])
    down, up, _ = pairs["blocks.1.ffn.0"]
    assert weight.dtype == torch.bfloat16 and model.blocks[1].ffn[0].weight is weight  # same Parameter, in place
    assert torch.equal(weight, expected_weight(original, down, up, RANK, 0.8).to(torch.bfloat16))


def test_lora_file_roundtrip_and_pickle_refused(tmp_path, i2v_model):
    pairs = make_pairs(i2v_model)
    path = tmp_path / "style.safetensors"
    save_file(lora_state(pairs, "musubi"), str(path))
    assert set(load_lora_state(path)) == set(lora_state(pairs, "musubi"))
    [report] = apply_loras(i2v_model, [(str(path), 1.0)])
    assert report.name == "style.safetensors" and len(report.patched) == len(TARGETS)

    marker = tmp_path / "unpickled"
    payload = pickle.dumps(Exploit(str(marker)))
    for name in ("evil.safetensors", "evil.pt", "evil.ckpt"):
        (tmp_path / name).write_bytes(payload)
        with pytest.raises(ValueError, match="pickle"):
            load_lora_state(tmp_path / name)
    assert not marker.exists()
    (tmp_path / "junk.safetensors").write_bytes(b"\x05\x00\x00\x00\x00\x00\x00\x00{junk")
    with pytest.raises(ValueError, match="not a valid safetensors"):
        load_lora_state(tmp_path / "junk.safetensors")
    with pytest.raises(FileNotFoundError, match="missing.safetensors"):
        load_lora_state(tmp_path / "missing.safetensors")


class Exploit:
    """Unpickling this creates a file: proof that a refused file was never unpickled."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return open, (self.marker, "w")


def test_unmatched_keys_warn_with_count_and_examples(i2v_model, caplog):
    state = lora_state(make_pairs(i2v_model), "comfy_kohya")
    state["diffusion_model.blocks.99.self_attn.q.lora_down.weight"] = torch.zeros(RANK, 64)
    state["diffusion_model.blocks.99.self_attn.q.lora_up.weight"] = torch.zeros(64, RANK)
    state["lora_te_text_model_encoder_layers_0_mlp_fc1.lora_down.weight"] = torch.zeros(RANK, 8)
    with caplog.at_level(logging.WARNING, logger="wanvideo.lora"):
        [report] = apply_loras(i2v_model, [(state, 1.0)])
    assert len(report.unmatched_keys) == 3 and len(report.patched) == len(TARGETS)
    [record] = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert "3 of" in record.getMessage() and "blocks.99" in record.getMessage()


@pytest.mark.parametrize("key, architecture", [
    ("lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight", "Flux or HunyuanVideo"),
    ("transformer.single_transformer_blocks.0.attn.to_q.lora_A.weight", "Flux or HunyuanVideo"),
    ("lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight", "Stable Diffusion"),
    ("model.diffusion_model.input_blocks.1.1.proj_in.lora_down.weight", "Stable Diffusion"),
    ("transformer.transformer_blocks.0.attn1.to_q.lora_A.weight", "another diffusers transformer"),
    ("lora_te_text_model_encoder_layers_0_mlp_fc1.lora_down.weight", "text encoder"),
])
def test_lora_of_another_architecture_is_named(i2v_model, key, architecture):
    with pytest.raises(ValueError, match=architecture) as error:
        apply_loras(i2v_model, [({key: torch.zeros(RANK, 8)}, 1.0)])
    assert key in str(error.value)


def test_lora_matching_nothing_is_an_error(i2v_model):
    with pytest.raises(ValueError, match="matches no module"):
        apply_loras(i2v_model, [({"something.else.lora_down.weight": torch.zeros(2, 2)}, 1.0)])


def test_shape_and_rank_mismatch_name_key_and_shapes(i2v_model):
    before = i2v_model.blocks[0].self_attn.q.weight.detach().clone()
    stem = "diffusion_model.blocks.0.self_attn.q"
    with pytest.raises(ValueError, match=r"rank mismatch.*lora_down.weight.*rank 4.*\[64, 8\]"):
        apply_loras(i2v_model, [({f"{stem}.lora_down.weight": torch.zeros(RANK, 64),
                                  f"{stem}.lora_up.weight": torch.zeros(64, 8)}, 1.0)])
    with pytest.raises(ValueError, match=r"\[5120, 4\].*\[4, 5120\].*\[64, 64\].*another Wan model"):
        apply_loras(i2v_model, [({f"{stem}.lora_down.weight": torch.zeros(RANK, 5120),
                                  f"{stem}.lora_up.weight": torch.zeros(5120, RANK)}, 1.0)])
    with pytest.raises(ValueError, match=r"diff_b.*\[32\].*\[64\]"):
        apply_loras(i2v_model, [({f"{stem}.diff_b": torch.zeros(32)}, 1.0)])
    with pytest.raises(ValueError, match="no matching up"):
        apply_loras(i2v_model, [({f"{stem}.lora_down.weight": torch.zeros(RANK, 64)}, 1.0)])
    with pytest.raises(ValueError, match="LoHa"):
        apply_loras(i2v_model, [({f"{stem}.hada_w1_a": torch.zeros(RANK, 64)}, 1.0)])
    with pytest.raises(TypeError, match="strength"):
        apply_loras(i2v_model, [{f"{stem}.diff_b": torch.zeros(64)}])
    # a failed call merges nothing, even for the LoRAs listed before the bad one
    good = lora_state(make_pairs(i2v_model), "comfy_kohya")
    with pytest.raises(ValueError):
        apply_loras(i2v_model, [(good, 1.0), ({f"{stem}.diff_b": torch.zeros(32)}, 1.0)])
    assert torch.equal(i2v_model.blocks[0].self_attn.q.weight, before)


@pytest.mark.parametrize("model_type", ["t2v", "i2v", "flf2v"])
def test_key_map_is_unambiguous_and_covers_every_parameter(tiny_checkpoints, model_type):
    model = load_wan_model(tiny_checkpoints[model_type][0], base_precision="fp32")
    key_map = build_key_map(model)  # raises if one alias named two modules
    owners = set(key_map.values())
    for name, _ in model.named_parameters():
        module, _, attribute = name.rpartition(".")
        assert (module if attribute in ("weight", "bias") else name) in owners, name
    assert key_map["lora_unet_blocks_3_cross_attn_norm_k_img"] == "blocks.3.cross_attn.norm_k_img" \
        if model_type != "t2v" else "lora_unet_blocks_3_cross_attn_norm_k_img" not in key_map
