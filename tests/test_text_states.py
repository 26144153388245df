import pytest
import torch

from unguide.errors import UnguideError
from unguide.models.text import encode_text
from unguide.toyworld.model import load_text_encoder


@pytest.fixture(scope="module")
def minilm():
    return load_text_encoder()


def test_causal_states_are_prefix_states_and_padding_is_zero(minilm):
    enc, tok = minilm
    prompts = ["a photo of the boat", "a photo of the house", ""]
    states = encode_text(enc, tok, prompts, 16, "causal_zero_pad")
    ids = tok(prompts[0], return_tensors="pt").input_ids
    for i in (1, 3, 5):  # token i's state = the encoder's last state on tokens 0..i alone
        alone = enc(ids[:, :i + 1], attention_mask=torch.ones(1, i + 1, dtype=torch.long))[0][0, i]
        torch.testing.assert_close(states[0, i], alone, atol=1e-4, rtol=1e-4)
    # the shared template has identical states in both prompts; the content word does not
    torch.testing.assert_close(states[0, :5], states[1, :5])
    assert (states[0, 5] - states[1, 5]).abs().max() > 0.5
    n = [len(tok(p).input_ids) for p in prompts]
    for row, k in zip(states, n):
        assert row[k:].abs().max() == 0 and row[:k].norm(dim=-1).min() > 1


def test_contextual_zero_pad_keeps_real_tokens(minilm):
    enc, tok = minilm
    full = encode_text(enc, tok, ["a red boat"], 16, "contextual")
    zero = encode_text(enc, tok, ["a red boat"], 16, "contextual_zero_pad")
    torch.testing.assert_close(zero[0, :5], full[0, :5])
    assert zero[0, 5:].abs().max() == 0 and full[0, 5:].abs().max() > 0


def test_unknown_text_state_mode_is_one_clear_error(minilm):
    enc, tok = minilm
    with pytest.raises(UnguideError, match="unknown text state mode"):
        encode_text(enc, tok, ["x"], 16, "bidirectional")


def test_causal_eos_padding_repeats_the_end_token_like_clip(minilm):
    enc, tok = minilm
    states = encode_text(enc, tok, ["a photo of the boat", ""], 16, "causal_eos_pad")
    ids = tok(["a photo of the boat"], padding="max_length", max_length=16, return_tensors="pt").input_ids
    ids[ids == tok.pad_token_id] = tok.sep_token_id
    alone = enc(ids[:, :10], attention_mask=torch.ones(1, 10, dtype=torch.long))[0][0, 9]
    torch.testing.assert_close(states[0, 9], alone, atol=1e-4, rtol=1e-4)
    assert states.norm(dim=-1).min() > 1  # every position, the empty prompt's too, is a real state
    assert (states[0, 10:] - states[1, 10:]).abs().max() > 0.5  # the padding carries the prompt


def test_text_rescaling_is_an_exact_reparametrisation(tmp_path):
    """export's --text-norm: states x s and cross-attention key/value / s give the same denoiser output."""
    from diffusers import UNet2DConditionModel

    from unguide.io import save_tensors
    from unguide.toyworld.train import _rescale_text

    torch.manual_seed(0)
    unet = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64),
                                layers_per_block=1, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
                                attention_head_dim=8, norm_num_groups=8).eval()
    states = torch.randn(20, 6, 32) * 0.4
    save_tensors(tmp_path / "unet_data.safetensors", {"text_causal_eos_pad": states})
    x, t, h = torch.randn(2, 4, 8, 8), torch.tensor([10, 700]), states[:2]
    with torch.no_grad():
        before = unet(x, t, encoder_hidden_states=h).sample
        scale = _rescale_text(unet, tmp_path, "causal_eos_pad", text_norm=27.7)
        after = unet(x, t, encoder_hidden_states=h * scale).sample
    assert scale == pytest.approx(27.7 / states.norm(dim=-1).mean().item(), rel=1e-5) and scale > 10
    torch.testing.assert_close(after, before, atol=1e-4, rtol=1e-4)
    # and the layers outside cross-attention were not touched: unscaled states now give another output
    with torch.no_grad():
        assert (unet(x, t, encoder_hidden_states=h).sample - before).abs().max() > 1e-3


def test_bundle_applies_the_models_text_scale(toy_bundle):
    prompt = ["a photo of the boat"]
    plain = encode_text(toy_bundle.text_encoder, toy_bundle.tokenizer, prompt, toy_bundle.max_length,
                        toy_bundle.text_states)
    old, toy_bundle.text_scale = toy_bundle.text_scale, 3.0
    toy_bundle._text_cache.clear()
    try:
        torch.testing.assert_close(toy_bundle.encode_prompts(prompt), plain * 3.0)
    finally:
        toy_bundle.text_scale = old
        toy_bundle._text_cache.clear()
