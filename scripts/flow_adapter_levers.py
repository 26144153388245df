"""Where the selective adapter goes on an MMDiT and how hard it holds its anchors: the lever runs behind
docs/findings-toyworld.md ("Erasure on toyworld-flow: where the adapter goes ...").

Sets the ``object`` preset's layers on a transformer (``kv``: the context stream's key/value; ``embed``: the context
embedder, today's; ``embed+pooled``: that and the pooled-text embedder) and any EraseConfig field of the selective
recipe's runs (after the concept's own), then runs the toy benchmark on toyworld-flow into work/sel/VARIANT-SAMPLES...

    .venv/bin/python scripts/flow_adapter_levers.py embed 8 sun,star,boat base,selective anchor_weight=32.0
"""
import sys
import time

from unguide.erasure import adapters
from unguide.erasure.recipes import EraseConfig
from unguide.evaluation.benchmark import Benchmark, BenchmarkConfig
from unguide.evaluation.report import markdown_table
from unguide.generation.pipeline import UnGuidePipeline

LAYERS = {"kv": ("attn.add_k_proj", "attn.add_v_proj"), "embed": ("context_embedder",),
          "embed+pooled": ("context_embedder", "time_text_embed.text_embedder.linear_1")}


def main(variant: str, samples: str = "8", concepts: str = "sun,star,boat", methods: str = "base,selective",
         settings: str = "") -> None:
    adapters.TEXT_ENTRY["mmdit"] = LAYERS[variant]
    extra = {k: float(v) if "." in v else int(v) for k, v in (kv.split("=") for kv in settings.split(",") if kv)}
    for_concept = EraseConfig.for_concept.__func__

    def patched(cls, recipe, concept, *args, **kw):
        cfg = for_concept(cls, recipe, concept, *args, **kw)
        for k, v in (extra.items() if recipe == "selective" else ()):
            setattr(cfg, k, v)
        return cfg

    EraseConfig.for_concept = classmethod(patched)
    tag = "".join(f"-{k}{v}" for k, v in extra.items())
    cfg = BenchmarkConfig(suite="toy", concepts=concepts.split(","), methods=methods.split(","), samples=int(samples))
    t0 = time.time()
    report = Benchmark(UnGuidePipeline.from_pretrained("toyworld-flow"), cfg, f"work/sel/{variant}-{samples}{tag}").run()
    print(markdown_table(report))
    print(f"{time.time() - t0:.0f} s")


if __name__ == "__main__":
    main(*sys.argv[1:])
