"""The erasure schedules (erasure/schedule.py): where training points come from, batching, resume, every family."""
import json

import pytest
import torch
from safetensors.torch import load_file

from unguide import load_model
from unguide.cli import main
from unguide.erasure.adapters import make_adapter
from unguide.erasure.concepts import ConceptSpec
from unguide.erasure.recipes import SCHEDULE_SETTINGS
from unguide.erasure.schedule import TrajectoryPool, plan_iteration
from unguide.erasure.objective import base_outputs, negative_guidance_loss
from unguide.erasure.training import EraseConfig, concept_prompts, erase
from unguide.sampling.ddim import cfg_noise_fn, ddim_loop, initial_noise, make_sampler

CAT = ConceptSpec(target="a photo of the cat", reference="a photo of the forest", name="cat",
                  synonyms=["kitten"], anchors=["a photo of the dog", "a photo of the car", ""])


def _cached(**kw) -> EraseConfig:
    settings = dict(schedule="cached", ddim_steps=8, iterations=4, batch=3, trajectories=2, checkpoint_every=2,
                    calibration_samples=1, calibration_steps=2)
    return EraseConfig.from_recipe("selective", **{**settings, **kw})


def test_a_schedule_brings_its_own_batch_and_iterations():
    fresh = EraseConfig.from_recipe("selective", schedule="fresh")
    assert (fresh.schedule, fresh.batch, fresh.iterations) == ("fresh", 1, 200)
    cached = EraseConfig.from_recipe("selective", schedule="cached", iterations=7)
    assert (cached.schedule, cached.batch, cached.iterations) == ("cached", SCHEDULE_SETTINGS["cached"]["batch"], 7)
    reference = EraseConfig.from_recipe("reference")  # the paper's protocol keeps ESD's fresh trajectories
    assert (reference.schedule, reference.batch, reference.iterations) == ("fresh", 1, 200)


def test_cached_points_lie_on_the_base_models_trajectories(tiny_sd):
    """Each cached z_k is exactly k steps of the base model's CFG trajectory of its prompt from its noise."""
    bundle = load_model(str(tiny_sd))
    cfg = _cached()
    adapter = make_adapter(bundle.unet, cfg.adapter_config(), init_seed=0)
    with torch.no_grad():  # a non-zero adapter: the pool must still be drawn by the base model
        for p in adapter.parameters():
            p.add_(0.5)
    erased, _, empty = concept_prompts(bundle, CAT, cfg)
    sampler = make_sampler(bundle, cfg.ddim_steps)
    plans = [plan_iteration(cfg, i, sampler, len(erased), 3, bundle.latent_shape()) for i in range(cfg.iterations)]
    pool = TrajectoryPool.draw(bundle, adapter, sampler, cfg, erased, empty, plans)
    seeds = [cfg.seed * 1_000_003 + 500_000_009 + p * 10_007 + j for p in range(2) for j in range(2)]
    noise = initial_noise(bundle.latent_shape(), seeds)
    samples = [s for plan in plans for s in plan]
    assert {s.trajectory for s in samples} == {0, 1} and len({s.k for s in samples}) > 2
    with torch.no_grad(), adapter.base():
        for s in samples:
            row = s.prompt * 2 + s.trajectory
            want = ddim_loop(sampler, noise[row:row + 1], cfg_noise_fn(bundle.unet, erased[s.prompt], empty,
                                                                       cfg.start_guidance), stop=s.k)
            assert torch.allclose(pool.take([s]), want, rtol=1e-4, atol=1e-4)  # batched vs alone: float sums
    adapter.remove()


@pytest.mark.parametrize("anchored", [False, True])
def test_a_batch_loss_is_the_mean_of_its_samples(tiny_sd, anchored):
    bundle = load_model(str(tiny_sd))
    cfg = EraseConfig.from_recipe("selective" if anchored else "reference", ddim_steps=8)
    adapter = make_adapter(bundle.unet, cfg.adapter_config(), init_seed=0)
    with torch.no_grad():
        for p in adapter.parameters():
            p.add_(0.1)
    erased, ref, _ = concept_prompts(bundle, CAT, cfg)
    z = torch.randn(2, *bundle.latent_shape(), generator=torch.Generator().manual_seed(0))
    tgt = torch.cat([erased[0], erased[-1]])
    anchors = bundle.encode_prompts(["a photo of the dog", "", "a photo of the car", ""]) if anchored else None
    with torch.no_grad():
        both, _ = negative_guidance_loss(bundle.unet, adapter, cfg, z, [300, 700], tgt, ref, anchors)
        one = [negative_guidance_loss(bundle.unet, adapter, cfg, z[b:b + 1], [t], tgt[b:b + 1], ref,
                                      anchors[2 * b:2 * b + 2] if anchored else None)[0] for b, t in enumerate([300, 700])]
    assert torch.allclose(both, (one[0] + one[1]) / 2, rtol=1e-4)
    assert abs(one[0].item() - one[1].item()) > 1e-6  # the two samples differ: a mix-up would show
    adapter.remove()


def test_a_windows_base_outputs_computed_together_are_each_iterations(tiny_sd):
    """The cached schedule computes the loss's base side for a whole window in batches; the loss it then trains on is
    the loss computed sample by sample, and the base side ignores the adapter."""
    bundle = load_model(str(tiny_sd))
    cfg = EraseConfig.from_recipe("selective", ddim_steps=8)
    adapter = make_adapter(bundle.unet, cfg.adapter_config(), init_seed=0)
    with torch.no_grad():
        for p in adapter.parameters():
            p.add_(0.1)
    erased, ref, _ = concept_prompts(bundle, CAT, cfg)
    z = torch.randn(3, *bundle.latent_shape(), generator=torch.Generator().manual_seed(1))
    tgt, ts = torch.cat([erased[0], erased[-1], erased[0]]), [100, 500, 900]
    anchors = bundle.encode_prompts(["a photo of the dog", "", "a photo of the car"])
    together = base_outputs(bundle.unet, adapter, cfg, z, ts, tgt, ref, anchors, batch_size=4)  # rows split 4 + 4 + 1
    for b in range(3):
        alone = base_outputs(bundle.unet, adapter, cfg, z[b:b + 1], ts[b:b + 1], tgt[b:b + 1], ref, anchors[b:b + 1])
        assert torch.allclose(together[0][b:b + 1], alone[0], rtol=1e-4, atol=1e-5)
        assert torch.allclose(together[1][b:b + 1], alone[1], rtol=1e-4, atol=1e-5)
        with torch.no_grad():
            given, _ = negative_guidance_loss(bundle.unet, adapter, cfg, z[b:b + 1], ts[b:b + 1], tgt[b:b + 1], ref,
                                              anchors[b:b + 1], base=(together[0][b:b + 1], together[1][b:b + 1]))
            computed, _ = negative_guidance_loss(bundle.unet, adapter, cfg, z[b:b + 1], ts[b:b + 1], tgt[b:b + 1], ref,
                                                 anchors[b:b + 1])
        assert torch.allclose(given, computed, rtol=1e-4) and computed > 0
    with adapter.base(), torch.no_grad():  # the base side is the base model's: the same with the adapter switched off
        off = base_outputs(bundle.unet, adapter, cfg, z, ts, tgt, ref, anchors)
    assert torch.allclose(off[0], together[0], rtol=1e-4, atol=1e-5)
    assert not torch.allclose(together[0][0], together[0][1])  # samples differ: a mix-up of rows would show
    adapter.remove()


def test_cached_schedule_resumes_exactly_and_records_its_cost(tiny_sd, tmp_path):
    cfg = _cached()
    erase(load_model(str(tiny_sd)), CAT, tmp_path / "straight", cfg, progress=False)
    first = erase(load_model(str(tiny_sd)), CAT, tmp_path / "resumed", cfg, progress=False, stop_after=2)
    assert first["status"] == "interrupted"
    run = erase(load_model(str(tiny_sd)), CAT, tmp_path / "resumed", cfg, progress=False)
    a = load_file(str(tmp_path / "straight" / "pytorch_lora_weights.safetensors"))
    b = load_file(str(tmp_path / "resumed" / "pytorch_lora_weights.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any(v.abs().sum() > 0 for k, v in a.items() if "lora.up" in k)  # it trained (B starts at zero)
    log = [json.loads(line) for line in (tmp_path / "straight" / "train_log.jsonl").read_text().splitlines()]
    assert [len(r["k"]) for r in log] == [3] * 4 and all(len(r["anchors"]) == 3 for r in log)
    # the pool: 2 prompts x 2 trajectories in one batch, with CFG, up to the furthest k used; then each step 3 samples x
    # (reference, prompt, 1 anchor) with the base model + 3 x (prompt, anchor) adapted
    straight = json.loads((tmp_path / "straight" / "erasure.json").read_text())
    furthest = max(k for r in log for k in r["k"])
    assert straight["cost"]["train_evals"] == 2 * 2 * 2 * furthest + 4 * (3 * 3 + 3 * 2)
    assert run.cost["train_evals"] < straight["cost"]["train_evals"]  # the resumed process counts its own share
    assert run.cost["calibration_evals"] > 0 and run.config["schedule"] == "cached"


def test_refreshed_trajectories_resume_exactly_inside_a_window(tiny_sd, tmp_path):
    """Window 1 is drawn by the model being trained at iteration 2; a run stopped at 3 cannot redraw it and must read
    it back from the checkpoint."""
    cfg = _cached(refresh=2, iterations=5)
    straight = erase(load_model(str(tiny_sd)), CAT, tmp_path / "straight", cfg, progress=False)
    assert erase(load_model(str(tiny_sd)), CAT, tmp_path / "resumed", cfg, progress=False, stop_after=3)["iteration"] == 3
    resumed = erase(load_model(str(tiny_sd)), CAT, tmp_path / "resumed", cfg, progress=False)
    assert resumed.losses == straight.losses
    a = load_file(str(tmp_path / "straight" / "pytorch_lora_weights.safetensors"))
    b = load_file(str(tmp_path / "resumed" / "pytorch_lora_weights.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    never = erase(load_model(str(tiny_sd)), CAT, tmp_path / "never", _cached(iterations=5), progress=False)
    assert never.losses[:2] == straight.losses[:2] and never.losses[2:] != straight.losses[2:]  # window 1 is new


@pytest.mark.parametrize("family", ["tiny_sd3", "tiny_flux"])
def test_cached_schedule_erases_on_flow_families(family, request, tmp_path, capsys):
    model = request.getfixturevalue(family)
    model = model[1] if isinstance(model, tuple) else model  # Flux: the copy unguide saved with 16 px images
    code = main(["erase", "--model", str(model), "--concept-file", str(_spec(tmp_path)), "--recipe", "selective",
                 "--schedule", "cached", "--iterations", "3", "--batch", "2", "--trajectories", "2",
                 "--calibration-samples", "1", "--calibration-steps", "2", "--out", str(tmp_path / "run")])
    captured = capsys.readouterr()
    out = captured.out
    assert code == 0, captured.err
    assert "cached schedule, 3 iterations of 2" in out and "training" in out
    meta = json.loads((tmp_path / "run" / "erasure.json").read_text())
    assert meta["config"]["schedule"] == "cached" and meta["cost"]["train_evals"] > 0


def _spec(tmp_path):
    path = tmp_path / "cat.json"
    path.write_text(json.dumps({"name": "cat", "target": "a photo of the cat", "reference": "a photo of the forest",
                                "anchors": ["a photo of the dog", ""]}))
    return path


def test_bad_schedule_is_one_line(tmp_path, capsys):
    code = main(["erase", "--concept", "sun", "--schedule", "slow", "--out", str(tmp_path / "r")])
    assert code == 2 and "slow" in capsys.readouterr().err and not (tmp_path / "r").exists()


@pytest.mark.slow
def test_benchmark_erase_prints_both_schedules_beside_generation(tmp_path, capsys):
    out = tmp_path / "cost"
    code = main(["benchmark-erase", "--concept", "sun", "--iterations", "2", "--images", "2", "--steps", "3",
                 "--samples", "1", "--out", str(out)])
    text = capsys.readouterr().out
    assert code == 0 and "fresh" in text and "cached" in text and "x" in text
    result = json.loads((out / "erase_cost.json").read_text())
    fresh, cached = result["schedules"]["fresh"], result["schedules"]["cached"]
    assert fresh["evals"] == fresh["train_evals"] + fresh["calibration_evals"]
    assert cached["calibration_evals"] < fresh["calibration_evals"]  # 6 drawings of 3 steps against 8
    assert result["generate"]["evals"] == 2 * 3 * 2  # 2 images, 3 steps, CFG
    assert set(cached["quality"]) == {"selective", "selective-image"}
    assert (out / "fresh" / "runs" / "sun" / "selective-fresh" / "erasure.json").exists()
    assert (out / "cached" / "runs" / "sun" / "selective" / "erasure.json").exists()
    assert (out / "fresh" / "images" / "sun" / "selective-image-fresh").is_dir()
