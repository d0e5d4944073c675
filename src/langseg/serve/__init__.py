"""Serving langseg: a web demo (Gradio, extra ``demo``) and a JSON HTTP API (FastAPI, extra ``serve``).

- :mod:`langseg.serve.service`: what both share (models loaded once, request limits, decoding uploads,
  a bounded inference queue, results as JSON); no web framework.
- :mod:`langseg.serve.api`: ``create_app()``, the FastAPI application behind ``langseg serve``.
- :mod:`langseg.serve.demo`: ``build_demo()``, the Gradio application behind ``langseg demo``.

Nothing is imported here, so that ``import langseg.serve`` needs neither extra.
"""
