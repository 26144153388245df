"""``unguide serve``: the page (a Gradio app) to erase a concept, type prompts and see what the gate decided."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

from .common import add_model
from ..errors import UnguideError

LOOPBACK = ("127.0.0.1", "localhost", "::1")
INSTALL_HINT = "unguide serve needs Gradio: pip install 'unguide[serve]' (make test and make demo install it)"


def _cmd_serve(args) -> int:
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no calls home: the page works offline
    try:
        import gradio  # noqa: F401  (an optional extra: say how to get it before loading any model)
    except ImportError:
        raise UnguideError(INSTALL_HINT) from None
    from ..generation.pipeline import UnGuidePipeline
    from ..serve.catalog import RunCatalog
    from ..serve.page import CSS, build_page, theme
    from ..serve.studio import ServeLimits, Studio

    if args.port > 65535:  # int flags are checked >= 1 as they are parsed (cli.common.check_numbers)
        raise UnguideError(f"`port` must be 1 to 65535, not {args.port}")
    runs = RunCatalog(args.runs)
    out = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="unguide-serve-"))
    limits = ServeLimits(max_images=args.max_images, max_images_per_prompt=args.max_images_per_prompt,
                         queue_size=args.queue_size)
    pipe = UnGuidePipeline.from_pretrained(args.model, torch_dtype=args.dtype, device=args.device)
    pipe.set_progress_bar_config(disable=True)
    studio = Studio(pipe, runs, out, limits, model_name=args.model)
    page = build_page(studio)
    if args.host not in LOOPBACK:
        print(f"unguide: serving on {args.host}: anyone who can reach this machine on port {args.port} can use the "
              "model (the default, 127.0.0.1, serves this machine only)", flush=True)
    print(f"unguide serve: runs from {runs.root} ({len(runs.names())} found), requests kept in {out}; "
          f"open http://{'127.0.0.1' if args.host in LOOPBACK else args.host}:{args.port}/ (Ctrl+C stops)", flush=True)
    # run_history off: results hold inline images, too big for the browser's storage, and its page offers a hub upload
    page.launch(server_name=args.host, server_port=args.port, theme=theme(), css=CSS, ssr_mode=False,
                allowed_paths=[str(out / "requests")], show_error=False, quiet=True, mcp_server=False,
                inbrowser=False, share=False, run_history=False, footer_links=["api", "settings"])
    return 0


def add_parser(sub) -> None:
    s = sub.add_parser("serve", help="a page to erase a concept, prompt, and see base / adapter / UnGuidance side by "
                       "side (needs unguide[serve])")
    add_model(s)
    s.add_argument("--runs", default=os.path.join("demo_out", "runs"),
                   help="folder of erasure runs the page offers, by name (default demo_out/runs, what make demo writes); "
                   "runs erased on the page are written here")
    s.add_argument("--port", type=int, default=7860, help="default 7860")
    s.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default 127.0.0.1: this machine only; 0.0.0.0 serves the network)")
    s.add_argument("--out", default=None, help="folder for the requests' images and zips (default: a new temp folder)")
    s.add_argument("--max-images", type=int, default=16, help="images per view per request (prompts x images; default 16)")
    s.add_argument("--max-images-per-prompt", type=int, default=4, help="default 4")
    s.add_argument("--queue-size", type=int, default=64, help="requests that may wait; more are turned away (default 64)")
    s.set_defaults(func=_cmd_serve)
