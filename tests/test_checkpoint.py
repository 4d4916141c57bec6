"""Header inspection, prefixes, fp8 storage, and a clear error for every bad input."""
import json
import pickle

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import relative_error
from wanvideo import CheckpointError, inspect_checkpoint, load_wan_model
from wanvideo.quantization import FP8Linear, quantize_weight
from wanvideo.tiny import make_header_only_checkpoint, make_tiny_checkpoint


def forward_once(model, model_type="t2v", seed=0):
    g = torch.Generator().manual_seed(seed)
    x = [torch.randn(16, 3, 4, 6, generator=g)]
    kwargs = {}
    if model_type != "t2v":
        kwargs = dict(clip_fea=torch.randn(1, 257, 1280, generator=g), y=[torch.randn(20, 3, 4, 6, generator=g)])
    with torch.no_grad():
        return model(x, torch.tensor([700.0]), [torch.randn(5, 32, generator=g)], **kwargs)[0]


@pytest.mark.parametrize("prefix", ["", "model.diffusion_model.", "diffusion_model.", "model."])
@pytest.mark.parametrize("model_type", ["t2v", "i2v", "flf2v"])
def test_inspect_detects_variant_and_prefix(tmp_path, prefix, model_type):
    path, config, state = make_tiny_checkpoint(tmp_path / "m.safetensors", model_type, prefix=prefix)
    info = inspect_checkpoint(path)
    assert info.prefix == prefix and info.model_type == model_type
    assert info.config == config
    assert info.num_parameters == sum(t.numel() for t in state.values())
    assert info.parameter_bytes == 4 * info.num_parameters
    assert len(info.block_bytes) == config["num_layers"]
    block_0 = sum(t.numel() for k, t in state.items() if k.startswith("blocks.0.")) * 4
    assert info.block_bytes[0] == block_0
    assert info.bytes_at(torch.float32) == (block_0, info.parameter_bytes - config["num_layers"] * block_0)


def test_real_size_configs_from_shapes_alone(tmp_path):
    """Without our metadata, the released sizes are recognised from tensor shapes (128 channels per head)."""
    for dim, ffn, heads, layers, name in [(1536, 8960, 12, 30, "1.3B"), (5120, 13824, 40, 40, "14B")]:
        config = dict(model_type="t2v", dim=dim, ffn_dim=ffn, num_heads=heads, num_layers=layers, in_dim=16,
                      text_dim=4096, freq_dim=256, out_dim=16)
        path = make_header_only_checkpoint(tmp_path / f"wan_{name}.safetensors", config)  # sparse: no data
        info = inspect_checkpoint(path)
        assert info.size_name == name and info.num_layers == layers
        assert info.config["num_heads"] == heads and info.config["ffn_dim"] == ffn
        assert info.stored_dtype == torch.bfloat16
        assert abs(info.num_parameters / 1e9 - {"1.3B": 1.42, "14B": 14.29}[name]) < 0.05


@pytest.mark.parametrize("fp8", ["fp8_e4m3fn", "fp8_e5m2"])
def test_fp8_storage_of_block_linears(tiny_checkpoints, fp8):
    path, _, _ = tiny_checkpoints["t2v"]
    model = load_wan_model(path, base_precision="fp32", quantization=fp8)
    q = model.blocks[0].self_attn.q
    assert isinstance(q, FP8Linear) and q.weight.dtype == getattr(torch, fp8.replace("fp8_", "float8_"))
    assert q.bias.dtype == torch.float32 and model.blocks[0].modulation.dtype == torch.float32
    assert model.text_embedding[0].weight.dtype == torch.float32 and model.head.head.weight.dtype == torch.float32
    reference = load_wan_model(path, base_precision="fp32")
    error = relative_error(forward_once(model), forward_once(reference))
    print(f"{fp8} storage: relative L2 error of the output against fp32: {error:.4f}")
    assert 0 < error < (0.05 if fp8 == "fp8_e4m3fn" else 0.1)


@pytest.mark.parametrize("with_scale", [True, False])
def test_checkpoints_stored_in_fp8_load(tmp_path, tiny_checkpoints, with_scale):
    """Files already in fp8 (ComfyUI's scaled fp8 with scale_weight keys, or plain fp8) load in both modes."""
    path, _, state = tiny_checkpoints["t2v"]
    stored = {}
    for key, tensor in state.items():
        if key.startswith("blocks.") and key.endswith(".weight") and tensor.ndim == 2:
            weight, scale = quantize_weight(tensor, torch.float8_e4m3fn) if with_scale else \
                (tensor.to(torch.float8_e4m3fn), None)
            stored["model.diffusion_model." + key] = weight
            if scale is not None:
                stored["model.diffusion_model." + key.replace(".weight", ".scale_weight")] = scale
        else:
            stored["model.diffusion_model." + key] = tensor
    if with_scale:
        stored["scaled_fp8"] = torch.zeros(0, dtype=torch.float8_e4m3fn)
    fp8_path = tmp_path / "fp8.safetensors"
    save_file(stored, str(fp8_path), metadata={"wan_config": json.dumps(inspect_checkpoint(path).config)})
    assert inspect_checkpoint(fp8_path).fp8_scaled == with_scale

    dequantized = load_wan_model(fp8_path, base_precision="fp32")
    kept = load_wan_model(fp8_path, base_precision="fp32", quantization="fp8_e4m3fn")
    key = "blocks.1.ffn.0"
    expected = stored[f"model.diffusion_model.{key}.weight"].float()
    if with_scale:
        expected = expected * stored[f"model.diffusion_model.{key}.scale_weight"]
    assert torch.equal(dequantized.get_submodule(key).weight, expected)
    assert torch.equal(kept.get_submodule(key).weight, stored[f"model.diffusion_model.{key}.weight"])  # bytes kept
    assert torch.allclose(forward_once(kept), forward_once(dequantized), rtol=1e-5, atol=1e-5)
    assert relative_error(forward_once(dequantized), forward_once(load_wan_model(path, base_precision="fp32"))) < 0.05


# --- bad inputs: each gets an error that says what was found and what to do --------------------------

def test_missing_path(tmp_path):
    with pytest.raises(CheckpointError, match="not found.*diffusion_models"):
        load_wan_model(tmp_path / "nope.safetensors")


def test_folder_instead_of_file(tmp_path):
    with pytest.raises(CheckpointError, match="is a folder"):
        inspect_checkpoint(tmp_path)


def test_not_a_safetensors_file(tmp_path):
    path = tmp_path / "notes.safetensors"
    path.write_text("this is a text file, not a model" * 10)
    with pytest.raises(CheckpointError, match="not a readable safetensors file.*download it again"):
        inspect_checkpoint(path)


def test_truncated_header(tmp_path, tiny_checkpoints):
    data = open(tiny_checkpoints["t2v"][0], "rb").read()
    path = tmp_path / "truncated.safetensors"
    path.write_bytes(data[:200])  # the header is longer than this
    with pytest.raises(CheckpointError, match="truncated"):
        inspect_checkpoint(path)
    path.write_bytes(data[:5])
    with pytest.raises(CheckpointError, match="too short"):
        inspect_checkpoint(path)


def test_corrupted_header(tmp_path, tiny_checkpoints):
    data = bytearray(open(tiny_checkpoints["t2v"][0], "rb").read())
    data[20:40] = b"#" * 20  # JSON syntax destroyed
    path = tmp_path / "corrupt.safetensors"
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="corrupted"):
        inspect_checkpoint(path)


def test_truncated_data(tmp_path, tiny_checkpoints):
    data = open(tiny_checkpoints["t2v"][0], "rb").read()
    path = tmp_path / "cut.safetensors"
    path.write_bytes(data[: len(data) // 2])  # header intact, tensors cut off
    with pytest.raises(CheckpointError, match="truncated"):
        load_wan_model(path, base_precision="fp32")


def test_other_architecture_is_named(tmp_path):
    path = tmp_path / "sdxl.safetensors"
    save_file({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(4, 4, 3, 3),
               "model.diffusion_model.output_blocks.0.0.weight": torch.zeros(4)}, str(path))
    with pytest.raises(CheckpointError, match="not a Wan 2.1 diffusion model.*Stable Diffusion 1.x/2.x/XL UNet"):
        inspect_checkpoint(path)


def test_missing_and_unexpected_keys_are_listed(tmp_path, tiny_checkpoints):
    state = load_file(str(tiny_checkpoints["t2v"][0]))
    del state["blocks.2.cross_attn.o.bias"]
    state["blocks.0.extra.weight"] = torch.zeros(3)
    path = tmp_path / "broken.safetensors"
    save_file(state, str(path), metadata={"wan_config": json.dumps(inspect_checkpoint(tiny_checkpoints["t2v"][0]).config)})
    with pytest.raises(CheckpointError, match=r"1 missing keys \(first: blocks.2.cross_attn.o.bias\).*"
                                              r"1 unexpected keys \(first: blocks.0.extra.weight\)"):
        load_wan_model(path)


@pytest.mark.parametrize("suffix", [".pt", ".pth", ".ckpt"])
def test_pickle_checkpoints_are_refused_unopened(tmp_path, suffix):
    marker = tmp_path / "unpickled"

    class Exploit:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    path = tmp_path / f"model{suffix}"
    path.write_bytes(pickle.dumps({"weights": Exploit()}))
    with pytest.raises(CheckpointError, match="pickle checkpoint.*never opened"):
        load_wan_model(path)
    renamed = tmp_path / "disguised.safetensors"  # a pickle with the wrong extension is caught by its bytes
    torch.save({"w": torch.zeros(2)}, renamed)
    with pytest.raises(CheckpointError, match="pickle checkpoint"):
        inspect_checkpoint(renamed)
    assert not marker.exists()


def test_bad_precision_and_quantization(tiny_checkpoints):
    path = tiny_checkpoints["t2v"][0]
    with pytest.raises(ValueError, match="'fp64' is not one of fp32, bf16, fp16"):
        load_wan_model(path, base_precision="fp64")
    with pytest.raises(ValueError, match="'int4' is not one of"):
        load_wan_model(path, quantization="int4")
    with pytest.raises(ImportError, match="flash-attn.*choose 'sdpa'"):
        load_wan_model(path, attention_mode="flash_attn")


def test_safetensors_whose_header_length_starts_like_a_pickle_loads(tmp_path, tiny_checkpoints):
    """A header length whose first byte is 0x80 (the pickle PROTO opcode) is still a safetensors file."""
    state = load_file(str(tiny_checkpoints["t2v"][0]))
    config = json.dumps(inspect_checkpoint(tiny_checkpoints["t2v"][0]).config)
    path = tmp_path / "odd_header.safetensors"
    for padding in range(256):
        save_file(state, str(path), metadata={"wan_config": config, "pad": "x" * padding})
        if path.read_bytes()[0] == 0x80:
            break
    assert path.read_bytes()[0] == 0x80
    assert inspect_checkpoint(path).model_type == "t2v"
    from wanvideo.lora import load_lora_state
    assert len(load_lora_state(path)) == len(state)
