"""SD 2.x-style UNets predict v, and flow transformers (SD3, toyworld-flow) a velocity, not noise: every consumer of the model's output reads it through the one conversion
(:class:`unguide.models.prediction.Prediction`). Shown with oracle UNets that know the clean latent each prompt leads
to: an epsilon oracle and a v oracle of the same clean latents give the same sampling, influence scores, detector
scores and attack losses; the v oracle read as epsilon (the scheduler says ``epsilon``) gives other ones. The attack's
test failed before its loss went through the conversion (it compared v with the noise). A flow oracle (velocity
``noise - x0`` on the straight path, ``s = t / 1000``) read as a flow samples, scores, detects, attacks and meets the
erasure target as the epsilon oracle does; read as noise it fails each."""
from contextlib import contextmanager

import pytest
import torch

from unguide import load_model
from unguide.attack.defence import Defence, Probe, prompt_losses
from unguide.erasure.objective import erasure_loss
from unguide.erasure.training import EraseConfig
from unguide.guidance.config import ScorerConfig
from unguide.guidance.image_gate import detector_scores
from unguide.guidance.prompt_gate import influence_scores
from unguide.models.prediction import Prediction
from unguide.sampling.ddim import make_sampler
from unguide.sampling.images import Item, sample_latents_batched

CAT, DOG = "a photo of the cat", "a photo of the dog"


class Oracle(torch.nn.Module):
    """A denoiser that outputs, at any (x_t, t), exactly what leads to a known clean latent: the noise or v (``kind``).
    The clean latent is ``table[prompt]`` for the listed prompts (``adapted_table`` while the fake adapter is on) and
    ``x0`` for every other prompt."""

    def __init__(self, bundle, kind, x0, table=None, adapted_table=None):
        super().__init__()
        self.alphas, self.kind, self.x0 = getattr(bundle.scheduler, "alphas_cumprod", None), kind, x0
        encode = lambda t: {p: (bundle.encode_prompts([p])[0], v) for p, v in (t or {}).items()}  # noqa: E731
        self.table, self.adapted_table = encode(table), encode(adapted_table)
        self.adapted = False
        self.weight = torch.nn.Parameter(torch.zeros(1))

    @property
    def dtype(self):
        return torch.float32

    def clean(self, states):
        x0 = self.x0.expand(len(states), *self.x0.shape[1:]).clone()
        for table in (self.table, self.adapted_table if self.adapted else {}):
            for s, value in table.values():
                rows = torch.isclose(states, s).flatten(1).all(dim=1)
                x0[rows] = value
        return x0

    def forward(self, x, t, encoder_hidden_states):
        t = torch.as_tensor(t).expand(x.shape[0])
        x0 = self.clean(encoder_hidden_states)
        if self.kind == "flow":
            s = (t.float() / 1000).view(-1, 1, 1, 1)
            return type("Out", (), {"sample": (x - (1 - s) * x0) / s - x0})()
        a = self.alphas[t].view(-1, 1, 1, 1)
        eps = (x - a.sqrt() * x0) / (1 - a).sqrt()
        out = a.sqrt() * eps - (1 - a).sqrt() * x0 if self.kind == "v_prediction" else eps
        return type("Out", (), {"sample": out})()


class OracleAdapter:
    """The interface the guidance code uses of an adapter: on by default, ``base()`` switches it off."""

    def __init__(self, oracle):
        self.oracle = oracle
        oracle.adapted = True

    @contextmanager
    def base(self):
        self.oracle.adapted = False
        try:
            yield
        finally:
            self.oracle.adapted = True


def _latent(bundle, seed, scale=1.0):
    return scale * torch.randn(1, *bundle.latent_shape(), generator=torch.Generator().manual_seed(seed))


def _bundles(path, **tables):
    """{reading: bundle}: an epsilon oracle read as epsilon, a v oracle read as v, and a v oracle read as epsilon."""
    from diffusers import DDIMScheduler

    out = {}
    for name, predicts, reads in (("eps", "epsilon", "epsilon"), ("v", "v_prediction", "v_prediction"),
                                  ("v read as eps", "v_prediction", "epsilon")):
        bundle = load_model(str(path))
        assert bundle.scheduler.config.prediction_type == "v_prediction"
        bundle.scheduler = DDIMScheduler.from_config({**bundle.scheduler.config, "prediction_type": reads})
        bundle.unet = Oracle(bundle, predicts, _latent(bundle, 123), **{k: v(bundle) for k, v in tables.items()})
        out[name] = bundle
    return out


def test_the_conversion_inverts_what_a_perfect_model_predicts():
    alphas = torch.linspace(0.99, 0.01, 1000)
    x0, eps, t = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8), torch.tensor([300, 700])
    for kind in ("epsilon", "v_prediction"):
        p = Prediction(kind, alphas)
        x_t = p.noised(x0, eps, t)
        out = p.target(eps, x0, t)
        assert torch.allclose(p.noise(out, x_t, t), eps, atol=1e-5)
        assert torch.allclose(p.clean(out, x_t, t), x0, atol=1e-4)
    v = Prediction("v_prediction", alphas).target(eps, x0, t)
    assert not torch.allclose(v, eps, atol=1e-2)  # read as noise, v is something else


def test_sampling_reads_v_as_v(tiny_v):
    bundles = _bundles(tiny_v)
    x0 = bundles["v"].unet.x0
    errors = {name: (sample_latents_batched(b, [Item("a cat", s, 7.5, 16, 16) for s in range(3)], steps=20) - x0)
              .abs().mean().item() for name, b in bundles.items()}
    # DDIM stops at alphas_cumprod[0] (set_alpha_to_one False), so a right reading lands within ~sqrt(1 - a_0) of x0
    # (0.023 measured); read as epsilon it ends 12 times as far (0.28)
    assert errors["v"] < 0.05 and errors["eps"] < 0.05 and errors["v read as eps"] > 0.2, errors


def test_the_influence_score_is_the_same_for_noise_and_v(tiny_v):
    """d(c) = || noise_adapted - noise_base ||: the adapter moves the cat's clean latent, not the dog's."""
    bundles = _bundles(tiny_v, adapted_table=lambda b: {CAT: _latent(b, 123) + 0.5})
    scores = {}
    for name, bundle in bundles.items():
        scores[name] = influence_scores(bundle, OracleAdapter(bundle.unet), [CAT, DOG], ScorerConfig(), 7.5)
    assert scores["eps"][0] > 1 and scores["eps"][1] < 1e-3, scores
    assert torch.allclose(scores["v"], scores["eps"], rtol=1e-3, atol=1e-4), scores
    assert not torch.allclose(scores["v read as eps"], scores["eps"], rtol=0.2), scores


def test_the_detector_is_the_same_for_noise_and_v(tiny_v):
    """The prompt whose clean latent the image is explains it (error ~0), another prompt does not (score << 0)."""
    bundles = _bundles(tiny_v, table=lambda b: {DOG: _latent(b, 123) + 0.5})
    x0 = bundles["v"].unet.x0
    scores = {name: detector_scores(b, None, x0, [0], [CAT], [DOG]).item() for name, b in bundles.items()}
    assert scores["eps"] < -5 and scores["v"] < -5, scores
    assert scores["v read as eps"] > -1, scores


def test_the_attack_loss_is_the_same_for_noise_and_v(tiny_v):
    """The attacker's loss for a prompt is the denoising error of the probe's noise; with an oracle whose cat prompt
    leads to the probe's clean latent, the cat's loss is ~0 and the dog's is not, in either space. (The attack
    compared the raw output with the noise before: on the v oracle the cat's loss was far from 0.)"""
    bundles = _bundles(tiny_v, table=lambda b: {DOG: _latent(b, 123) + 0.5})
    losses = {}
    for name, bundle in bundles.items():
        x0 = bundle.unet.x0.expand(3, -1, -1, -1)
        t = torch.tensor([200, 500, 800])
        noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(4))
        probe = Probe(bundle.prediction.noised(x0, noise, t), t, noise)
        losses[name] = prompt_losses(Defence(bundle), probe, bundle.encode_prompts([CAT, DOG]).float(), [1.0, 1.0], 64)
    assert losses["eps"][0] < 1e-6 and losses["eps"][1] > 0.1, losses
    assert torch.allclose(losses["v"], losses["eps"], atol=1e-5), losses
    assert losses["v read as eps"][0] > 0.1, losses


@pytest.mark.parametrize("anchors", [False, True])
def test_the_erasure_target_is_met_in_either_space(tiny_v, anchors):
    """ESD's target e_ref - eta (e_tgt - e_ref) is an affine combination whose weights sum to one, and at a fixed x_t
    the noise, v and the clean latent are affine in each other: an adapted model that draws the clean latent
    x0_ref - eta (x0_tgt - x0_ref) for the target prompt meets it exactly (loss 0), whichever the model predicts. An
    adapter that changes nothing does not (the loss is not 0 by construction)."""
    eta = 2.0
    ref = lambda b: _latent(b, 7)  # noqa: E731
    tgt = lambda b: _latent(b, 8)  # noqa: E731
    erased = lambda b: {CAT: ref(b) - eta * (tgt(b) - ref(b))}  # noqa: E731
    cfg = EraseConfig(eta=eta, ddim_steps=10)
    for adapted, zero in ((erased, True), (lambda b: {}, False)):
        bundles = _bundles(tiny_v, table=lambda b: {CAT: tgt(b), "a photo": ref(b)}, adapted_table=adapted)
        for name, bundle in bundles.items():
            prompts = tuple(bundle.encode_prompts([p]) for p in (CAT, "a photo", ""))
            anchor_states = bundle.encode_prompts([DOG, ""]) if anchors else None
            loss, parts = erasure_loss(bundle.unet, OracleAdapter(bundle.unet), make_sampler(bundle, 10), cfg, 4, 500,
                                       _latent(bundle, 9), prompts, anchor_states)
            assert (loss.item() < 1e-8) == zero, (name, parts)


def test_a_version_1_run_on_a_v_model_warns_and_a_rerun_recalibrates_its_prompt_gate(tiny_v, tmp_path, caplog):
    """Version 1 runs scored a v model's influence on v: their calibrated threshold is in other units. They still load
    (warning once, on attach); the same `erase` again recalibrates the prompt gate without retraining."""
    import json
    import logging

    from unguide.erasure.concepts import ConceptSpec
    from unguide.erasure.runs import read_run
    from unguide.erasure.training import erase

    spec = ConceptSpec(target=CAT, reference="a photo of the forest", name="cat", anchors=["", DOG])
    cfg = EraseConfig.from_recipe("selective", iterations=2, ddim_steps=8, calibration_steps=2)
    bundle, path = load_model(str(tiny_v)), tmp_path / "run"
    run = erase(bundle, spec, path, cfg, progress=False)
    stored = json.loads((path / "erasure.json").read_text())
    assert stored["version"] == 2 and not run.prompt_gate_stale(bundle)
    gate = {**stored["calibration"]["prompt"], "threshold": 123.0, "image": stored["calibration"]["image"],
            "default": stored["defaults"]["gate"], "keep": stored["defaults"]["keep"],
            "erase_with": stored["defaults"]["erase_with"]}
    v1 = {k: v for k, v in stored.items() if k not in ("calibration", "defaults", "version")}
    (path / "erasure.json").write_text(json.dumps({**v1, "gate": gate}))
    old = read_run(path)
    assert old.version == 1 and old.defaults == run.defaults and old.calibration.image == run.calibration.image
    assert old.prompt_gate_stale(bundle)
    with caplog.at_level(logging.WARNING, logger="unguide"):
        old.attach(bundle).remove()
    assert "rerun the same `unguide erase` command" in caplog.text
    weights = (path / run.weights).stat().st_mtime_ns
    again = erase(bundle, spec, path, cfg, progress=False)
    assert again.version == 2 and again.calibration.prompt["threshold"] == pytest.approx(run.calibration.prompt["threshold"])
    assert read_run(path).version == 2 and (path / run.weights).stat().st_mtime_ns == weights


# ------------------------------------------------------------------------------------------------ flow (velocity) models
def _flow_bundles(path, **tables):
    """{reading: bundle} on an SD3 directory: a flow oracle read as a flow (its own FlowMatch scheduler), the same
    oracle read as noise (a DDIM epsilon scheduler), and an epsilon oracle read as epsilon."""
    from diffusers import DDIMScheduler

    out = {}
    for name, predicts, reads_flow in (("flow", "flow", True), ("flow read as eps", "flow", False),
                                       ("eps", "epsilon", False)):
        bundle = load_model(str(path))
        assert bundle.prediction.kind == "flow"
        if not reads_flow:
            bundle.scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                             clip_sample=False, set_alpha_to_one=False, steps_offset=1)
        bundle.unet = Oracle(bundle, predicts, _latent(bundle, 123), **{k: v(bundle) for k, v in tables.items()})
        out[name] = bundle
    return out


def test_the_flow_conversion_inverts_what_a_perfect_model_predicts():
    x0, noise, t = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8), torch.tensor([300.0, 700.0])
    p = Prediction("flow")
    x_s = p.noised(x0, noise, t)
    assert torch.allclose(x_s[0], 0.7 * x0[0] + 0.3 * noise[0], atol=1e-6)
    v = p.target(noise, x0, t)
    assert torch.allclose(v, noise - x0)
    assert torch.allclose(p.noise(v, x_s, t), noise, atol=1e-5) and torch.allclose(p.clean(v, x_s, t), x0, atol=1e-5)
    assert not torch.allclose(v, noise, atol=1e-2)


def test_sampling_reads_a_velocity_as_a_velocity(tiny_sd3):
    bundles = _flow_bundles(tiny_sd3)
    x0 = bundles["flow"].unet.x0
    errors = {name: (sample_latents_batched(b, [Item("a cat", s, 7.0, 16, 16) for s in range(3)], steps=20) - x0)
              .abs().mean().item() for name, b in bundles.items()}
    assert errors["flow"] < 1e-3 and errors["eps"] < 0.05 and errors["flow read as eps"] > 0.2, errors


def test_flow_influence_detector_and_attack_read_the_velocity(tiny_sd3):
    """The adapter moves the cat's clean latent, not the dog's (influence); the image is the dog prompt's clean latent
    (detector, attack): read as a flow, each gives the epsilon oracle's verdict; read as noise, it does not."""
    moved = _flow_bundles(tiny_sd3, adapted_table=lambda b: {CAT: _latent(b, 123) + 0.5})
    influence = {name: influence_scores(b, OracleAdapter(b.unet), [CAT, DOG], ScorerConfig(), 7.0)
                 for name, b in moved.items()}
    assert influence["flow"][0] > 1 and influence["flow"][1] < 1e-3, influence
    assert not torch.allclose(influence["flow read as eps"], influence["flow"], rtol=0.2), influence
    drawn = _flow_bundles(tiny_sd3, table=lambda b: {DOG: _latent(b, 123) + 0.5})
    x0 = drawn["flow"].unet.x0
    detector = {name: detector_scores(b, None, x0, [0], [CAT], [DOG]).item() for name, b in drawn.items()}
    assert detector["flow"] < -5 and detector["eps"] < -5 and detector["flow read as eps"] > -1, detector
    losses = {}
    for name, bundle in drawn.items():
        t = torch.tensor([200, 500, 800])
        noise = torch.randn((3, *x0.shape[1:]), generator=torch.Generator().manual_seed(4))
        probe = Probe(bundle.prediction.noised(x0.expand(3, -1, -1, -1), noise, t), t, noise)
        losses[name] = prompt_losses(Defence(bundle), probe, bundle.encode_prompts([CAT, DOG]).float(), [1.0, 1.0], 64)
    assert losses["flow"][0] < 1e-6 and losses["flow"][1] > 0.1, losses
    assert losses["flow read as eps"][0] > 0.1, losses


def test_the_erasure_target_is_met_on_a_flow(tiny_sd3):
    """ESD's target as an affine combination of velocities: met exactly by the adapted flow oracle that draws
    x0_ref - eta (x0_tgt - x0_ref), whichever step k the loss is taken at; not by an adapter that changes nothing."""
    eta = 2.0
    ref, tgt = (lambda b: _latent(b, 7)), (lambda b: _latent(b, 8))
    erased = lambda b: {CAT: ref(b) - eta * (tgt(b) - ref(b))}  # noqa: E731
    cfg = EraseConfig(eta=eta, ddim_steps=10)
    for adapted, zero in ((erased, True), (lambda b: {}, False)):
        bundle = _flow_bundles(tiny_sd3, table=lambda b: {CAT: tgt(b), "a photo": ref(b)}, adapted_table=adapted)["flow"]
        sampler = make_sampler(bundle, 10)
        prompts = tuple(bundle.encode_prompts([p]) for p in (CAT, "a photo", ""))
        for k in (1, 6):
            loss, parts = erasure_loss(bundle.unet, OracleAdapter(bundle.unet), sampler, cfg, k,
                                       float(sampler.timesteps[k]), _latent(bundle, 9), prompts)
            assert (loss.item() < 1e-8) == zero, (k, parts)
