"""Erasure training (``unguide erase``): the negative-guidance objective of ESD on a LoRA adapter.

Each iteration (METHOD.md section 2): pick a DDIM step k in [0, 50), run the *adapted* model with CFG
(scale 9) on the target prompt for k steps from fresh noise (the shared sampling loop), map k to a DDPM
time t in [k*1000/50, (k+1)*1000/50), and regress the adapted prediction for the target onto
``eps_base(ref) - eta * (eps_base(tgt) - eps_base(ref))``, computed by the same UNet with the adapter off.

All randomness of iteration i comes from a generator seeded with (seed, i) and the Adam state is
checkpointed, so a resumed run ends with exactly the adapter an uninterrupted run would.
"""
from __future__ import annotations

import json
import platform
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .adapters import LORA_FILE, AdapterConfig, make_adapter
from .concepts import ConceptSpec
from .errors import UnguideError
from .io import load_optimizer_tensors, load_tensors, optimizer_tensors, save_tensors, write_json, write_text
from .sampling import cfg_noise_fn, ddim_loop, make_scheduler, unet_eps

METADATA_FILE = "erasure.json"
CHECKPOINT = "checkpoint.safetensors"
CHECKPOINT_STATE = "checkpoint.json"
LOG_FILE = "train_log.jsonl"


@dataclass
class EraseConfig:
    """Defaults are the reference protocol's (METHOD.md section 2)."""

    preset: str = "object"
    iterations: int = 200
    lr: float = 3e-5
    eta: float = 2.0  # negative-guidance strength
    start_guidance: float = 9.0  # CFG scale of the partial trajectories
    ddim_steps: int = 50
    rank: int = 1
    alpha: float = 8.0
    seed: int = 0
    checkpoint_every: int = 20
    # "reference": t drawn in [k*1000/50, (k+1)*1000/50) as the reference code does, although z_k (k steps from
    # noise) sits near timestep 1000 - k*20; "aligned": t is the timestep z_k actually sits at
    timestep_mapping: str = "reference"

    def adapter_config(self) -> AdapterConfig:
        return AdapterConfig(self.preset, self.rank, self.alpha)


def _iteration_sample(cfg: EraseConfig, i: int, latent_shape) -> tuple[int, int, torch.Tensor]:
    """(k, ddpm_t, z_T) of iteration i: a pure function of (seed, i)."""
    g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + i)
    k = int(torch.randint(0, cfg.ddim_steps, (1,), generator=g))
    lo, hi = round(k / cfg.ddim_steps * 1000), round((k + 1) / cfg.ddim_steps * 1000)
    t = int(torch.randint(lo, hi, (1,), generator=g))
    z = torch.randn((1, *latent_shape), generator=g)
    return k, t, z


def erasure_loss(unet, adapter, sched, cfg: EraseConfig, k: int, t: int, z: torch.Tensor, prompts) -> torch.Tensor:
    """The negative-guidance loss at one (k, t, z_T); gradients flow into the adapter only."""
    tgt, ref, empty = prompts
    with torch.no_grad():
        z_k = ddim_loop(sched, z * sched.init_noise_sigma, cfg_noise_fn(unet, tgt, empty, cfg.start_guidance), stop=k)
        with adapter.base():
            e_ref, e_tgt = unet_eps(unet, torch.cat([z_k, z_k]), t, torch.cat([ref, tgt])).chunk(2)
        target = e_ref - cfg.eta * (e_tgt - e_ref)
    pred = unet_eps(unet, z_k, t, tgt)
    return F.mse_loss(pred.float(), target.float())


def concept_prompts(bundle, concept: ConceptSpec):
    dtype = bundle.unet.dtype
    return tuple(bundle.encode_prompts([p]).to(dtype) for p in (concept.target, concept.reference, ""))


def erase(bundle, concept: ConceptSpec, out: str | Path, cfg: EraseConfig = EraseConfig(), progress: bool = True,
          stop_after: Optional[int] = None) -> dict:
    """Train (or resume) an erasure run into ``out``; returns the run's metadata. The bundle's UNet is left
    as the base model (load the result with :func:`attach_erasure`).

    ``stop_after`` ends the process-level run early after that many iterations (for tests of resume)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    meta_path = out / METADATA_FILE
    fingerprint = bundle.fingerprint()
    if meta_path.exists():
        done = json.loads(meta_path.read_text())
        if done.get("status") == "finished":
            if done.get("base_fingerprint") != fingerprint or done.get("config") != asdict(cfg) \
                    or done.get("concept") != concept.to_dict():
                raise UnguideError(f"{out} already holds a finished run with other settings: choose another --out")
            return done
    unet = bundle.unet
    adapter = make_adapter(unet, cfg.adapter_config(), init_seed=cfg.seed)
    opt = torch.optim.Adam(adapter.parameters(), lr=cfg.lr)
    losses: list[float] = []
    start = 0
    state_path = out / CHECKPOINT_STATE
    if state_path.exists():
        state = json.loads(state_path.read_text())
        if state.get("config") != asdict(cfg) or state.get("base_fingerprint") != fingerprint:
            raise UnguideError(f"{out} holds a checkpoint of a different run (settings or base model differ): "
                               "use another --out or delete that directory")
        tensors = load_tensors(out / CHECKPOINT)
        adapter.load_trainable_state({k[8:]: v for k, v in tensors.items() if k.startswith("adapter.")})
        load_optimizer_tensors(opt, tensors)
        start, losses = int(state["iteration"]), list(state["losses"])
    _truncate_log(out / LOG_FILE, start)  # iterations after the last checkpoint are redone, not logged twice
    shape = bundle.latent_shape()
    device, dtype = bundle.device, unet.dtype
    tgt, ref, empty = concept_prompts(bundle, concept)
    sched = make_scheduler(bundle, cfg.ddim_steps)
    t0 = time.time()
    unet.train()
    bar = tqdm(range(start, cfg.iterations), initial=start, total=cfg.iterations, desc=f"erase {concept.name}",
               disable=not progress)
    for i in bar:
        k, t, z = _iteration_sample(cfg, i, shape)
        if cfg.timestep_mapping == "aligned":
            t = int(sched.timesteps[k])
        loss = erasure_loss(unet, adapter, sched, cfg, k, t, z.to(device=device, dtype=dtype), (tgt, ref, empty))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(round(loss.item(), 6))
        bar.set_postfix(loss=f"{loss.item():.4f}")
        with open(out / LOG_FILE, "a") as f:
            f.write(json.dumps({"iteration": i + 1, "k": k, "t": t, "loss": losses[-1]}) + "\n")
        last = i + 1 == cfg.iterations
        if (i + 1) % cfg.checkpoint_every == 0 and not last:
            _checkpoint(out, adapter, opt, i + 1, losses, cfg, fingerprint)
        if stop_after is not None and i + 1 - start >= stop_after and not last:
            _checkpoint(out, adapter, opt, i + 1, losses, cfg, fingerprint)
            unet.eval()
            adapter.remove()
            return {"status": "interrupted", "iteration": i + 1}
    unet.eval()
    weights = adapter.save(out)
    adapter.remove()  # leave the bundle as it came: the base model
    meta = {"status": "finished", "concept": concept.to_dict(), "config": asdict(cfg), "base_model": bundle.name,
            "base_fingerprint": fingerprint, "weights": weights.name, "losses": losses, "final_loss": losses[-1] if losses else None,
            "train_seconds_this_process": round(time.time() - t0, 1), "versions": _versions()}
    write_json(meta_path, meta)
    for name in (CHECKPOINT, CHECKPOINT_STATE):
        (out / name).unlink(missing_ok=True)
    return meta


def _truncate_log(path: Path, iteration: int) -> None:
    if not path.exists():
        return
    rows = [line for line in path.read_text().splitlines() if line.strip()]
    keep = [line for line in rows if json.loads(line)["iteration"] <= iteration]
    if len(keep) != len(rows):
        write_text(path, "".join(line + "\n" for line in keep))


def _checkpoint(out: Path, adapter, opt, iteration: int, losses, cfg: EraseConfig, fingerprint: str) -> None:
    tensors = {f"adapter.{k}": v for k, v in adapter.trainable_state().items()}
    tensors.update(optimizer_tensors(opt))
    save_tensors(out / CHECKPOINT, tensors)
    write_json(out / CHECKPOINT_STATE, {"iteration": iteration, "losses": losses, "config": asdict(cfg),
                                        "base_fingerprint": fingerprint})


def _versions() -> dict:
    import diffusers
    import peft
    import transformers

    return {"python": platform.python_version(), "torch": torch.__version__, "diffusers": diffusers.__version__,
            "transformers": transformers.__version__, "peft": peft.__version__}


def read_run(run_dir: str | Path) -> dict:
    """A finished run's metadata, with clear errors for anything else."""
    run_dir = Path(run_dir)
    meta_path = run_dir / METADATA_FILE
    if not run_dir.is_dir():
        raise UnguideError(f"erasure run {run_dir} not found: pass the --out directory of `unguide erase`")
    if not meta_path.is_file():
        raise UnguideError(f"{run_dir} is not a finished erasure run (no {METADATA_FILE}): rerun `unguide erase` to finish it")
    try:
        meta = json.loads(meta_path.read_text())
    except json.JSONDecodeError:
        raise UnguideError(f"{meta_path} is not valid JSON: the run directory is damaged, rerun `unguide erase`") from None
    if meta.get("status") != "finished" or not (run_dir / meta.get("weights", LORA_FILE)).is_file():
        raise UnguideError(f"{run_dir} is not a finished erasure run: rerun `unguide erase` to finish it")
    return meta


def attach_erasure(bundle, run_dir: str | Path):
    """Load a finished run's adapter onto the bundle's UNet, refusing runs trained on another base model."""
    from .adapters import load_adapter

    meta = read_run(run_dir)
    if meta["base_fingerprint"] != bundle.fingerprint():
        raise UnguideError(f"erasure run {run_dir} was trained on another base model ({meta['base_model']}, fingerprint "
                           f"{meta['base_fingerprint']}) than {bundle.name}: use --model {meta['base_model']} or retrain")
    cfg = meta["config"]
    adapter = load_adapter(bundle.unet, run_dir, AdapterConfig(cfg["preset"], cfg["rank"], cfg["alpha"]))
    return adapter, meta

