"""Erasure and UnGuidance on the embedded model (quality checks with fixed seeds)."""
from pathlib import Path

import pytest
import torch

from unguide import load_model
from unguide.adapters import make_adapter
from unguide.concepts import load_preset
from unguide.erase import EraseConfig, _iteration_sample, concept_prompts, erasure_loss
from unguide.sampling import make_scheduler

SUN_RUN = Path(__file__).parent / "data" / "erasure_sun"


def test_erasure_loss_falls_on_the_embedded_model():
    bundle = load_model("toyworld")
    spec = load_preset("sun")
    cfg = EraseConfig(seed=1)
    adapter = make_adapter(bundle.unet, cfg.adapter_config(), init_seed=cfg.seed)
    prompts = concept_prompts(bundle, spec)
    sched = make_scheduler(bundle, cfg.ddim_steps)
    probes = [(k, t, _iteration_sample(cfg, 10_000 + i, bundle.latent_shape())[2]) for i, (k, t) in
              enumerate([(3, 70), (10, 210), (20, 410), (30, 610)])]

    def probe_loss():
        with torch.no_grad():
            return sum(erasure_loss(bundle.unet, adapter, sched, cfg, k, t, z, prompts).item() for k, t, z in probes)

    before = probe_loss()
    opt = torch.optim.Adam(adapter.parameters(), lr=cfg.lr)
    for i in range(8):
        k, t, z = _iteration_sample(cfg, i, bundle.latent_shape())
        loss = erasure_loss(bundle.unet, adapter, sched, cfg, min(k, 10), t, z, prompts)
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = probe_loss()
    adapter.remove()
    assert after < 0.9 * before, (before, after)


@pytest.mark.skipif(not SUN_RUN.exists(), reason="committed sun erasure run missing")
def test_unguide_erases_target_and_keeps_others():
    """With the committed sun adapter: the sun prompt is steered away (w=-1), other classes keep w=2 and their images."""
    from unguide.erase import attach_erasure
    from unguide.generation import Item, PlainGuide, sample_images
    from unguide.guidance import UnGuide
    from unguide.metrics.preservation import ssim
    from unguide.toyworld.classifier import ToyClassifier

    bundle = load_model("toyworld")
    items = [Item(p, s, bundle.default_guidance, 32, 32) for p in ("a photo of the sun", "a photo of the house") for s in range(6)]
    base, _ = sample_images(bundle, items, steps=25, guide=PlainGuide(), progress=False)
    adapter, _ = attach_erasure(bundle, SUN_RUN)
    guided, infos = sample_images(bundle, items, steps=25, guide=UnGuide(adapter), progress=False)
    assert [i["w"] for i in infos] == [-1.0] * 6 + [2.0] * 6
    probs = ToyClassifier.from_pretrained().predict(torch.cat([base, guided]))["object"]
    sun_base, sun_guided = probs[:6, 0].mean().item(), probs[12:18, 0].mean().item()
    assert sun_base > 0.7 and sun_guided < 0.3, (sun_base, sun_guided)
    assert ssim(guided[6:], base[6:]).mean().item() > 0.6
