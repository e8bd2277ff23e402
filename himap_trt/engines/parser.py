"""The real ONNX parser of TensorRT or TensorRT-RTX, on its own (no build): used by the build
(:mod:`himap_trt.engines.build`) and by ``check --tensorrt-compat``
(:func:`himap_trt.engines.compat.parser_check`). Imports neither torch nor a TensorRT module at
import time: the TensorRT module comes from :meth:`himap_trt.engines.flavour.Flavour.module`, on use.
"""

from __future__ import annotations

from pathlib import Path

from himap_trt.engines.flavour import Flavour
from himap_trt.errors import HimapError


def parser_errors(parser) -> list[str]:
    """The ONNX parser's errors, one line each (node name, operator, description)."""
    lines = []
    for i in range(parser.num_errors):
        error = parser.get_error(i)

        def field(name):
            getter = getattr(error, name, None)
            return str(getter()) if callable(getter) and getter() not in (None, "") else ""

        node = " ".join(v for v in (field("node_name"), f"({field('node_operator')})" if field("node_operator") else "") if v)
        code = field("code").rsplit(".", 1)[-1]
        text = " ".join(field("desc").split())
        where = f" in {field('func')}" if field("func") else ""
        lines.append(f"{node + ': ' if node else ''}{code}{where}: {text}")
    return lines


def _parse(trt, builder, logger, path: Path, data: bytes | None = None):
    """Parse with a quiet logger of its own: the parser's errors are reported through
    :func:`parser_errors` (one line each), not TensorRT's multi-line log. With ``data``: parse
    those model bytes, resolving external data relative to ``path`` (a layer chunk of that graph)."""
    logger = trt.Logger(trt.Logger.INTERNAL_ERROR)
    flags = 0
    creation = trt.NetworkDefinitionCreationFlag
    if hasattr(creation, "STRONGLY_TYPED"):
        flags |= 1 << int(creation.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    ok = parser.parse_from_file(str(path)) if data is None else parser.parse(data, str(path))
    return network, parser, [] if ok else (parser_errors(parser) or ["parse failed (no error recorded)"])


def parse_network(trt, builder, logger, path: Path, data: bytes | None = None):
    """Parse one ONNX file into a strongly typed network (weights included: external data files are
    read from beside ``path``).

    Returns:
        ``(network, parser)`` (keep the parser alive as long as the network).

    Raises:
        HimapError: naming the file and the parser's first errors.
    """
    network, parser, errors = _parse(trt, builder, logger, path, data)
    if errors:
        more = f" (+{len(errors) - 2} more)" if len(errors) > 2 else ""
        raise HimapError(f"the {trt.__name__} ONNX parser rejects {Path(path).name}: {'; '.join(errors[:2])}{more}")
    return network, parser


def parse_file(flavour: Flavour, path: Path) -> list[str]:
    """Run the real ONNX parser of ``flavour`` on one file (no build).

    Returns:
        The parser's errors, one line each; empty if the graph parsed.
    """
    trt = flavour.module()
    logger = trt.Logger(trt.Logger.INTERNAL_ERROR)
    return _parse(trt, trt.Builder(logger), logger, Path(path))[2]
