"""The page of ``unguide serve``: a Gradio app over a :class:`~unguide.serve.studio.Studio`.

Every handler takes the page's values, hands them to the studio, and turns an :class:`UnguideError` into a message on
the page (never a traceback). Everything that draws shares one queue slot (``concurrency_id="model"``): the model and
its attached adapter serve one request at a time, the rest wait in a bounded queue. The page loads nothing from
outside the server (system fonts; images inline), so it works offline and logs no failed fetches.
"""
from __future__ import annotations

import base64
import html
import io
from pathlib import Path
from typing import Optional

from .studio import VIEWS, Comparison, Studio
from ..errors import UnguideError
from ..guidance.config import GATE_CHOICES

RUN_OWN_GATE = "run's own"
THUMBNAIL = 256  # longest side of the images shown inline; the download has them at full size
CSS = """
#results table {border-collapse: collapse; width: 100%;}
#results th, #results td {border-bottom: 1px solid var(--border-color-primary); padding: 6px; vertical-align: top;
  text-align: left;}
#results img {width: 112px; height: 112px; image-rendering: pixelated; margin: 2px; border-radius: 4px;}
#results .fired {color: #b42318; font-weight: 600;}
#results .kept {color: #067647;}
#results .small {font-size: 0.85em; opacity: 0.85;}
"""


def build_page(studio: Studio):
    """The Gradio Blocks of the page (queued, not launched)."""
    import gradio as gr

    limits = studio.limits
    names = studio.run_names()
    with gr.Blocks(title="unguide", analytics_enabled=False, delete_cache=(3600, 3600)) as page:
        gr.Markdown(f"# unguide: erase a concept, then try prompts\nModel **{_md(studio.model_name)}**. "
                    "Each prompt is drawn with the same seeds three ways: by the base model, by the erasure adapter "
                    "alone, and with UnGuidance (the run's gate decides, per prompt or per image, whether the "
                    "adapter or the base model guides).")
        with gr.Row():
            run = gr.Dropdown(names, value=names[0] if names else None, label="Erasure run", elem_id="run",
                              allow_custom_value=True, scale=4)
            refresh = gr.Button("Refresh list", elem_id="refresh", scale=1)
        run_info = gr.Markdown(_describe(studio, names[0]) if names else _no_runs(studio), elem_id="run-info")
        ui = _compare_tab(gr, limits)
        preset, recipe, iterations, erase_go, erase_status = _erase_tab(gr, studio)

        def on_compare(run_name, text, count, first_seed, step_count, gate_name):
            try:
                c = studio.compare(run_name, text, count, first_seed, step_count, _gate(gate_name))
            except UnguideError as exc:
                return _problem(exc), "", None
            return _summary(c), render_comparison(c), str(studio.archive(c))

        def on_neighbours(run_name, first_seed, step_count, gate_name):
            try:
                rows = studio.neighbour_prompts(run_name)
                c = studio.compare(run_name, [p for _, p in rows], 1, first_seed, step_count, _gate(gate_name))
            except UnguideError as exc:
                return _problem(exc), "", None
            return _summary(c), render_comparison(c, kinds=[k for k, _ in rows]), str(studio.archive(c))

        def on_erase(preset_name, recipe_name, count, progress=gr.Progress(track_tqdm=True)):
            try:
                name = studio.erase(preset_name, recipe_name, count, progress=True)
            except UnguideError as exc:
                return _problem(exc), gr.update(), gr.update()
            choices = studio.run_names()
            return (f"Erased **{_md(preset_name)}** into run `{_md(name)}`; it is selected above.",
                    gr.update(choices=choices, value=name), _describe(studio, name))

        def on_refresh(current):
            choices = studio.run_names()
            value = current if current in choices else (choices[0] if choices else None)
            return gr.update(choices=choices, value=value), _describe(studio, value) if value else _no_runs(studio)

        model_slot = {"concurrency_limit": limits.concurrency, "concurrency_id": "model"}
        outputs = [ui.status, ui.results, ui.download]
        ui.go.click(on_compare, [run, ui.prompts, ui.n, ui.seed, ui.steps, ui.gate], outputs, api_name="compare",
                    **model_slot)
        ui.near.click(on_neighbours, [run, ui.seed, ui.steps, ui.gate], outputs, api_name="neighbours", **model_slot)
        erase_go.click(on_erase, [preset, recipe, iterations], [erase_status, run, run_info], api_name="erase",
                       **model_slot)
        refresh.click(on_refresh, [run], [run, run_info], api_name="refresh")
        run.change(lambda name: _describe(studio, name), [run], [run_info], api_name=False)
        page.load(on_refresh, [run], [run, run_info], api_name=False)
    page.queue(max_size=limits.queue_size)
    return page


def _compare_tab(gr, limits):
    """The Compare tab's widgets: prompts, images per prompt, seed, steps, gate, the buttons and the results."""
    from types import SimpleNamespace

    with gr.Tab("Compare"):
        prompts = gr.Textbox(label=f"Prompts, one a line (at most {limits.max_prompts})", lines=3,
                             placeholder="a photo of the sun\na photo of the boat", elem_id="prompts")
        with gr.Row():
            n = gr.Slider(1, limits.max_images_per_prompt, value=1, step=1, label="Images per prompt", elem_id="n")
            seed = gr.Number(0, label="Seed (image j uses seed + j)", precision=0, elem_id="seed")
            steps = gr.Slider(limits.min_steps, limits.max_steps, value=50, step=1, label="DDIM steps",
                              elem_id="steps")
            gate = gr.Dropdown([RUN_OWN_GATE, *GATE_CHOICES], value=RUN_OWN_GATE, label="Gate", elem_id="gate")
        with gr.Row():
            go = gr.Button("Generate", variant="primary", elem_id="generate")
            near = gr.Button("Synonyms and neighbours", elem_id="neighbours")
        status = gr.Markdown("", elem_id="status")
        results = gr.HTML("", elem_id="results")
        download = gr.File(label="Images and settings (zip)", elem_id="download")
    return SimpleNamespace(prompts=prompts, n=n, seed=seed, steps=steps, gate=gate, go=go, near=near, status=status,
                           results=results, download=download)


def _erase_tab(gr, studio):
    """The Erase tab's widgets: (preset, recipe, iterations, button, status)."""
    with gr.Tab("Erase a concept"):
        presets = studio.presets()
        preset = gr.Dropdown(presets, value=presets[0] if presets else None, label="Concept preset", elem_id="preset")
        recipe = gr.Radio(["selective", "reference"], value="selective", label="Recipe", elem_id="recipe")
        iterations = gr.Number(200, label="Iterations", precision=0, elem_id="iterations")
        erase_go = gr.Button("Erase", variant="primary", elem_id="erase")
        erase_status = gr.Markdown("", elem_id="erase-status")
    return preset, recipe, iterations, erase_go, erase_status


def theme():
    """The default look with system fonts only: nothing is fetched from a font service."""
    import gradio as gr

    return gr.themes.Default(font=["ui-sans-serif", "system-ui", "sans-serif"],
                             font_mono=["ui-monospace", "SFMono-Regular", "monospace"])


def render_comparison(c: Comparison, kinds: Optional[list[str]] = None) -> str:
    """One table row per prompt: the prompt with its gate decision, then the three views' images (same seeds)."""
    head = "".join(f"<th>{html.escape(label)}</th>" for _, label, _ in VIEWS)
    body = []
    for i, row in enumerate(c.rows):
        kind = f"<div class='small'>{html.escape(kinds[i])}</div>" if kinds else ""
        cells = []
        for view, _, _ in VIEWS:
            imgs = []
            for j, path in enumerate(row.images[view]):
                caption = f"{view}, seed {row.seeds[j]}"
                imgs.append(f"<img src='{_data_uri(path)}' alt='{html.escape(caption)}' title='{html.escape(caption)}'"
                            f" data-view='{view}'>")
            if view == "unguidance":
                imgs.append("<div class='small'>" + "; ".join(filter(None, map(_image_verdict, row.scores))) + "</div>")
            cells.append(f"<td>{''.join(imgs)}</td>")
        body.append(f"<tr data-prompt-index='{i}'><td>{kind}<b>{html.escape(row.prompt)}</b>"
                    f"<div class='decision' data-decision='{_decision_code(row.scores)}'>{decision_text(row)}</div>"
                    f"</td>{''.join(cells)}</tr>")
    return f"<table><tr><th>prompt and gate decision</th>{head}</tr>{''.join(body)}</table>"


def decision_text(row) -> str:
    """The gate's numbers for a prompt: the prompt gate's score against its threshold, w, and the image gate."""
    s, parts = row.scores[0] if row.scores else {}, []
    if s.get("score") is not None and s.get("threshold") is not None:
        over = s["score"] > s["threshold"]
        parts.append(f"prompt score {s['score']:.4g} {'&gt;' if over else '&le;'} threshold {s['threshold']:.4g}"
                     + (" (a suspect: the image gate looks at it more leniently)" if s.get("suspects") else ""))
    ws = sorted({w for w in row.w if w is not None})
    if ws:
        parts.append("w = " + ", ".join(f"{w:g}" for w in ws))
    flagged = [x.get("image_flagged") for x in row.scores if "image_flagged" in x]
    if flagged:
        fired = sum(bool(f) for f in flagged)
        threshold = row.scores[0].get("image_threshold")
        verdict = (f"<span class='fired'>image gate fired on {fired} of {len(flagged)}</span>" if fired
                   else f"<span class='kept'>image gate did not fire (0 of {len(flagged)})</span>")
        parts.append(verdict + (f" (it fires when an image scores below {threshold:.3f}: the concept's prompts explain "
                                f"the image better than the anchors)" if threshold is not None else ""))
    if s.get("concepts") is not None:
        parts.append("erased for: " + (", ".join(html.escape(x) for x in s["concepts"]) or "none"))
    return "<br>".join(parts) or "no gate scores (base model)"


def _decision_code(scores: list[dict]) -> str:
    flagged = [bool(s.get("image_flagged")) for s in scores if "image_flagged" in s]
    if flagged:
        return "image-fired" if any(flagged) else "image-kept"
    if scores and scores[0].get("score") is not None and scores[0].get("threshold") is not None:
        return "prompt-erased" if scores[0]["score"] > scores[0]["threshold"] else "prompt-kept"
    return "none"


def _image_verdict(s: dict) -> str:
    if "image_flagged" not in s or s.get("image_score") is None:
        return ""
    word = "<span class='fired'>fired</span>" if s["image_flagged"] else "<span class='kept'>kept</span>"
    threshold = s.get("image_threshold")
    versus = "" if threshold is None else (" &lt; " if s["image_flagged"] else " &ge; ") + f"{threshold:.3f}"
    return f"{word}: score {s['image_score']:.3f}{versus}"


def _data_uri(path: Path) -> str:
    from PIL import Image

    with Image.open(path) as im:
        im = im.convert("RGB")
        if max(im.size) > THUMBNAIL:
            im.thumbnail((THUMBNAIL, THUMBNAIL))
        buf = io.BytesIO()
        im.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _gate(name: Optional[str]) -> Optional[str]:
    return None if name in (None, "", RUN_OWN_GATE) else name


def _summary(c: Comparison) -> str:
    n, first = c.settings["images_per_prompt"], c.settings["seed"]
    seeds = f"seed {first}" if n == 1 else f"seeds {first} to {first + n - 1}"
    return (f"Drew {len(c.rows)} prompt(s) x {n} image(s) three ways in {c.seconds:.1f} s "
            f"(run `{_md(c.run)}`, {seeds}, "
            f"{c.settings['steps']} steps, gate {_md(c.settings['gate'])}).")


def _problem(exc: Exception) -> str:
    return f"**Cannot do that:** {_md(str(exc))}"


def _describe(studio: Studio, name: Optional[str]) -> str:
    try:
        d = studio.describe(name)
    except UnguideError as exc:
        return _problem(exc)
    gate = f"gate **{d['gate']}**"
    if d["threshold"] is not None:
        gate += f", prompt threshold {d['threshold']:.4g}"
    if d["image_threshold"] is not None:
        gate += f", image threshold {d['image_threshold']:.3f}"
    members = f" (concepts: {', '.join(d['members'])})" if d["members"] else ""
    return (f"Run `{_md(d['name'])}`: concept **{_md(d['concept'])}**{members}, "
            f"{d['recipe']} recipe, {gate}.")


def _no_runs(studio: Studio) -> str:
    return (f"No finished erasure runs under `{_md(str(studio.catalog.root))}` yet: erase one in the "
            "*Erase a concept* tab, run `make demo`, or start with `--runs DIR`.")


def _md(text: str) -> str:
    """Text from a user or a file, shown in Markdown: no HTML gets through (quotes stay readable)."""
    return html.escape(str(text), quote=False)
