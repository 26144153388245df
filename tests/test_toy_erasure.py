"""Erasure on the embedded model (fixed seeds)."""
import torch

from unguide import load_model
from unguide.adapters import make_adapter
from unguide.concepts import load_preset
from unguide.erase import EraseConfig, _iteration_sample, concept_prompts, erasure_loss
from unguide.sampling import make_scheduler


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

