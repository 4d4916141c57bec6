"""Wan 2.2 in the model and loading floors: TI2V-5B and I2V-A14B shapes against diffusers (an
independent implementation of Wan 2.2, with its own key conversion), per-token timesteps through
every strategy, detection from the header, and the Wan22 latent format.
"""

import pytest
import torch
from diffusers import WanTransformer3DModel
from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers
from safetensors.torch import load_file

from conftest import relative_error
from wanvideo import inspect_checkpoint, load_wan_model
from wanvideo.checkpoint import build_meta_model
from wanvideo.latent_format import (WAN21, WAN22, WAN22_LATENTS_MEAN, WAN22_LATENTS_STD, denormalize_latents,
                                    latent_format_for, latent_frame_count, latents_to_rgb, normalize_latents)
from wanvideo.modules.model import WanModel
from wanvideo.parallel.block_distribution import distribute_model_blocks
from wanvideo.parallel.data_parallel import DataParallelWan
from wanvideo.tiny import make_header_only_checkpoint, make_tiny_checkpoint, make_tiny_expert_pair

TEXT_TOKENS = 512
CPU = torch.device("cpu")
GRIDS = [(3, 4, 6), (1, 4, 4), (5, 6, 10), (2, 2, 14)]   # latent (frames, height, width)


def diffusers_model(path, config):
    """diffusers' WanTransformer3DModel of the same config holding the file's weights (its own converter)."""
    image = config["image_embedding"]
    model = WanTransformer3DModel(
        patch_size=config["patch_size"], num_attention_heads=config["num_heads"],
        attention_head_dim=config["dim"] // config["num_heads"], in_channels=config["in_dim"],
        out_channels=config["out_dim"], text_dim=config["text_dim"], freq_dim=config["freq_dim"],
        ffn_dim=config["ffn_dim"], num_layers=config["num_layers"], cross_attn_norm=config["cross_attn_norm"],
        qk_norm="rms_norm_across_heads", eps=config["eps"], image_dim=1280 if image else None,
        added_kv_proj_dim=config["dim"] if image else None)
    model.load_state_dict(convert_wan_transformer_to_diffusers(load_file(str(path))), strict=True)
    return model.eval()


def diffusers_forward(model, x, t, text, y=None):
    """One sample: x [C, F, H, W], t a [1] or per-token [1, L] timestep, text [Lt, text_dim] (zero-padded
    to 512 tokens as the Wan pipelines do)."""
    hidden = x if y is None else torch.cat([x, y])
    padded = torch.zeros(1, TEXT_TOKENS, text.shape[1])
    padded[0, : text.shape[0]] = text
    with torch.no_grad():
        return model(hidden[None], t, padded).sample[0]


def tokens_of(grid):
    f, h, w = grid
    return f * (h // 2) * (w // 2)


def first_frame_clean(grid, t):
    """TI2V image-to-video timesteps [1, L]: 0 on the tokens of latent frame 0, t elsewhere (the
    official mask2[0][0][:, ::2, ::2] * t, flattened in (F, H, W) token order)."""
    f, h, w = grid
    mask = torch.ones(f, h // 2, w // 2)
    mask[0] = 0
    return (mask * t).flatten()[None]


@pytest.fixture(scope="module")
def tiny22(tmp_path_factory):
    """{name: (path, config, state)}: TI2V-5B-like (48 channels) and I2V-A14B-like (no CLIP) tiny models."""
    folder = tmp_path_factory.mktemp("wan22")
    return {"ti2v": make_tiny_checkpoint(folder / "wan2.2_tiny_ti2v.safetensors", "ti2v", seed=5),
            "i2v": make_tiny_checkpoint(folder / "wan2.2_tiny_i2v.safetensors", "i2v", seed=6, image_embedding=False)}


# --- against diffusers -------------------------------------------------------------------------------

@pytest.mark.parametrize("per_token_shape", [False, True], ids=["t [1]", "t [1, L] constant"])
def test_ti2v_text_to_video_matches_diffusers(tiny22, per_token_shape):
    """TI2V-5B shapes: 48 channels in and out; Wan 2.2's t2v passes t as [1, seq_len], all equal."""
    path, config, _ = tiny22["ti2v"]
    ours, reference = load_wan_model(path, base_precision="fp32"), diffusers_model(path, config)
    g = torch.Generator().manual_seed(0)
    for grid in GRIDS:
        x, text = torch.randn(48, *grid, generator=g), torch.randn(7, 32, generator=g)
        t = torch.tensor([613.0])
        t = t[:, None].expand(1, tokens_of(grid)) if per_token_shape else t
        with torch.no_grad():
            out = ours([x], t, [text], seq_len=tokens_of(grid))[0]
        assert out.shape == (48, *grid)
        assert relative_error(out, diffusers_forward(reference, x, t, text)) <= 1e-5, grid


def test_ti2v_per_token_image_to_video_matches_diffusers(tiny22):
    """Per-token timesteps (diffusers' expand_timesteps): the clean first frame's tokens at t = 0."""
    path, config, _ = tiny22["ti2v"]
    ours, reference = load_wan_model(path, base_precision="fp32"), diffusers_model(path, config)
    g = torch.Generator().manual_seed(1)
    for grid in GRIDS:
        x, text = torch.randn(48, *grid, generator=g), torch.randn(9, 32, generator=g)
        t = first_frame_clean(grid, 875.0)
        with torch.no_grad():
            out = ours([x], t, [text], seq_len=tokens_of(grid))[0]
        assert relative_error(out, diffusers_forward(reference, x, t, text)) <= 1e-5, grid


def test_per_token_batches_ragged_and_arbitrary_timesteps_match_diffusers(tiny22):
    """A batch of two sizes (padding and key mask) with its own per-token t each, one of them a different
    timestep on every token (the general case: as many table rows as tokens), padded to a common seq_len."""
    path, config, _ = tiny22["ti2v"]
    ours, reference = load_wan_model(path, base_precision="fp32"), diffusers_model(path, config)
    g = torch.Generator().manual_seed(2)
    grids = [(3, 4, 6), (2, 6, 4)]
    x = [torch.randn(48, *grid, generator=g) for grid in grids]
    text = [torch.randn(5, 32, generator=g), torch.randn(8, 32, generator=g)]
    seq_len = 20
    t = torch.stack([torch.nn.functional.pad(first_frame_clean(grids[0], 400.0)[0], (0, seq_len - 18), value=400.0),
                     torch.rand(seq_len, generator=g) * 1000])
    with torch.no_grad():
        outs = ours(x, t, text, seq_len=seq_len)
    for i, grid in enumerate(grids):
        expected = diffusers_forward(reference, x[i], t[i:i + 1, :tokens_of(grid)], text[i])
        assert relative_error(outs[i], expected) <= 1e-5, grid


def test_i2v_a14b_without_clip_matches_diffusers(tiny22):
    """I2V-A14B shapes: in_dim 36 (noise + mask + image latents), no img_emb, no k_img / v_img."""
    path, config, state = tiny22["i2v"]
    assert not any("img_emb" in k or "k_img" in k for k in state)
    ours, reference = load_wan_model(path, base_precision="fp32"), diffusers_model(path, config)
    g = torch.Generator().manual_seed(3)
    for grid in GRIDS[:3]:
        x, y = torch.randn(16, *grid, generator=g), torch.randn(20, *grid, generator=g)
        text = torch.randn(6, 32, generator=g)
        t = torch.tensor([901.0])
        with torch.no_grad():
            out = ours([x], t, [text], y=[y])[0]
            ignored_clip = ours([x], t, [text], clip_fea=torch.randn(1, 257, 1280, generator=g), y=[y])[0]
        assert out.shape == (16, *grid)
        assert relative_error(out, diffusers_forward(reference, x, t, text, y)) <= 1e-5, grid
        assert torch.equal(out, ignored_clip)  # as ComfyUI: CLIP features are ignored by a model without img_emb


# --- the uniform path is unchanged ---------------------------------------------------------------------

def test_uniform_t_is_bit_identical_to_the_same_t_per_token(tiny22, tiny_checkpoints):
    for path in (tiny22["ti2v"][0], tiny_checkpoints["t2v"][0]):
        model = load_wan_model(path, base_precision="fp32")
        channels = model.in_dim
        g = torch.Generator().manual_seed(4)
        x = [torch.randn(channels, 3, 4, 6, generator=g) for _ in range(2)]
        text = [torch.randn(5, 32, generator=g) for _ in range(2)]
        t = torch.tensor([700.0, 250.0])
        with torch.no_grad():
            uniform = model(x, t, text)
            tokens, ctx, e, _ = model.embed(x, t[:, None].expand(2, 18 + 5), text)
            assert ctx.e0_rows is None and ctx.e0.shape == (2, 6, model.dim)  # the [B] path, no table
            for expanded in (t[:, None].expand(2, 18), t[:, None].expand(2, 18 + 5)):  # seq_len >= L
                assert all(torch.equal(a, b) for a, b in zip(uniform, model(x, expanded, text)))


def test_per_token_t_is_a_table_of_distinct_timesteps(tiny22):
    """A 720p TI2V video has 27280 tokens and two timesteps: e0 stays [2, 6, dim], not [B, L, 6, dim]."""
    model = load_wan_model(tiny22["ti2v"][0], base_precision="fp32")
    grid = (3, 4, 6)
    with torch.no_grad():
        x, text = [torch.randn(48, *grid)] * 2, [torch.randn(3, 32)] * 2
        tokens, ctx, e, _ = model.embed(x, first_frame_clean(grid, 500.0), text)
    assert ctx.e0.shape == (2, 6, model.dim) and e.shape == (2, model.dim)
    assert ctx.e0_rows.shape == (2, tokens_of(grid))
    assert ctx.e0_rows[:, :6].eq(0).all() and ctx.e0_rows[:, 6:].eq(1).all()  # unique() sorts: 0 before 500
    half = ctx.select(slice(1, 2))  # a micro-batch keeps the whole table and its own rows
    assert half.e0.shape == (2, 6, model.dim) and half.e0_rows.shape == (1, tokens_of(grid))
    with pytest.raises(ValueError, match="e0_rows"):
        ctx.with_tokens(ctx.rope[:, :9], None)
    assert ctx.with_tokens(ctx.rope[:, :9], None, ctx.e0_rows[:, :9]).e0_rows.shape == (2, 9)


def test_model_errors_name_the_problem(tiny22):
    model = load_wan_model(tiny22["i2v"][0], base_precision="fp32")
    x, text = [torch.randn(16, 2, 4, 4)], [torch.randn(4, 32)]
    with pytest.raises(ValueError, match="needs y .*no CLIP image embedding"):
        model(x, torch.tensor([500.0]), text)
    ti2v = load_wan_model(tiny22["ti2v"][0], base_precision="fp32")
    with pytest.raises(ValueError, match="per-token t has 5 timesteps per sample; the latents make 8 tokens"):
        ti2v([torch.randn(48, 2, 4, 4)], torch.full((1, 5), 500.0), text)
    with pytest.raises(ValueError, match="48 input channels; got 16"):
        ti2v(x, torch.tensor([500.0]), text)
    with pytest.raises(ValueError, match="image_embedding=False does not fit model_type 'flf2v'"):
        WanModel("flf2v", image_embedding=False, dim=64, num_heads=4, num_layers=1)
    with pytest.raises(ValueError, match="'ti2v'"):
        WanModel("s2v")


# --- per-token t through the strategies ----------------------------------------------------------------

def _per_token_batch(grid=(3, 4, 6), seed=5):
    g = torch.Generator().manual_seed(seed)
    x = [torch.randn(48, *grid, generator=g) for _ in range(2)]
    text = [torch.randn(5, 32, generator=g), torch.randn(7, 32, generator=g)]
    t = torch.cat([first_frame_clean(grid, 900.0), first_frame_clean(grid, 300.0)])
    return x, t, text


def test_data_parallel_with_per_token_t(tiny22):
    model = load_wan_model(tiny22["ti2v"][0], base_precision="fp32")
    x, t, text = _per_token_batch()
    with torch.no_grad():
        expected = model(x, t, text)
    parallel = DataParallelWan([model, load_wan_model(tiny22["ti2v"][0], base_precision="fp32")], [CPU, CPU])
    try:
        outs = parallel(x, t, text)
    finally:
        parallel.close()
    assert all(relative_error(o, e) <= 1e-5 for o, e in zip(outs, expected))


@pytest.mark.parametrize("pipeline", [True, False], ids=["micro-batches", "stage after stage"])
def test_block_distribution_with_per_token_t(tiny22, pipeline):
    reference = load_wan_model(tiny22["ti2v"][0], base_precision="fp32")
    model = load_wan_model(tiny22["ti2v"][0], base_precision="fp32")
    distribute_model_blocks(model, [CPU, CPU], blocks_per_device=[1, 3], pipeline=pipeline)
    x, t, text = _per_token_batch(seed=6)
    with torch.no_grad():
        expected, outs = reference(x, t, text), model(x, t, text)
    assert all(relative_error(o, e) <= 1e-5 for o, e in zip(outs, expected))


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    """A 2-rank CPU worker group (gloo) on a tiny model of 3 heads, and the same model in this process."""
    from wanvideo.parallel.distributed import DistributedWanRunner
    path, _, _ = make_tiny_checkpoint(tmp_path_factory.mktemp("dist22") / "t2v.safetensors", "t2v", dim=96,
                                      num_heads=3)
    runner = DistributedWanRunner(path, [CPU] * 2, base_precision="fp32")
    yield runner, load_wan_model(path, CPU, "fp32")
    runner.shutdown()


@pytest.mark.parametrize("degrees", [(1, 2, 1), (1, 1, 2), (2, 1, 1)], ids=["ulysses", "ring", "cfg"])
def test_sequence_parallel_with_per_token_t(two_ranks, degrees):
    """A [B, L] timestep travels in the forward request; each sequence shard takes its slice of the
    per-token modulation rows (45 tokens: the second shard is padded)."""
    from wanvideo.parallel.distributed import ParallelDegrees
    from wanvideo.sampling.loop import Conditioning
    runner, model = two_ranks
    grid = (3, 6, 10)
    g = torch.Generator().manual_seed(7)
    x = torch.randn(1, 16, *grid, generator=g)
    positive = Conditioning([torch.randn(7, 32, generator=g)])
    negative = Conditioning([torch.randn(5, 32, generator=g)])
    t = first_frame_clean(grid, 700.0)
    out = runner.forward(x, t, positive, negative, cfg=3.0, degrees=ParallelDegrees(*degrees))
    with torch.no_grad():
        cond = model(list(x), t, positive.context)[0]
        uncond = model(list(x), t, negative.context)[0]
    assert relative_error(out[0], uncond + 3.0 * (cond - uncond)) <= 1e-5


# --- detection from the header ---------------------------------------------------------------------------

A14B = dict(dim=5120, ffn_dim=13824, num_heads=40, num_layers=40, text_dim=4096, freq_dim=256)


@pytest.mark.parametrize("file_name, config, expected", [
    ("wan2.2_ti2v_5B_fp16.safetensors", dict(model_type="ti2v", in_dim=48, out_dim=48, dim=3072, ffn_dim=14336,
                                             num_heads=24, num_layers=30, text_dim=4096, freq_dim=256),
     ("ti2v", "2.2", None, "Wan 2.2 TI2V 5B", 48, (4, 16, 16), 0)),
    ("wan2.2_i2v_high_noise_14B_fp16.safetensors", dict(model_type="i2v", in_dim=36, image_embedding=False, **A14B),
     ("i2v", "2.2", "high_noise", "Wan 2.2 I2V A14B (no CLIP) high-noise expert", 16, (4, 8, 8), 20)),
    ("diffusion_model.safetensors", dict(model_type="i2v", in_dim=36, image_embedding=False, **A14B),
     ("i2v", "2.2", None, "Wan 2.2 I2V A14B (no CLIP)", 16, (4, 8, 8), 20)),
    ("wan2.2_t2v_low_noise_14B_fp8_scaled.safetensors", dict(model_type="t2v", in_dim=16, **A14B),
     ("t2v", "2.2", "low_noise", "Wan 2.2 T2V A14B low-noise expert", 16, (4, 8, 8), 0)),
    ("t2v_14B.safetensors", dict(model_type="t2v", in_dim=16, **A14B),
     ("t2v", "2.1/2.2", None, "Wan 2.1/2.2 t2v 14B", 16, (4, 8, 8), 0)),
    ("wan2.1_t2v_14B_bf16.safetensors", dict(model_type="t2v", in_dim=16, **A14B),
     ("t2v", "2.1", None, "Wan 2.1 t2v 14B", 16, (4, 8, 8), 0)),
    ("wan2.1_i2v_480p_14B_bf16.safetensors", dict(model_type="i2v", in_dim=36, **A14B),
     ("i2v", "2.1", None, "Wan 2.1 i2v 14B", 16, (4, 8, 8), 20)),
    ("fun_control_1.3B.safetensors", dict(model_type="t2v", in_dim=48, dim=1536, ffn_dim=8960, num_heads=12,
                                          num_layers=30, text_dim=4096, freq_dim=256),  # 48 in, 16 out: not TI2V
     ("t2v", "2.1", None, "Wan 2.1 t2v 1.3B", 16, (4, 8, 8), 32)),
], ids=lambda v: v if isinstance(v, str) else None)
def test_real_size_variants_detected_from_the_header(tmp_path, file_name, config, expected):
    info = inspect_checkpoint(make_header_only_checkpoint(tmp_path / file_name, config))
    model_type, family, expert, name, channels, stride, condition = expected
    assert (info.model_type, info.family, info.expert, info.model_name) == (model_type, family, expert, name)
    assert (info.latent_channels, info.vae_stride, info.condition_channels) == (channels, stride, condition)
    assert info.latent_format is (WAN22 if channels == 48 else WAN21)
    assert info.summary().startswith(name + " (dim ")
    for key in ("dim", "ffn_dim", "num_heads", "num_layers", "in_dim"):
        assert info.config[key] == config[key], key
    assert info.image_embedding == config.get("image_embedding", model_type == "i2v")
    assert set(build_meta_model(info.config).state_dict()) == set(info.keys)  # the config builds this very file


def test_tiny_variants_and_expert_pair_detected(tmp_path, tiny22, tiny_checkpoints):
    for name, (path, config, _) in {**tiny22, **tiny_checkpoints}.items():
        info = inspect_checkpoint(path)
        assert info.config == config and info.model_type == config["model_type"], name
        load_wan_model(path, base_precision="fp32")  # strict keys
    assert inspect_checkpoint(tiny22["ti2v"][0]).model_name.startswith("Wan 2.2 TI2V ")
    assert inspect_checkpoint(tiny22["i2v"][0]).model_name.endswith("(no CLIP)")
    assert inspect_checkpoint(tiny_checkpoints["i2v"][0]).model_name.startswith("Wan 2.1 i2v ")
    for model_type in ("t2v", "i2v"):
        pair = make_tiny_expert_pair(tmp_path, model_type)
        high, low = (inspect_checkpoint(pair[e][0]) for e in ("high_noise", "low_noise"))
        assert (high.expert, low.expert, high.family, low.family) == ("high_noise", "low_noise", "2.2", "2.2")
        assert high.config == low.config and not high.image_embedding
        assert not torch.equal(pair["high_noise"][2]["head.head.weight"], pair["low_noise"][2]["head.head.weight"])


# --- the Wan22 latent format --------------------------------------------------------------------------

def test_wan22_latent_format_both_ways():
    g = torch.Generator().manual_seed(8)
    raw = torch.randn(2, 48, 3, 4, 5, generator=g, dtype=torch.float64)
    mean = torch.tensor(WAN22_LATENTS_MEAN, dtype=torch.float64).view(1, 48, 1, 1, 1)
    std = torch.tensor(WAN22_LATENTS_STD, dtype=torch.float64).view(1, 48, 1, 1, 1)
    expected = (raw - mean) * 1.0 / std   # ComfyUI Wan22.process_in (scale_factor 1.0)
    for fmt in (None, 48, "Wan22", WAN22):   # inferred from the channels, or given
        assert torch.allclose(normalize_latents(raw, fmt), expected)
        assert torch.allclose(denormalize_latents(normalize_latents(raw, fmt), fmt), raw)
    assert len(WAN22_LATENTS_MEAN) == len(WAN22_LATENTS_STD) == len(WAN22.rgb_factors) == 48
    wan21 = torch.randn(1, 16, 2, 3, 3, generator=g)
    assert torch.equal(normalize_latents(wan21), normalize_latents(wan21, "Wan21"))
    with pytest.raises(ValueError, match="48 channels; the Wan21 latent format has 16"):
        normalize_latents(raw, WAN21)
    with pytest.raises(ValueError, match="No Wan latent format for 20"):
        latent_format_for(20)
    assert latents_to_rgb(normalize_latents(raw)[0]).shape == (3, 4, 5, 3)


def test_latent_sizes_for_both_strides():
    assert WAN22.latent_shape(121, 704, 1280) == (48, 31, 44, 80)     # TI2V-5B at 720p: 31 * 22 * 40 tokens
    assert WAN21.latent_shape(81, 480, 832) == (16, 21, 60, 104)
    assert (WAN22.size_multiple, WAN21.size_multiple) == (32, 16)
    assert (WAN22.stride, WAN21.stride) == ((4, 16, 16), (4, 8, 8))
    assert latent_frame_count(121, WAN22) == latent_frame_count(121) == 31
