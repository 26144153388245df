"""Benchmark reports: report.md and report.html with the Table-1-shaped table, image grids and plots."""
from __future__ import annotations

import html
import json
import math
from pathlib import Path
from typing import Optional

import numpy as np

from ..io import write_text
from .grids import GRID_SAMPLES, save_labelled_grid
from .metrics.nudity import EXPOSED_CLASSES

TABLE1_COLUMNS = [("acc_e", "Acc_e ↓"), ("acc_s", "Acc_s (held-out classes) ↑"), ("acc_g", "Acc_g ↓"),
                  ("acc_g_heldout", "Acc_g held-out words ↓"), ("acc_anchor", "Acc anchor classes ↑"),
                  ("h_o", "H_o ↑"), ("h_o_top1", "H_o top-1 ↑"), ("ssim_other", "SSIM vs base (others) ↑"),
                  ("pixel_error_other", "pixel err vs base ↓"), ("fid_other", "FID others ↓"),
                  ("image_flagged_other", "image gate fired on held-out classes ↓")]
NUDITY_COLUMNS = [("exposed_" + c.lower(), c.replace("_EXPOSED", "").replace("_", " ").lower()) for c in EXPOSED_CLASSES] + [
    ("exposed_total", "total exposed ↓"), ("images_with_exposed", "images with any ↓"), ("clip_score", "CLIP score ↑"),
    ("fid", "FID ↓"), ("to_adapter", "prompts to adapter")]
def columns_for(report: dict) -> list[tuple[str, str]]:
    return NUDITY_COLUMNS if report.get("suite") == "nudity" else TABLE1_COLUMNS




def _number(value: float, digits: int) -> str:
    """``value`` with ``digits`` decimals, never "-0.000": a figure that rounds to zero prints as zero."""
    text = f"{value:.{digits}f}"
    return text[1:] if text.startswith("-") and float(text) == 0 else text


def _fmt(key: str, value) -> str:
    """One table cell: percentages with 2 decimals, counts with none, anything else with 3; '–' where missing."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if key.startswith(("acc", "h_o", "image_flagged")):
        return _number(100 * value, 2)
    if key.startswith(("exposed", "images_with", "to_adapter")):
        return _number(value, 0)
    return _number(value, 3)


def table_rows(report: dict, average: bool = False) -> list[tuple[str, str, dict]]:
    """(concept, method, metrics) for every concept and method, or with ``average`` the average's rows."""
    if average:
        return [("average", method, m) for method, m in report["average"].items()]
    return [(concept, method, m) for concept, methods in report["per_concept"].items() for method, m in methods.items()]


def markdown_table(report: dict, average_only: bool = False) -> str:
    """The per-concept table, or with ``average_only`` the average over concepts."""
    columns = columns_for(report)
    head = "| concept | method | " + " | ".join(label for _, label in columns) + " |"
    sep = "|" + "---|" * (len(columns) + 2)
    lines = [head, sep]
    for concept, method, m in table_rows(report, average_only):
        lines.append(f"| {concept} | {method} | " + " | ".join(_fmt(k, m.get(k)) for k, _ in columns) + " |")
    return "\n".join(lines)


def grid_prompts(case) -> list[str]:
    """Rows of a concept's grid: target, a trained synonym, held-out synonyms, three other classes; for a suite of
    CSV prompts (nudity), its first six prompts."""
    spec = case.spec
    if case.rows and case.rows[0]["role"] == "prompt":
        return list(dict.fromkeys(r["prompt"] for r in case.rows))[:6]
    return [spec.target] + spec.synonym_prompts(heldout=False)[:1] + spec.synonym_prompts(heldout=True) + spec.other[:3]


TOGETHER = "+together"  # a method's images drawn with the whole group's run (benchmark --together)


def method_folder(out: Path, concept: str, method: str, group: Optional[list] = None,
                  schedule: Optional[str] = None) -> Path:
    """Where a benchmark keeps a method's images of a concept: the shared base folder, the concept's own, or the
    group's (``METHOD+together``, one folder for the union of the members' prompts); a schedule other than the
    method's recipe's own adds ``-SCHEDULE`` (:func:`~unguide.evaluation.methods.schedule_suffix`)."""
    from .methods import schedule_suffix

    suffix = schedule_suffix(method, schedule)
    if method.endswith(TOGETHER) and group:
        return Path(out) / "images" / ("together-" + "+".join(group)) / (method.removesuffix(TOGETHER) + suffix)
    return Path(out) / "images" / ("base" if method == "base" else f"{concept}/{method}{suffix}")


def _concept_grid(out: Path, concept: str, case, methods: list[str], group: Optional[list] = None,
                  schedule: Optional[str] = None) -> Path:
    """Rows: :func:`grid_prompts`; columns: methods (same seeds; ``METHOD+together``: the group's images)."""
    prompts = grid_prompts(case)
    cells = [(method_folder(out, concept, m, group, schedule), p) for p in prompts for m in methods]
    return save_labelled_grid(out / "grids" / f"{concept}.png", cells, len(methods), prompts, methods)


def _plots(out: Path, report: dict) -> list[Path]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # plots are optional extras
        return []
    paths = []
    concepts = list(report["per_concept"])
    methods = list(next(iter(report["per_concept"].values())))
    fig, ax = plt.subplots(figsize=(max(6, len(concepts) * 0.9), 3.2))
    width = 0.8 / len(methods)
    for j, method in enumerate(methods):
        ax.bar(np.arange(len(concepts)) + j * width, [100 * report["per_concept"][c][method]["h_o"] for c in concepts],
               width, label=method)
    ax.set_xticks(np.arange(len(concepts)) + 0.4 - width / 2, concepts)
    ax.set_ylabel("H_o (%)")
    ax.set_ylim(0, 100)
    ax.legend(ncol=len(methods), fontsize=8, loc="lower right")
    ax.set_title("Per-concept H_o by method")
    fig.tight_layout()
    paths.append(out / "plots" / "h_o.png")
    paths[-1].parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)
    for method in [m for m in methods if m.endswith("unguide")]:
        points = [(v["role"], v["score"] / v["threshold"]) for c in concepts
                  for v in report["per_concept"][c].get(method, {}).get("influence", {}).values()
                  if v.get("score") and v.get("threshold")]
        if not points:
            continue
        fig, ax = plt.subplots(figsize=(6, 3.2))
        roles = ["erased", "synonym", "heldout", "anchor", "other"]
        for k, role in enumerate(roles):
            ys = [r for ro, r in points if ro == role]
            ax.scatter(np.full(len(ys), k) + np.random.default_rng(k).uniform(-0.15, 0.15, len(ys)), ys, s=12, label=role)
        ax.axhline(1.0, color="k", lw=0.8, ls="--")
        ax.set_xticks(range(len(roles)), ["target", "synonym", "held-out word", "anchor class", "held-out class"])
        ax.set_yscale("log")
        ax.set_ylabel("d(c) / gate threshold")
        ax.set_title(f"{method}: above the line the adapter leads (w = -1)")
        fig.tight_layout()
        paths.append(out / "plots" / f"influence_{method}.png")
        fig.savefig(paths[-1], dpi=110)
        plt.close(fig)
    return paths


def _protocol(report: dict, suite) -> str:
    """The paragraph that says how the figures were made."""
    cfg = report["config"]
    protocol = (f"suite `{suite.name}`, model `{report['model']}`, {cfg['samples']} samples per prompt, {cfg['steps']} "
                f"DDIM steps, guidance {report['guidance']}, seeds {cfg['seed']}..{cfg['seed'] + cfg['samples'] - 1} "
                f"(CSV rows: their own seed and guidance); {suite.description}.")
    if suite.metrics == "table1":
        protocol += (" Acc_s and the preservation columns use the held-out classes only (never trained on by any "
                     "recipe); the classes named as anchors are in their own column.")
    together = report.get("together")
    if together:
        protocol += (f" Erased together: {', '.join(together['concepts'])} (`METHOD+together`: one group run, every "
                     "prompt gated against every concept; `METHOD`: each concept's own run). The group's own classes "
                     f"leave every preservation figure; remaining classes: {', '.join(together['remaining_classes'])} "
                     f"(seen as anchors by some member: {', '.join(together['anchored_by_the_group']) or 'none'}).")
    return protocol


def _html_table(report: dict, average_only: bool) -> str:
    columns = columns_for(report)
    head = "".join(f"<th>{html.escape(label)}</th>" for _, label in columns)
    body = []
    for concept, method, m in table_rows(report, average_only):
        cls = ' class="ours"' if method == "selective-unguide" else ""
        body.append(f"<tr{cls}><td>{html.escape(concept)}</td><td>{html.escape(method)}</td>"
                    + "".join(f"<td>{_fmt(k, m.get(k))}</td>" for k, _ in columns) + "</tr>")
    return f"<table><tr><th>concept</th><th>method</th>{head}</tr>{''.join(body)}</table>"


def write_report(out: str | Path, report: dict, suite) -> tuple[Path, Path]:
    """report.md and report.html beside the benchmark's images: tables, plots, grids and, once attacked, the attack."""
    out = Path(out)
    methods = list(next(iter(report["per_concept"].values())))
    group = (report.get("together") or {}).get("concepts")
    schedule = report.get("config", {}).get("erase_schedule")
    grids = {c: _concept_grid(out, c, suite.cases[c], methods, group, schedule) for c in report["per_concept"]}
    plots = _plots(out, report) if suite.metrics == "table1" else []
    protocol = _protocol(report, suite)
    # one concept: its table only (the average over one concept repeats it)
    single = len(report["per_concept"]) == 1
    tables = ([("Results", False)] if single else [("Average over concepts", True), ("Per concept", False)])
    md = ["# unguide benchmark", "", protocol, ""]
    for title, average in tables:
        md += [f"## {title}", "", markdown_table(report, average), ""]
    md += [f"![{p.stem}]({p.relative_to(out)})" for p in plots]
    rows_text = ("the first prompts" if suite.metrics == "nudity" else
                 "target, a synonym, held-out synonyms, 3 other classes")
    md += ["", f"## Grids (rows: {rows_text}; columns: " + ", ".join(methods) + ")", ""]
    md += [f"### {c}\n\n![{c}]({g.relative_to(out)})\n" for c, g in grids.items()]
    attack = attack_summary(out)
    if attack:
        md += ["## Under attack", "", attack, ""]
    md_path = out / "report.md"
    write_text(md_path, "\n".join(md) + "\n")
    page = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>unguide benchmark</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em; max-width: 1200px; color: #222; }}
table {{ border-collapse: collapse; margin: 1em 0; font-size: 14px; }}
th, td {{ border: 1px solid #ccc; padding: 4px 8px; text-align: right; }}
th {{ background: #f3f3f3; }} td:first-child, td:nth-child(2) {{ text-align: left; }}
tr.ours {{ background: #eef7ee; font-weight: 600; }}
img {{ image-rendering: pixelated; max-width: 100%; border: 1px solid #ddd; margin: 4px 0; }}
.caption {{ color: #555; font-size: 13px; }}
</style></head><body>
<h1>unguide benchmark</h1>
<p class="caption">{html.escape(protocol)}</p>
{''.join(f"<h2>{title}</h2>{_html_table(report, average)}" for title, average in tables)}
{_markdown_table_html(attack, "Under attack") if attack else ""}
<h2>Plots</h2>{''.join(f'<img src="{p.relative_to(out)}" alt="{p.stem}">' for p in plots)}
<h2>Grids</h2><p class="caption">Rows: {html.escape(rows_text)}.
Columns: {html.escape(', '.join(methods))} ({GRID_SAMPLES} samples each, same seeds).</p>
{''.join(f'<h3>{html.escape(c)}</h3><img src="{g.relative_to(out)}" alt="grid {html.escape(c)}">' for c, g in grids.items())}
</body></html>
"""
    html_path = out / "report.html"
    write_text(html_path, page)
    return md_path, html_path


def attack_summary(out: Path) -> str:
    """The benchmark report's attack columns, when ``unguide attack`` has run on its directory: per method, the mean
    success rate of each attack over the attacked concepts (details: attack/report.html)."""
    path = out / "attack" / "report.json"
    if not path.exists():
        return ""
    results = json.loads(path.read_text())["results"]
    methods = list(dict.fromkeys(m for per in results.values() for m in per))
    picks = [("target as written", lambda r: r["plain"]["success_rate"]),
             ("word search (top-1)", lambda r: r["word_search"]["success_rate"]),
             ("soft-token inversion", lambda r: r.get("inversion", {}).get("success_rate")),
             ("any", lambda r: r["any_success_rate"])]
    lines = [f"Success rates (% of images showing the erased concept) under `unguide attack`, mean over "
             f"{', '.join(results)}; details: [attack/report.html](attack/report.html).", "",
             "| method | " + " | ".join(name for name, _ in picks) + " | UNet evals per attack |",
             "|" + "---|" * (len(picks) + 2)]
    for m in methods:
        rs = [per[m] for per in results.values() if m in per]
        cells = []
        for _, pick in picks:
            vals = [pick(r) for r in rs if pick(r) is not None]
            cells.append(_number(100 * np.mean(vals), 0) if vals else "–")
        evals = np.mean([r["budget"]["unet_evals"] for r in rs])
        lines.append(f"| {m} | " + " | ".join(cells) + f" | {evals:,.0f} |")
    return "\n".join(lines)


def _markdown_table_html(text: str, title: str) -> str:
    """A small markdown block (a paragraph and one table) as HTML."""
    rows = [line for line in text.splitlines() if line.startswith("|") and not line.startswith("|---")]
    para = html.escape(text.splitlines()[0])
    cells = [[html.escape(c.strip()) for c in row.strip("|").split("|")] for row in rows]
    head = "".join(f"<th>{c}</th>" for c in cells[0])
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in cells[1:])
    return f"<h2>{html.escape(title)}</h2><p class=\"caption\">{para}</p><table><tr>{head}</tr>{body}</table>"


ATTACK_COLUMNS = [("plain", "target as written"), ("synonym", "best synonym"), ("word", "word search (top-1 by loss)"),
                  ("word_top", "best of top-3 words"), ("inversion", "soft-token inversion"), ("any", "any")]


def _attack_cells(r: dict) -> dict[str, str]:
    def cell(rate, mean_p):
        return "–" if rate is None else f"{_number(100 * rate, 0)}% ({_number(100 * mean_p, 0)})"

    syn = max(r["synonyms"].values(), key=lambda v: v["success_rate"], default=None)
    ws, inv = r["word_search"], r.get("inversion", {})
    return {"plain": cell(r["plain"]["success_rate"], r["plain"]["mean_p"]),
            "synonym": cell(syn["success_rate"], syn["mean_p"]) if syn else "–",
            "word": cell(ws["success_rate"], ws["mean_p"]),
            "word_top": cell(ws["best_of_top"]["success_rate"], ws["best_of_top"]["mean_p"]),
            "inversion": cell(inv.get("success_rate"), inv.get("mean_p")),
            "any": f"{_number(100 * r['any_success_rate'], 0)}%"}


def _attack_grid(out: Path, concept: str, results: dict) -> Path:
    """Rows: methods; columns: 4 images of the word search's top prompt, then 4 of the inverted soft prompt."""
    cells = [(out / concept / m / "images", p) for m, r in results.items()
             for p in (r["word_search"]["best_prompt"], f"<inverted {r['concept']}>")]
    return save_labelled_grid(out / "grids" / f"{concept}.png", cells, 2, list(results),
                      ["best word prompt", "inverted soft prompt"])


def write_attack_report(out: str | Path, report: dict) -> tuple[Path, Path]:
    """attack report.md / .html: per concept and method, how often each attack brings the concept back."""
    out = Path(out)
    cfg = report["config"]
    intro = (f"Success rate = share of images (of {cfg['samples']} seeds) where the judge gives the erased concept "
             f"probability >= 0.5; in brackets the mean probability (%). Word search: {cfg['candidates']} vocabulary "
             f"words + the concept's synonyms + pairs of the {cfg['pairs']} best, scored by the defended model's "
             f"denoising loss on {cfg['renders']} concept images x {cfg['draws']} noise draws; the attacker keeps "
             f"its top prompt by loss (no judge in the loop). Inversion: {cfg['soft_tokens']} token states of that "
             f"prompt optimised for {cfg['inversion_steps']} steps. UnGuide methods are attacked through their gate "
             "(the gate decides w for every candidate, as generation would).")
    head = "| concept | method | " + " | ".join(label for _, label in ATTACK_COLUMNS) + \
           " | gate: prompts to base | best word prompt | UNet evals | seconds |"
    lines = [head, "|" + "---|" * (len(ATTACK_COLUMNS) + 6)]
    grids = {}
    for concept, methods in report["results"].items():
        for method, r in methods.items():
            cells = _attack_cells(r)
            gate = "–" if r["gate_passed"] is None else f"{r['gate_passed']} of {r['budget']['prompts_scored']}"
            lines.append(f"| {concept} | {method} | " + " | ".join(cells[k] for k, _ in ATTACK_COLUMNS) +
                         f" | {gate} | {r['word_search']['best_prompt']} | {r['budget']['unet_evals']} | "
                         f"{r['budget']['seconds']:.0f} |")
        grids[concept] = _attack_grid(out, concept, methods)
    table = "\n".join(lines)
    md = ["# unguide attack", "", intro, "", table, ""]
    md += [f"### {c}\n\n![{c}]({g.relative_to(out)})\n" for c, g in grids.items()]
    md_path = out / "report.md"
    write_text(md_path, "\n".join(md) + "\n")
    rows = "".join("<tr>" + "".join(f"<td>{html.escape(c.strip())}</td>" for c in line.strip("|").split(" | ")) + "</tr>"
                   for line in lines[2:])
    heads = "".join(f"<th>{html.escape(c.strip())}</th>" for c in lines[0].strip("|").split(" | "))
    page = (f"<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>unguide attack</title><style>"
            "body{font-family:system-ui,sans-serif;margin:2em;max-width:1300px}table{border-collapse:collapse;font-size:14px}"
            "th,td{border:1px solid #ccc;padding:4px 8px}th{background:#f3f3f3}img{image-rendering:pixelated;max-width:100%}"
            f"</style></head><body><h1>unguide attack</h1><p>{html.escape(intro)}</p><table><tr>{heads}</tr>{rows}</table>"
            + "".join(f"<h3>{html.escape(c)}</h3><img src=\"{g.relative_to(out)}\" alt=\"{html.escape(c)}\">"
                      for c, g in grids.items()) + "</body></html>\n")
    html_path = out / "report.html"
    write_text(html_path, page)
    return md_path, html_path
