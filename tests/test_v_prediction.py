"""SD 2.x-style UNets predict v, not noise: each place that reads the UNet's output is right for v (sampling, the
erasure target, the image gate's noise estimate), shown with an oracle UNet that knows the clean latent; the same
oracle read as epsilon fails every check."""
import torch

from unguide import load_model
from unguide.guidance.image_gate import _eps_from_output, detector_scores
from unguide.sampling.images import Item, sample_latents_batched

X0_SEED = 123


class Oracle(torch.nn.Module):
    """Predicts, for every prompt, the output that leads to one fixed clean latent x0 (v or epsilon, as its scheduler
    says); prompts whose token states differ from ``favoured`` get x0 + ``off`` instead, so the detector can tell them
    apart."""

    def __init__(self, x0, alphas, kind, favoured=None, off=0.5):
        super().__init__()
        self.x0, self.alphas, self.kind, self.favoured, self.off = x0, alphas, kind, favoured, off
        self.weight = torch.nn.Parameter(torch.zeros(1))

    @property
    def dtype(self):
        return torch.float32

    def forward(self, x, t, encoder_hidden_states):
        t = torch.as_tensor(t).expand(x.shape[0])
        a = self.alphas[t].view(-1, 1, 1, 1)
        x0 = self.x0.expand_as(x).clone()
        if self.favoured is not None:
            other = ~torch.isclose(encoder_hidden_states, self.favoured).flatten(1).all(dim=1)
            x0[other] = x0[other] + self.off
        eps = (x - a.sqrt() * x0) / (1 - a).sqrt()
        out = a.sqrt() * eps - (1 - a).sqrt() * x0 if self.kind == "v_prediction" else eps
        return type("Out", (), {"sample": out})()


def _oracle_bundle(path, kind_read, kind_predicted, **kw):
    """The tiny model whose scheduler reads ``kind_read`` and whose UNet is an oracle predicting ``kind_predicted``."""
    bundle = load_model(str(path))
    assert bundle.scheduler.config.prediction_type == "v_prediction"
    if kind_read != "v_prediction":
        from diffusers import DDIMScheduler

        bundle.scheduler = DDIMScheduler.from_config({**bundle.scheduler.config, "prediction_type": kind_read})
    x0 = torch.randn(1, *bundle.latent_shape(), generator=torch.Generator().manual_seed(X0_SEED))
    bundle.unet = Oracle(x0, bundle.scheduler.alphas_cumprod, kind_predicted, **kw)
    return bundle, x0


def test_sampling_reads_v_as_v(tiny_v):
    errors = {}
    for read in ("v_prediction", "epsilon"):
        bundle, x0 = _oracle_bundle(tiny_v, read, "v_prediction")
        latents = sample_latents_batched(bundle, [Item("a cat", s, 7.5, 16, 16) for s in range(3)], steps=20)
        errors[read] = (latents - x0).abs().mean().item()
    # DDIM stops at alphas_cumprod[0] (set_alpha_to_one False), so a right reading lands within ~sqrt(1 - a_0) of x0
    # (0.023 measured); read as epsilon it ends 12 times as far (0.28)
    assert errors["v_prediction"] < 0.05 and errors["epsilon"] > 0.2, errors


def test_the_image_gate_turns_v_into_the_noise_it_stands_for(tiny_v):
    bundle, x0 = _oracle_bundle(tiny_v, "v_prediction", "v_prediction")
    sched = bundle.scheduler
    t = torch.tensor([100, 400, 700, 900])
    a = sched.alphas_cumprod[t].view(-1, 1, 1, 1)
    eps = torch.randn(4, *x0.shape[1:], generator=torch.Generator().manual_seed(1))
    x_t = a.sqrt() * x0 + (1 - a).sqrt() * eps
    v = bundle.unet(x_t, t, None).sample
    assert torch.allclose(_eps_from_output(sched, v, x_t, t), eps, atol=1e-4)
    assert not torch.allclose(v, eps, atol=1e-2)  # read as epsilon, the same output is far from the noise
    # the detector on the oracle: the prompt it favours explains the image, another prompt does not (score < 0);
    # reading v as epsilon the errors no longer measure the prompt and the ordering is lost
    favoured = bundle.encode_prompts(["a photo of the cat"])[0]
    bundle.unet = Oracle(x0, sched.alphas_cumprod, "v_prediction", favoured=favoured)
    right = detector_scores(bundle, None, x0, [0], ["a photo of the cat"], ["a photo of the dog"]).item()
    assert right < -5  # the favoured prompt's error is ~0 (float rounding), the other's is not
    from diffusers import DDIMScheduler

    bundle.scheduler = DDIMScheduler.from_config({**sched.config, "prediction_type": "epsilon"})
    wrong = detector_scores(bundle, None, x0, [0], ["a photo of the cat"], ["a photo of the dog"]).item()
    assert wrong > -1, (right, wrong)


def test_the_erasure_target_in_v_is_the_target_in_noise(tiny_v):
    """ESD's target e_ref - eta (e_tgt - e_ref) is an affine combination whose weights sum to one, and v is affine in
    epsilon at a fixed x_t: the target computed on v outputs is exactly the v of the target computed on noise. A
    combination whose weights do not sum to one (the check below) would not carry over."""
    bundle = load_model(str(tiny_v))
    sched, unet, eta = bundle.scheduler, bundle.unet, 2.0
    t = torch.tensor([500, 500])
    x_t = torch.randn(1, *bundle.latent_shape(), generator=torch.Generator().manual_seed(2)).expand(2, -1, -1, -1)
    with torch.no_grad():
        v_ref, v_tgt = unet(x_t, t, encoder_hidden_states=bundle.encode_prompts(["a photo", "a photo of the cat"])).sample.chunk(2)
    to_eps = lambda v: _eps_from_output(sched, v, x_t[:1], t[:1])  # noqa: E731
    target_v = v_ref - eta * (v_tgt - v_ref)
    target_eps = to_eps(v_ref) - eta * (to_eps(v_tgt) - to_eps(v_ref))
    assert torch.allclose(to_eps(target_v), target_eps, atol=1e-5)
    assert not torch.allclose(to_eps(v_ref - eta * v_tgt), to_eps(v_ref) - eta * to_eps(v_tgt), atol=1e-3)
