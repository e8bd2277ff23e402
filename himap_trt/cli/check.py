"""``himap-trt check``: backends compared graph by graph and end to end, or the static TensorRT parser check (:mod:`himap_trt.analysis.check`, :mod:`himap_trt.engines.compat`)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from himap_trt.cli.app import app, err, plain, user_errors
from himap_trt.cli.options import EnginesOpt, ExportDirOpt, JsonOpt
from himap_trt.errors import HimapError
from himap_trt.engines.compat import check_export, parser_check, reconcile, support_table
from himap_trt.engines.flavour import installed_flavour
from himap_trt.cli.lazy import lazy_import

# Library modules, imported when a command first uses them (himap_trt/cli/lazy.py: --help stays fast).
check_lib = lazy_import("himap_trt.analysis.check")
arch = lazy_import("himap_trt.arch")
export_manifest = lazy_import("himap_trt.manifest")
validate = lazy_import("himap_trt.export.validate")


@app.command()
@user_errors
def check(
    export_dir: ExportDirOpt = Path("export"),
    engines_dir: EnginesOpt = None,
    tensorrt_compat: Annotated[bool, typer.Option(
        "--tensorrt-compat", help="Only the TensorRT checks: every node's operator, input dtypes and constant "
                                  "inputs against TensorRT's ONNX parser support table (no TensorRT needed), then "
                                  "the real ONNX parser of TensorRT or TensorRT-RTX where one is installed.")] = False,
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", help="Tokens generated end to end.")] = 8,
    as_json: JsonOpt = False,
):
    """Compare backends graph by graph (ONNX Runtime vs PyTorch; TensorRT vs PyTorch where engines,
    TensorRT and a GPU are available) and end to end (kept indices and tokens), or with
    --tensorrt-compat statically check the graphs against TensorRT's ONNX parser."""
    import time

    started = time.perf_counter()
    if max_new_tokens < 1:
        raise HimapError(f"--max-new-tokens must be at least 1, got {max_new_tokens}")
    if tensorrt_compat:
        manifest = export_manifest.load_manifest(export_dir, families=arch.get_architecture)
        reports = check_export(export_dir, manifest)
        flavour = installed_flavour()     # the real parser, where TensorRT or TensorRT-RTX is installed
        parsed = parser_check(export_dir, manifest, flavour) if flavour else []
        rejected = [p for p in parsed if p.errors]
        # the opset range is waived on a graph the real parser parsed (engines/compat.py PARSER_OVERRIDES)
        offenses, waived = reconcile(reports, parsed)
        parser_json = ({"flavour": flavour.key, "version": flavour.version,
                        "graphs": [{"graph": p.graph, "errors": list(p.errors)} for p in parsed]}
                       if flavour else None)
        if as_json:
            print(json.dumps({"ok": not offenses and not rejected, "parser": parser_json,
                              "waived": [o.__dict__ for o in waived], "source": support_table()["source"],
                              "min_tensorrt": max((r.min_tensorrt for r in reports),
                                                  key=lambda v: tuple(map(int, v.split(".")))),
                              "graphs": [{"graph": r.graph, "nodes": r.nodes, "opset": r.opset,
                                          "min_tensorrt": r.min_tensorrt,
                                          "unchecked_types": r.unchecked_types,
                                          "offenses": [o.__dict__ for o in r.offenses]} for r in reports]}, indent=1))
        else:
            source = support_table()["source"]
            plain(f"[I] TensorRT ONNX parser support table: {source['repository']} {source['path']} @ {source['ref']}")
            for r in reports:
                status = "PASSED" if not any(o in offenses for o in r.offenses) else "FAILED"
                plain(f"[I]     {status} | {r.graph} | {r.nodes} nodes | opset {r.opset} | "
                       f"TensorRT >= {r.min_tensorrt}")
                for o in r.offenses:
                    if o in waived:
                        plain(f"[W]         {o.reason}: waived, the {flavour.display} {flavour.version} parser "
                              "parses this graph (TensorRT parsers older than it may not)")
                    else:
                        plain(f"[E]         {o.node} ({o.op_type}): {o.reason}")
            if flavour:
                plain(f"[I] {flavour.display} {flavour.version} ONNX parser (module {flavour.module_name})")
                for p in parsed:
                    plain(f"[I]     {'FAILED' if p.errors else 'PASSED'} | {p.graph} | parsed by {flavour.module_name}")
                    for error in p.errors:
                        plain(f"[E]         {error}")
            else:
                plain("[W] real ONNX parser not run: neither tensorrt nor tensorrt_rtx is installed "
                      "(`make install` installs TensorRT-RTX)")
            plain(f"[I] {'PASSED' if not offenses and not rejected else 'FAILED'} | {len(reports)} graphs, "
                      f"{sum(r.nodes for r in reports)} nodes, {len(offenses)} offending"
                      + (f", {len(waived)} waived" if waived else "")
                      + (f", {len(rejected)} rejected by the {flavour.display} parser" if flavour else "")
                      + f" | Runtime: {time.perf_counter() - started:.3f}s")
        if offenses:
            raise HimapError(f"{len(offenses)} node(s) in {export_dir} would be rejected by TensorRT's ONNX parser")
        if rejected:
            raise HimapError(f"the {flavour.display} {flavour.version} ONNX parser rejects {len(rejected)} graph(s) of "
                             f"{export_dir}: {', '.join(p.graph for p in rejected)}")
        return

    report = check_lib.run_check(export_dir, engines_dir=engines_dir, max_new_tokens=max_new_tokens,
                       on_step=lambda text: err.print(f"[dim]{text}[/]"))
    if as_json:
        print(json.dumps({"ok": report.ok, "dtype": report.dtype, "skipped": report.skipped,
                          "graphs": {b: [c.__dict__ for c in checks] for b, checks in report.graph_checks.items()},
                          "end_to_end": [e.__dict__ | {"ok": e.ok} for e in report.end_to_end]}, indent=1))
    else:
        atol, rtol = validate.TOLERANCES[report.dtype]
        for checks in report.graph_checks.values():
            groups: dict[tuple[str, str], list] = {}
            for c in checks:
                groups.setdefault((c.graph, c.phase), []).append(c)
            for (graph, phase), items in groups.items():
                plain(f"[I] {graph} ({phase}) | {items[0].backend} vs torch")
                for c in items:
                    status = "PASSED" if c.ok else "FAILED"
                    if c.exact:
                        plain(f"[I]     {status} | Output: '{c.output}' | {int(c.max_abs_diff)} mismatching elements "
                               "(integer output: must be 0)")
                    else:
                        plain(f"[I]     {status} | Output: '{c.output}' | max abs diff {c.max_abs_diff:.2e} "
                               f"(<= {atol + rtol * c.max_abs_ref:.2e})")
        for e in report.end_to_end:
            plain(f"[I] end to end | {e.backend} vs torch")
            tag = "PASSED" if e.kept_indices_equal else ("FAILED" if e.kept_required else "WARNING")
            plain(f"[I]     {tag} | kept indices of {e.stages} stage(s) "
                   f"{'equal' if e.kept_indices_equal else 'differ'} (overlap {e.kept_overlap:.3f})"
                   + ("" if e.kept_required else f" (reported, not required, in {report.dtype})"))
            tag = "PASSED" if e.tokens_equal == e.tokens_total else ("FAILED" if e.tokens_required else "WARNING")
            plain(f"[I]     {tag} | tokens equal: {e.tokens_equal}/{e.tokens_total}"
                      + ("" if e.tokens_required else f" (reported, not required, in {report.dtype})"))
        for line in report.skipped:
            plain(f"[W] skipped {line}")
        total = sum(len(c) for c in report.graph_checks.values())
        plain(f"[I] {'PASSED' if report.ok else 'FAILED'} | {total} output comparisons, "
                  f"{len(report.end_to_end)} end-to-end | tolerance {report.dtype}: atol {atol:g} + rtol {rtol:g} x max|ref| "
                  f"| Runtime: {time.perf_counter() - started:.3f}s")
    if not report.ok:
        raise HimapError("backends disagree; see the FAILED lines above")
