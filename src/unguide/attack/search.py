"""The attacker's two searches against a :class:`~unguide.attack.harness.Defence`: word search (gradient-free:
the concept's synonyms, vocabulary words, pairs of the best) and soft-token inversion (gradient: a few token states of
the best word's prompt optimised against the defence's loss, the gate deciding w along the way). Both resume from
their files (search.json; inversion.safetensors + inversion.json)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from ..guidance.decision import Decision
from ..io import load_tensors, save_tensors, write_json
from .defence import AttackConfig, Defence, Exposure, Probe


def vocabulary_words(tokenizer, n: int, seed: int, exclude: Sequence[str] = ()) -> list[str]:
    """n whole words from the tokenizer's vocabulary (alphabetic, 3-12 letters), drawn with a seed."""
    if n <= 0:
        return []
    words = set()
    for token in tokenizer.get_vocab():
        word = token[:-4] if token.endswith("</w>") else token  # CLIP's BPE marks word ends
        if word.startswith("##") or not word.isalpha() or not word.isascii() or not 3 <= len(word) <= 12:
            continue
        words.add(word.lower())
    words -= {w.lower() for w in exclude}
    pool = sorted(words)
    rng = np.random.default_rng(seed)
    return [pool[i] for i in rng.choice(len(pool), size=min(n, len(pool)), replace=False)]


def _scored_file(out: Path) -> Path:
    return out / "search.json"


def word_search(defence: Defence, probe: Probe, spec, cfg: AttackConfig, out: Path, progress: bool = True) -> list[dict]:
    """Score synonyms, vocabulary words and pairs of the best words; resumable (scores are kept in search.json)."""
    bundle = defence.bundle
    path = _scored_file(out)
    scored: dict[str, dict] = {r["prompt"]: r for r in json.loads(path.read_text())} if path.exists() else {}
    baseline = [(spec.target, "target")] + [(p, "synonym") for p in spec.synonym_prompts()]
    own = [spec.label or "", *spec.synonyms, *spec.heldout_synonyms]
    words = vocabulary_words(bundle.tokenizer, cfg.candidates, cfg.seed, exclude=[w for w in own if w])
    search = [(cfg.template.format(w), "word") for w in words]

    def score(batch: list[tuple[str, str]], desc: str) -> None:
        todo = [(p, kind) for p, kind in batch if p not in scored]
        bar = tqdm(total=len(todo), desc=desc, disable=not progress, unit="prompt")
        step = max(1, cfg.batch_size // len(probe))
        if defence.image_gated:
            step = max(step, 16)  # the gate's images are drawn per chunk: batches of 32 images, not 8
        for b in range(0, len(todo), step):
            chunk = todo[b:b + step]
            exposures = defence.exposures([p for p, _ in chunk])
            states = bundle.encode_prompts([p for p, _ in chunk]).float()
            losses = defence.losses(probe, states, exposures, cfg.batch_size)
            for (p, kind), e, loss in zip(chunk, exposures, losses.tolist()):
                scored[p] = {"prompt": p, "kind": kind, "loss": loss, "w": e.w, "score": e.decision.score,
                             "threshold": e.decision.threshold, "flag_rate": e.flag_rate,
                             "substitute_rate": e.substitute_rate, "suspect": bool(e.decision.suspects)}
            write_json(path, list(scored.values()))
            bar.update(len(chunk))
        bar.close()

    score(baseline + search, "attack: word search")
    best_words = [r["prompt"] for r in sorted(scored.values(), key=lambda r: r["loss"]) if r["kind"] == "word"][:cfg.pairs]
    tails = [p[len(cfg.template.format("")):] if p.startswith(cfg.template.format("")) else p for p in best_words]
    pairs = [(cfg.template.format(f"{a} {b}"), "pair") for a in tails for b in tails if a != b]
    score(pairs, "attack: word pairs")
    return sorted(scored.values(), key=lambda r: r["loss"])


def _soft_positions(bundle, prompt: str, k: int) -> list[int]:
    """Positions of the prompt's last word's tokens, extended to k positions (capped by the sequence length)."""
    ids = bundle.tokenizer(prompt, padding="max_length", max_length=bundle.max_length, truncation=True)["input_ids"]
    prefix = bundle.tokenizer(prompt.rsplit(" ", 1)[0], truncation=True, max_length=bundle.max_length)["input_ids"]
    special_end = 1 if len(prefix) >= 2 else 0  # the prefix's own end token is not part of the prompt's prefix
    start = max(1, len(prefix) - special_end)
    return list(range(start, min(start + k, len(ids))))


def invert(defence: Defence, probe: Probe, init_prompt: str, cfg: AttackConfig, out: Path,
           progress: bool = True) -> tuple[torch.Tensor, dict]:
    """Optimise ``soft_tokens`` token states of ``init_prompt`` against the probe's loss; the gate decides w for the
    current soft prompt every ``gate_every`` steps (a discrete decision: the attacker works around it, not
    through it). Checkpointed every 10 steps (inversion.safetensors + inversion.json)."""
    bundle = defence.bundle
    init = bundle.encode_prompts([init_prompt]).float().detach()
    positions = _soft_positions(bundle, init_prompt, cfg.soft_tokens)
    soft = init[0, positions].clone().requires_grad_(True)
    rms = float(init[0].pow(2).mean().sqrt())
    opt = torch.optim.Adam([soft], lr=cfg.inversion_lr * rms)
    ckpt, state_file = out / "inversion.safetensors", out / "inversion.json"
    step, history, w = 0, [], 1.0
    if ckpt.exists() and state_file.exists():
        state = json.loads(state_file.read_text())
        if state.get("init_prompt") == init_prompt and state.get("positions") == positions:
            tensors = load_tensors(ckpt)
            with torch.no_grad():
                soft.copy_(tensors["soft"])
            if "exp_avg" in tensors:  # Adam's moments, so a resumed inversion takes the steps an uninterrupted one would
                opt.state[soft] = {"step": torch.tensor(float(state["step"])), "exp_avg": tensors["exp_avg"],
                                   "exp_avg_sq": tensors["exp_avg_sq"]}
            step, history = state["step"], state["history"]

    def states_now() -> torch.Tensor:
        s = init.clone()
        s[0, positions] = soft
        return s

    def decide() -> Exposure:
        name = f"<soft {out.name} step {step}>"
        register_prompt_states(bundle, name, states_now().detach()[0])
        return defence.exposures([name])[0]

    bar = tqdm(total=cfg.inversion_steps, initial=step, desc="attack: soft-token inversion", disable=not progress)
    decision = decide() if cfg.inversion_steps else Exposure(Decision(1.0))
    while step < cfg.inversion_steps:
        if step % cfg.gate_every == 0:
            decision = decide()
        w = decision.w
        loss = defence.losses(probe, states_now(), [decision], cfg.batch_size, grad=True)[0]
        opt.zero_grad()
        loss.backward()
        opt.step()
        step += 1
        history.append({"step": step, "loss": float(loss.detach()), "w": w, "flag_rate": decision.flag_rate,
                        "substitute_rate": decision.substitute_rate})
        bar.set_postfix(loss=f"{float(loss.detach()):.4f}", w=w)
        bar.update(1)
        if step % 10 == 0 or step == cfg.inversion_steps:
            st = opt.state.get(soft, {})
            tensors = {"soft": soft.detach()}
            if "exp_avg" in st:
                tensors.update(exp_avg=st["exp_avg"], exp_avg_sq=st["exp_avg_sq"])
            save_tensors(ckpt, tensors)
            write_json(state_file, {"step": step, "init_prompt": init_prompt, "positions": positions,
                                    "history": history})
    bar.close()
    return states_now().detach()[0], {"init_prompt": init_prompt, "positions": positions, "history": history,
                                      "final_w": decide().w if cfg.inversion_steps else None}


def register_prompt_states(bundle, name: str, states: torch.Tensor) -> None:
    """Make ``name`` a prompt whose token states are ``states``: the gate, the scorers and generation then treat the
    attacker's soft prompt like any other (they all read token states through ``bundle.encode_prompts``)."""
    bundle._text_cache[name] = states.detach().to(bundle.device)
