"""Serving himap-trt on NVIDIA Triton Inference Server.

- :mod:`~himap_trt.triton.repository`: ``himap-trt triton repo`` writes a model repository (the
  ``himap`` Python-backend model, streaming, and ``himap_unary`` for one-response clients).
- :mod:`~himap_trt.triton.model`: the ``TritonPythonModel`` that runs inside each instance's stub.
- :mod:`~himap_trt.triton.environment` / :mod:`~himap_trt.triton.server`: ``himap-trt triton serve``
  starts the ``tritonserver`` bundled in the ``nvidia-pytriton`` wheel, with its Python backend set up
  for this interpreter.
- :mod:`~himap_trt.triton.protocol`: the model's inputs and outputs, request validation, and the
  ``tritonclient`` helpers (``make_inputs``, ``Answer``) for HTTP and gRPC clients.
"""
