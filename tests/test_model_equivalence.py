"""Our WanModel, loaded by our loader, against diffusers' WanTransformer3DModel holding the same weights.

diffusers is an independent implementation of Wan 2.1 and ships its own key conversion for the
original checkpoints, so agreement proves the architecture and the key mapping at once.
"""
import pytest
import torch
from diffusers import WanTransformer3DModel
from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers
from safetensors.torch import load_file

from conftest import relative_error
from wanvideo import load_wan_model
from wanvideo.tiny import make_tiny_checkpoint

TEXT_TOKENS = 512  # diffusers' i2v attention splits image from text tokens assuming 512 text tokens
# (channels, frames, height, width) of latents: odd frame counts, non-square, single frame
SHAPES = [(5, 6, 10), (1, 4, 4), (3, 8, 6), (4, 2, 14)]


def diffusers_model(path, config):
    """diffusers' model of the same config, holding the file's weights through diffusers' own converter."""
    head_dim = config["dim"] // config["num_heads"]
    image = config["model_type"] != "t2v"
    model = WanTransformer3DModel(
        patch_size=config["patch_size"], num_attention_heads=config["num_heads"], attention_head_dim=head_dim,
        in_channels=config["in_dim"], out_channels=config["out_dim"], text_dim=config["text_dim"],
        freq_dim=config["freq_dim"], ffn_dim=config["ffn_dim"], num_layers=config["num_layers"],
        cross_attn_norm=config["cross_attn_norm"], qk_norm="rms_norm_across_heads", eps=config["eps"],
        image_dim=1280 if image else None, added_kv_proj_dim=config["dim"] if image else None,
        pos_embed_seq_len=2 * 257 if config["model_type"] == "flf2v" else None)
    state = convert_wan_transformer_to_diffusers(load_file(str(path)))
    if "img_emb.emb_pos" in state:  # not in diffusers' rename table
        state["condition_embedder.image_embedder.pos_embed"] = state.pop("img_emb.emb_pos")
    model.load_state_dict(state, strict=True)
    return model.eval()


def make_inputs(model_type, grids, text_lengths, generator):
    """Official-format inputs for a batch of videos with the given latent grids (F, H, W)."""
    x = [torch.randn(16, *g, generator=generator) for g in grids]
    t = torch.rand(len(grids), generator=generator, dtype=torch.float64).float() * 1000
    context = [torch.randn(n, 32, generator=generator) for n in text_lengths]
    clip_fea = y = None
    if model_type != "t2v":
        images = 2 if model_type == "flf2v" else 1
        clip_fea = torch.randn(len(grids) * images, 257, 1280, generator=generator)
        y = [torch.randn(20, *g, generator=generator) for g in grids]
    return x, t, context, clip_fea, y


def diffusers_forward(model, x, t, context, clip_fea, y, sample):
    """One sample through diffusers: text zero-padded to 512 tokens as the Wan pipelines do."""
    hidden = torch.cat([x[sample], y[sample]]) if y is not None else x[sample]
    text = torch.zeros(1, TEXT_TOKENS, context[sample].shape[1])
    text[0, : context[sample].shape[0]] = context[sample]
    image = None
    if clip_fea is not None:
        per_sample = clip_fea.shape[0] // len(x)
        image = clip_fea[sample * per_sample:(sample + 1) * per_sample]
    with torch.no_grad():
        return model(hidden[None], t[sample:sample + 1], text, encoder_hidden_states_image=image).sample[0]


@pytest.mark.parametrize("model_type", ["t2v", "i2v", "flf2v"])
@pytest.mark.parametrize("prefix", ["", "model.diffusion_model."])
def test_matches_diffusers(tmp_path, model_type, prefix):
    path, config, _ = make_tiny_checkpoint(tmp_path / "wan.safetensors", model_type, prefix=prefix, seed=3)
    ours = load_wan_model(path, device="cpu", base_precision="fp32")
    reference = diffusers_model(path, config)
    generator = torch.Generator().manual_seed(0)
    for grid in SHAPES:
        x, t, context, clip_fea, y = make_inputs(model_type, [grid], [7], generator)
        with torch.no_grad():
            out = ours(x, t, context, seq_len=10_000, clip_fea=clip_fea, y=y)[0]
        expected = diffusers_forward(reference, x, t, context, clip_fea, y, 0)
        assert out.shape == (16, *grid)
        assert relative_error(out, expected) <= 1e-5, (grid, relative_error(out, expected))


@pytest.mark.parametrize("model_type", ["t2v", "i2v"])
def test_batches_match_per_sample_reference(tiny_checkpoints, model_type):
    """A batch of equal shapes, and a ragged batch (padding + key mask), equal diffusers sample by sample."""
    path, config, _ = tiny_checkpoints[model_type]
    ours = load_wan_model(path, base_precision="fp32")
    reference = diffusers_model(path, config)
    generator = torch.Generator().manual_seed(1)
    for grids in ([(3, 4, 6), (3, 4, 6)], [(3, 4, 6), (2, 6, 4), (1, 2, 2)]):
        x, t, context, clip_fea, y = make_inputs(model_type, grids, [5, 9, 3][: len(grids)], generator)
        with torch.no_grad():
            outs = ours(x, t, context, clip_fea=clip_fea, y=y)
        for i, out in enumerate(outs):
            assert relative_error(out, diffusers_forward(reference, x, t, context, clip_fea, y, i)) <= 1e-5


def test_official_signature_and_errors(tiny_checkpoints):
    path, _, _ = tiny_checkpoints["i2v"]
    model = load_wan_model(path, base_precision="fp32")
    x, t, context, clip_fea, y = make_inputs("i2v", [(2, 4, 4)], [4], torch.Generator().manual_seed(2))
    with pytest.raises(ValueError, match="clip_fea"):
        model(x, t, context, seq_len=100, y=y)
    with pytest.raises(ValueError, match="seq_len=3"):
        model(x, t, context, seq_len=3, clip_fea=clip_fea, y=y)
    with pytest.raises(ValueError, match="36 input channels"):
        model(x, t, context, seq_len=100, clip_fea=clip_fea, y=[u[:4] for u in y])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precisions_close_to_fp32(tiny_checkpoints, dtype):
    path, _, _ = tiny_checkpoints["t2v"]
    reference = load_wan_model(path, base_precision="fp32")
    model = load_wan_model(path, base_precision=dtype)
    assert model.head.head.weight.dtype == dtype
    x, t, context, _, _ = make_inputs("t2v", [(3, 4, 6)], [6], torch.Generator().manual_seed(4))
    with torch.no_grad():
        error = relative_error(model(x, t, context)[0], reference(x, t, context)[0])
    assert 0 < error < 0.05, error
