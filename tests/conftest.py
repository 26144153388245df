import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
if os.environ.get("PYTEST_XDIST_WORKER"):
    # `make test` runs two workers (pytest -n 2) on two cores: one thread each, for the processes they start too,
    # or the two compete for both cores and each runs many times slower
    os.environ["OMP_NUM_THREADS"] = "1"

import pytest
import torch

if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)


def write_clip_tokenizer(path):
    """A byte-level BPE vocabulary with no merges: every character is a token. Enough for wiring tests."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    extra = iter(range(256, 512))
    chars = [chr(b) if b in printable else chr(next(extra)) for b in range(256)]  # byte-level alphabet
    vocab = {}
    for c in chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"]:
        vocab.setdefault(c, len(vocab))
    path.mkdir(parents=True, exist_ok=True)
    (path / "vocab.json").write_text(json.dumps(vocab))
    (path / "merges.txt").write_text("#version: 0.2\n")
    from transformers import CLIPTokenizer

    tok = CLIPTokenizer(str(path / "vocab.json"), str(path / "merges.txt"), model_max_length=16)
    return tok


def build_tiny_sd(path):
    """A randomly initialised Stable-Diffusion-shaped pipeline (16x16 images) saved as safetensors."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    tok = write_clip_tokenizer(path / "_tok")
    text = CLIPTextModel(CLIPTextConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                                        num_attention_heads=4, max_position_embeddings=16, bos_token_id=tok.bos_token_id,
                                        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id))
    unet = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
                                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
                                attention_head_dim=8, norm_num_groups=8)
    vae = AutoencoderKL(block_out_channels=(16, 32), down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=8, sample_size=16)
    sched = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                          set_alpha_to_one=False, steps_offset=1)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=tok, unet=unet, scheduler=sched, safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(str(path / "sd"), safe_serialization=True)
    return path / "sd"


def build_tiny_sdxl(path):
    """A randomly initialised SDXL-shaped pipeline (two CLIP encoders, pooled embedding, time ids; 16x16 images)
    saved as safetensors, runnable by the stock StableDiffusionXLPipeline."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(0)
    tok = write_clip_tokenizer(path / "_tok")
    text_config = dict(vocab_size=len(tok), hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                       max_position_embeddings=16, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                       pad_token_id=tok.pad_token_id, projection_dim=32, hidden_act="gelu")
    text = CLIPTextModel(CLIPTextConfig(**text_config))
    text_2 = CLIPTextModelWithProjection(CLIPTextConfig(**text_config))
    unet = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
                                down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=64,
                                attention_head_dim=(2, 4), use_linear_projection=True, addition_embed_type="text_time",
                                addition_time_embed_dim=8, transformer_layers_per_block=(1, 2),
                                projection_class_embeddings_input_dim=6 * 8 + 32, norm_num_groups=8)
    vae = AutoencoderKL(block_out_channels=(16, 32), down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=8, sample_size=16,
                        scaling_factor=0.13025)
    sched = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1,
                                   timestep_spacing="leading")
    pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=text, text_encoder_2=text_2, tokenizer=tok, tokenizer_2=tok,
                                     unet=unet, scheduler=sched)
    pipe.save_pretrained(str(path / "sdxl"), safe_serialization=True)
    return path / "sdxl"


@pytest.fixture(scope="session")
def tiny_sdxl(tmp_path_factory):
    return build_tiny_sdxl(tmp_path_factory.mktemp("tiny_sdxl"))


@pytest.fixture(scope="session")
def tiny_sd(tmp_path_factory):
    return build_tiny_sd(tmp_path_factory.mktemp("tiny_sd"))


@pytest.fixture(scope="session")
def tiny_v(tiny_sd, tmp_path_factory):
    """The tiny SD directory with a v-prediction scheduler, as SD 2.x (768-v) ships it."""
    import shutil

    path = tmp_path_factory.mktemp("tiny_v") / "sd2"
    shutil.copytree(tiny_sd, path)
    config = path / "scheduler" / "scheduler_config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "prediction_type": "v_prediction"}))
    return path


@pytest.fixture(scope="session")
def toy_bundle():
    from unguide import load_model

    return load_model("toyworld")


def build_tiny_clip(path):
    """A randomly initialised CLIP (model + tokenizer) saved as safetensors: wiring tests of the CLIP judge."""
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(0)
    tok = write_clip_tokenizer(path / "_tok")
    config = CLIPConfig(text_config=dict(vocab_size=len(tok), hidden_size=32, intermediate_size=37, num_hidden_layers=1,
                                         num_attention_heads=4, max_position_embeddings=16, bos_token_id=tok.bos_token_id,
                                         eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id),
                        vision_config=dict(hidden_size=32, intermediate_size=37, num_hidden_layers=1, num_attention_heads=4,
                                           image_size=32, patch_size=8),
                        projection_dim=16)
    model = CLIPModel(config)
    model.save_pretrained(str(path / "clip"), safe_serialization=True)
    tok.save_pretrained(str(path / "clip"))
    return path / "clip"


@pytest.fixture(scope="session")
def tiny_clip(tmp_path_factory):
    return build_tiny_clip(tmp_path_factory.mktemp("tiny_clip"))


def build_tiny_sd3(path):
    """A randomly initialised SD3-shaped pipeline (two CLIP encoders with projections, a T5 encoder, an MMDiT, a
    flow-matching scheduler; 16x16 images) saved as safetensors, runnable by the stock StableDiffusion3Pipeline.
    The T5 reads the tiny CLIP tokenizer's ids (no sentencepiece model offline): the wiring is what is tested."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    torch.manual_seed(0)
    tok = write_clip_tokenizer(path / "_tok")
    text_config = dict(vocab_size=len(tok), hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                       max_position_embeddings=16, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                       pad_token_id=tok.pad_token_id, projection_dim=32, hidden_act="gelu")
    text, text_2 = (CLIPTextModelWithProjection(CLIPTextConfig(**text_config)) for _ in range(2))
    t5 = T5EncoderModel(T5Config(vocab_size=len(tok), d_model=64, d_kv=8, d_ff=37, num_layers=2, num_heads=4,
                                 relative_attention_num_buckets=8))
    transformer = SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, out_channels=4, num_layers=2,
                                        attention_head_dim=8, num_attention_heads=4, joint_attention_dim=64,
                                        caption_projection_dim=32, pooled_projection_dim=64, pos_embed_max_size=8)
    vae = AutoencoderKL(block_out_channels=(16, 32), down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=8, sample_size=16,
                        scaling_factor=1.5, shift_factor=0.06)
    pipe = StableDiffusion3Pipeline(transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=vae,
                                    text_encoder=text, tokenizer=tok, text_encoder_2=text_2, tokenizer_2=tok,
                                    text_encoder_3=t5, tokenizer_3=tok)
    pipe.save_pretrained(str(path / "sd3"), safe_serialization=True)
    return path / "sd3"


@pytest.fixture(scope="session")
def tiny_sd3(tmp_path_factory):
    return build_tiny_sd3(tmp_path_factory.mktemp("tiny_sd3"))


def build_tiny_flux(path):
    """A randomly initialised Flux-dev-shaped pipeline (CLIP pooled + T5 states, double- and single-stream blocks,
    rotary positions, packed latents, a guidance embedding, dynamic shift) saved as safetensors, runnable by the stock
    FluxPipeline; and the same model saved by UnGuidePipeline with a 16 px default size (FluxPipeline's own default,
    128 latent pixels, is 256 px here: slow for command tests)."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    from unguide import UnGuidePipeline

    torch.manual_seed(0)
    tok = write_clip_tokenizer(path / "_tok")
    text = CLIPTextModel(CLIPTextConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                                        num_attention_heads=4, max_position_embeddings=16, bos_token_id=tok.bos_token_id,
                                        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, hidden_act="gelu"))
    t5 = T5EncoderModel(T5Config(vocab_size=len(tok), d_model=32, d_kv=8, d_ff=37, num_layers=2, num_heads=4,
                                 relative_attention_num_buckets=8))
    transformer = FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1,
                                         attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                         pooled_projection_dim=32, guidance_embeds=True, axes_dims_rope=(4, 6, 6))
    vae = AutoencoderKL(block_out_channels=(16, 32), down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=8, sample_size=16,
                        scaling_factor=1.5, shift_factor=0.06)
    sched = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                            base_image_seq_len=256, max_image_seq_len=4096)
    pipe = FluxPipeline(scheduler=sched, vae=vae, text_encoder=text, tokenizer=tok, text_encoder_2=t5, tokenizer_2=tok,
                        transformer=transformer)
    pipe.save_pretrained(str(path / "flux"), safe_serialization=True)
    ours = UnGuidePipeline.from_pretrained(str(path / "flux"))
    ours.register_to_config(image_size=16)
    ours.save_pretrained(path / "flux16")
    return path / "flux", path / "flux16"


@pytest.fixture(scope="session")
def tiny_flux(tmp_path_factory):
    """(the stock FluxPipeline directory, the same model saved by unguide with 16 px images)."""
    return build_tiny_flux(tmp_path_factory.mktemp("tiny_flux"))
