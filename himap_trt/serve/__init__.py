"""``himap-trt serve``: the OpenAI-compatible HTTP server over the continuous-batching engine
(:mod:`himap_trt.runtime.engine`), and ``himap-trt bench-serve``, its load generator.

Modules: ``protocol`` (request/response shapes), ``images`` (``image_url`` handling), ``metrics``
(Prometheus), ``app`` (the FastAPI routes), ``server`` (uvicorn, graceful drain), ``bench`` (the load
generator), ``commands`` (the CLI commands).
"""
