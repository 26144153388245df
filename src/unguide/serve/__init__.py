"""``unguide serve``: a page over the library (run catalog, the studio that draws, the Gradio page)."""
