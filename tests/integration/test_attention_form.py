"""``--kv-write attention`` (issue 28): one opset-24 ONNX ``Attention`` node per layer over caches of a
length fixed at export, written by ``TensorScatter`` in place.

- The graphs hold what the form says: per segment one Attention and two TensorScatter nodes per layer,
  no Softmax, no repeat_kv (Expand) of the cache; the cache axis is static.
- ONNX Runtime = the PyTorch reference token for token (padded batch of 3 and batch 1, grouped-query
  heads), HiMAP's kept indices included; slots joining and leaving = solo runs.
- The write is in place: ONNX Runtime's TensorScatter warns when it copies the cache, and does not
  when the ``present`` output is bound to the ``past`` buffer (the pipeline's binding).

CI time: one validated export per family (LLaVA tiny-gqa HiMAP, shared by every LLaVA test here and by
test_triton.py; Qwen2.5-VL; Qwen3-VL). FastV and VisiPruner have no case of their own: the form changes
only the segment graphs, and a scoring graph reads the same segment outputs whatever its criterion
(``query.{K-1}`` and ``present.{K-1}.key``, sliced to the prompt by the pipeline), which the HiMAP case's
kept indices check. The TensorRT-RTX builds compose only the segment graphs (the export's composer).
"""

import onnx
import pytest
import torch

from conftest import exported, tiny
from himap_trt.graphs.spec import past_names, present_names
from himap_trt.runtime import GenerationConfig, reference_pipeline
from himap_trt.runtime.loader import open_pipeline
from test_slots import _Request, _solo, _step

#: Small static caches keep the exports and the decode steps cheap (tiny's prompts are ~170 tokens).
MAX_SEQ_LEN = 320
NEW_TOKENS = 12
CASES = [
    pytest.param("tiny-gqa", "himap", dict(k1=2, r1=0.5, k2=8, r2=0.75), id="tiny-gqa-himap"),
]


def _export(tmp_path_factory, name, method, kw):
    return exported(tmp_path_factory, name, method, kv_write="attention", max_seq_len=MAX_SEQ_LEN, **kw)


def test_segment_graphs_hold_attention_nodes_over_static_caches(tmp_path_factory):
    out, manifest, _ = _export(tmp_path_factory, *CASES[0].values)
    assert manifest.kv_write == "attention"
    segments = [spec for spec in manifest.graphs if spec.kind == "segment"]
    dropped = [0, 72, 126]     # image tokens dropped before each segment under this plan
    for spec, drop in zip(segments, dropped):
        model = onnx.load(str(out / spec.file), load_external_data=False)
        ops = [node.op_type for node in model.graph.node]
        layers = spec.layers[1] - spec.layers[0]
        assert ops.count("Attention") == layers and ops.count("TensorScatter") == 2 * layers, spec.name
        per_layer = [node.op_type for node in model.graph.node if node.name.startswith("layers.")]
        assert "Softmax" not in ops and "ScatterND" not in ops and "Expand" not in per_layer, spec.name
        assert max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) == 24
        attention = next(node for node in model.graph.node if node.op_type == "Attention")
        heads = {a.name: a.i for a in attention.attribute if a.name.endswith("num_heads")}
        assert heads == {"q_num_heads": manifest.dims.num_heads, "kv_num_heads": manifest.dims.num_kv_heads}
        assert attention.input[6], "nonpad_kv_seqlen must be fed"
        cache = {v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim] for v in model.graph.input}
        assert cache[past_names(spec.layers[0])[0]][2] == MAX_SEQ_LEN - drop, spec.name


@pytest.mark.parametrize("name,method,kw", CASES)
def test_attention_form_equals_reference(tmp_path_factory, name, method, kw, requests_3):
    out, manifest, checks = _export(tmp_path_factory, name, method, kw)
    assert checks and all(c.ok for c in checks), [c for c in checks if not c.ok]
    assert {(c.graph, c.phase) for c in checks} >= {(s.name, p) for s in manifest.graphs if s.kind == "segment"
                                                    for p in ("prefill", "decode")}
    images, questions = requests_3
    pipe = open_pipeline(export_dir=out, backend="onnxruntime").pipeline
    ref = reference_pipeline(tiny(name), manifest.plan)
    for size in (3, 1):
        batch = ref.prepare(images[:size], questions[:size])
        if size == 3:
            assert (batch.attention_mask == 0).any(), "the batch should be padded"
        ours = pipe.generate(batch, GenerationConfig(max_new_tokens=NEW_TOKENS))
        theirs = ref.generate(batch, GenerationConfig(max_new_tokens=NEW_TOKENS))
        assert torch.equal(ours.sequences, theirs.sequences)
        assert len(ours.stages) == len(manifest.plan.stages) > 0
        for mine, expected in zip(ours.stages, theirs.stages):
            assert torch.equal(mine.kept_indices, expected.kept_indices)
            assert mine.kept_image_positions == expected.kept_image_positions


def test_slots_joining_and_leaving_equal_solo_runs(tmp_path_factory, requests_3):
    """Requests prefilled at different times into the static slot caches, decoded together at different
    lengths, joining and leaving: the tokens of each run alone, and of the PyTorch reference."""
    out, manifest, _ = _export(tmp_path_factory, *CASES[0].values)
    pipe = open_pipeline(export_dir=out, backend="onnxruntime").pipeline
    images, questions = requests_3
    batches = [pipe.prepare([images[i]], [questions[i]]) for i in range(3)]
    steps = 6
    solo = [_solo(pipe, b, steps) for b in batches]
    cache = pipe.allocate(4)
    assert cache.max_lens == [MAX_SEQ_LEN, MAX_SEQ_LEN - 72, MAX_SEQ_LEN - 126]
    a = _Request(pipe, cache, batches[0], 2)
    for _ in range(2):
        _step(pipe, cache, [a])
    b = _Request(pipe, cache, batches[1], 0)
    for _ in range(steps - 3):
        _step(pipe, cache, [a, b])
    pipe.release(cache, [2])
    c = _Request(pipe, cache, batches[2], 3)          # slots 0 and 3 decode, 1 and 2 free between them
    while len(b.tokens) < steps:
        _step(pipe, cache, [c, b])
    while len(c.tokens) < steps:
        _step(pipe, cache, [c])
    for request, (tokens, logits) in zip((a, b, c), solo):
        assert request.tokens == tokens
        worst = max(float((x - y).abs().max()) for x, y in zip(request.logits, logits))
        assert worst < 1e-4, worst
    reference = reference_pipeline(tiny("tiny-gqa"), manifest.plan)
    assert [r.tokens for r in (a, b, c)] == [_solo(reference, batch, steps)[0] for batch in batches]


def test_cache_write_is_in_place(tmp_path_factory, monkeypatch, capfd):
    """Bound as the pipeline binds it (present = the past buffer), TensorScatter writes the new keys into
    the buffer and copies nothing: ONNX Runtime's copy warning is absent. Unbound, it copies and warns."""
    from himap_trt.export.onnx_export import example_inputs
    from himap_trt.runtime import onnxrt

    out, manifest, _ = _export(tmp_path_factory, *CASES[0].values)
    spec = manifest.graph("segment_0")
    monkeypatch.setattr(onnxrt, "LOG_SEVERITY", 1)
    backend = onnxrt.OnnxRuntimeBackend(spec, out / spec.file)
    cache = spec.input("attention_mask").shape[1]
    feeds = example_inputs(spec, {"batch": 2, "sequence": 1, "cache_sequence": cache}, manifest.dims.vocab_size)
    feeds["cache_position"] = torch.tensor([5, 9])
    feeds["attention_mask"] = (torch.arange(cache)[None] <= feeds["cache_position"][:, None]).long()
    before = {name: tensor.clone() for name, tensor in feeds.items()}
    layer = spec.layers[0]
    presents = {present: feeds[past] for layer in range(*spec.layers)
                for past, present in zip(past_names(layer), present_names(layer))}
    capfd.readouterr()
    got = backend.run(feeds, presents)
    warned = capfd.readouterr()
    assert "TensorScatter" not in warned.out + warned.err, warned.err[-500:]
    key = feeds[past_names(layer)[0]]
    assert got[present_names(layer)[0]].data_ptr() == key.data_ptr()
    changed = (key != before[past_names(layer)[0]]).any(dim=(1, 3))             # [B, M]: positions written
    assert changed.nonzero().tolist() == [[0, 5], [1, 9]]
    # the control: without the binding the kernel copies the cache, and says so
    fresh = {name: tensor.clone() for name, tensor in before.items()}
    backend.run(fresh)
    assert "in-place optimization not activated" in capfd.readouterr().err
    backend.close()


@pytest.mark.parametrize("name", ["tiny-qwen2.5-vl", "tiny-qwen3-vl"])
def test_qwen_families_equal_reference(tmp_path_factory, name, qwen_requests):
    """Qwen2.5-VL (M-RoPE position ids [3,B,S]) and Qwen3-VL (DeepStack inputs, q/k norms) in the attention
    form: every graph validated, a mixed batch of three image sizes (per-row image-token counts) and
    batch 1 give the reference's tokens and kept indices."""
    out, manifest, checks = exported(tmp_path_factory, name, "himap", kv_write="attention", max_seq_len=MAX_SEQ_LEN)
    assert checks and all(c.ok for c in checks), [c for c in checks if not c.ok]
    segments = [spec for spec in manifest.graphs if spec.kind == "segment"]
    assert [spec.input("attention_mask").shape[1] for spec in segments] == [MAX_SEQ_LEN] * len(segments)
    images, questions = qwen_requests
    pipe = open_pipeline(export_dir=out, backend="onnxruntime").pipeline
    ref = reference_pipeline(tiny(name), manifest.plan)
    for rows in ([0, 1, 2], [1]):
        batch = ref.prepare([images[r] for r in rows], [questions[r] for r in rows])
        with torch.inference_mode():
            ours = pipe.generate(batch, GenerationConfig(max_new_tokens=8))
            theirs = ref.generate(batch, GenerationConfig(max_new_tokens=8))
        assert torch.equal(ours.sequences, theirs.sequences)
        assert ours.image_tokens_per_row == theirs.image_tokens_per_row
        for mine, expected in zip(ours.stages, theirs.stages):
            assert torch.equal(mine.kept_indices, expected.kept_indices)


#: (model, dtype) of the TensorRT-RTX builds: each family, both dtypes TensorRT-RTX builds Attention in.
RTX_VARIANTS = [("tiny-gqa", "fp16"), ("tiny-qwen2.5-vl", "bf16"), ("tiny-qwen3-vl", "fp16")]


@pytest.mark.parametrize("name,dtype", RTX_VARIANTS, ids=[f"{n}-{d}" for n, d in RTX_VARIANTS])
def test_tensorrt_rtx_builds_attention_and_kv_cache_update_layers(tmp_path, name, dtype):
    """The real TensorRT-RTX parser makes one attention (ATTENTION_INPUT/OUTPUT) and two KV_CACHE_UPDATE
    layers per decoder layer of every segment and no SOFTMAX (no MatMul-Softmax-MatMul left); the
    builder builds each segment for SM86 with the export's profiles. The segment graphs are written by the
    export's own composer (``export_specs`` + ``SegmentComposer``, what ``export_model`` runs per segment)
    without the other graphs, which TensorRT builds the same in every form (CI time)."""
    pytest.importorskip("tensorrt_rtx", reason="needs TensorRT-RTX (`make install`; TRT_RTX=0 skips it)")
    from collections import Counter
    from types import SimpleNamespace

    from himap_trt.engines.build import BuildTarget, build_engine_bytes, check_buildable
    from himap_trt.engines.flavour import RTX, rtx_header_capabilities
    from himap_trt.engines.parser import parse_network
    from himap_trt.engines.profiles import graph_profiles
    from himap_trt.export import DEFAULT_OPSET, export_specs
    from himap_trt.export.compose import SegmentComposer
    from himap_trt.graphs.spec import DTYPE_NAMES
    from himap_trt.models import load_model
    from himap_trt.models.loading import DTYPES
    from himap_trt.plan import build_plan

    loaded = load_model(name, dtype=DTYPES[dtype])
    plan = build_plan("himap", num_layers=loaded.dims.num_layers, num_image_tokens=loaded.dims.num_image_tokens)
    segments = [spec for spec in export_specs(loaded.dims, plan, DTYPE_NAMES[dtype], "attention", MAX_SEQ_LEN)
                if spec.kind == "segment"]
    check_buildable(SimpleNamespace(kv_write="attention", dtype=DTYPE_NAMES[dtype], quantize="none"), tmp_path)
    composer = SegmentComposer(loaded.model, DTYPE_NAMES[dtype], DEFAULT_OPSET, "attention")
    trt = RTX.module()
    for spec in segments:
        path = composer.export(spec, tmp_path / f"{spec.name}.onnx")
        logger = trt.Logger(trt.Logger.ERROR)
        network, _parser = parse_network(trt, trt.Builder(logger), logger, path)
        types = Counter(network.get_layer(i).type.name for i in range(network.num_layers))
        layers = spec.layers[1] - spec.layers[0]
        assert (types["ATTENTION_INPUT"], types["ATTENTION_OUTPUT"], types["KV_CACHE_UPDATE"]) == \
            (layers, layers, 2 * layers), (spec.name, dict(types))
        assert types["SOFTMAX"] == 0, (spec.name, dict(types))
        profiles = graph_profiles(spec, plan, max_batch=2, max_seq_len=256)
        engine = build_engine_bytes(BuildTarget(RTX, ("8.6",)), path, profiles, optimization_level=0)
        assert rtx_header_capabilities(engine) == ("8.6",), spec.name


def test_build_refuses_what_it_cannot_build_or_would_run_badly(tmp_path_factory, tmp_path):
    """fp32 attention (no TensorRT-RTX kernel), a --max-seq-len beyond the static caches, and TensorRT proper,
    whose parser support table lacks the opset-24 Attention operator: one line each, nothing written."""
    from typer.testing import CliRunner

    from himap_trt.cli import app

    out, manifest, _ = _export(tmp_path_factory, *CASES[0].values)            # fp32, attention, 320 tokens
    for extra, messages in ((["--tensorrt", "rtx"], ["--dtype fp16"]),
                            (["--tensorrt", "rtx", "--max-seq-len", "400"], ["--max-seq-len 400"]),
                            (["--tensorrt", "tensorrt"], ["Attention (opset 24)", "export --kv-write scatternd"])):
        engines = tmp_path / "engines"
        result = CliRunner().invoke(app, ["build", "--export-dir", str(out), "--engines", str(engines),
                                          "--compute-capability", "8.6", *extra])
        assert result.exit_code != 0 and all(m in result.stderr for m in messages), result.stderr
        assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr
        assert not engines.exists()


def test_flavour_check_follows_the_support_table():
    """The TensorRT-proper refusal is the table's verdict, not a constant: a table whose ``since`` lists
    Attention at opset 24 passes the export, one without TensorScatter names only that, an opset-23 entry is
    not enough; TensorRT-RTX (whose parser builds the form in CI) is never refused by it."""
    import copy
    from types import SimpleNamespace

    from himap_trt.engines.build import check_flavour_parses
    from himap_trt.engines.compat import missing_operators, support_table
    from himap_trt.errors import HimapError

    form = SimpleNamespace(kv_write="attention")
    assert missing_operators({"Attention": 24, "TensorScatter": 24}) == ["Attention (opset 24)"]
    assert missing_operators({"MatMul": 18, "Softmax": 20}) == []          # the 10.1 matrix, within 9..20
    assert missing_operators({"MatMul": 21}) == ["MatMul (opset 21)"]
    taking = copy.deepcopy(support_table())
    taking["since"]["ops"]["Attention"] = dict(taking["since"]["ops"]["TensorScatter"], opset=24)
    check_flavour_parses(form, "tensorrt", taking)
    check_flavour_parses(form, "rtx")
    check_flavour_parses(SimpleNamespace(kv_write="scatternd"), "tensorrt")
    lacking = copy.deepcopy(taking)
    del lacking["since"]["ops"]["TensorScatter"]
    with pytest.raises(HimapError, match=r"use TensorScatter \(opset 24\), which"):
        check_flavour_parses(form, "tensorrt", lacking)
    old = copy.deepcopy(taking)
    old["since"]["ops"]["Attention"]["opset"] = 23
    with pytest.raises(HimapError, match=r"use Attention \(opset 24\), which"):
        check_flavour_parses(form, "tensorrt", old)


def test_target_picks_the_form_and_bad_inputs_are_one_line(tmp_path):
    """--target: onnxruntime gets the default form, tensorrt the attention form in fp16/bf16 and the explicit
    form in fp32 (no TensorRT-RTX kernel); build notes an fp16 scatternd export; bad values: one line, nothing
    written."""
    from types import SimpleNamespace

    from typer.testing import CliRunner

    from himap_trt.cli import app
    from himap_trt.engines.build import attention_note
    from himap_trt.errors import HimapError
    from himap_trt.export import DEFAULT_OPSET, ExportOptions
    from himap_trt.manifest import DEFAULT_KV_WRITE

    assert ExportOptions(out=tmp_path / "a").kv_write == DEFAULT_KV_WRITE
    assert ExportOptions(out=tmp_path / "a", target="tensorrt", dtype="fp16").kv_write == "attention"
    assert ExportOptions(out=tmp_path / "a", target="tensorrt", dtype="bf16").kv_write == "attention"
    assert ExportOptions(out=tmp_path / "a", target="tensorrt", dtype="fp32").kv_write == "scatternd"
    assert ExportOptions(out=tmp_path / "a", target="tensorrt", kv_write="gqa").kv_write == "gqa"   # explicit wins
    # --opset: by default 18 (the segment graphs of the opset-24 forms at 24); explicit values hold for the others
    assert ExportOptions(out=tmp_path / "a", kv_write="attention").opset == DEFAULT_OPSET == 18
    assert ExportOptions(out=tmp_path / "a", kv_write="scatternd", opset=20).opset == 20
    with pytest.raises(HimapError, match="--target must be one of"):
        ExportOptions(out=tmp_path / "a", target="tpu")
    assert "--target tensorrt" in attention_note(SimpleNamespace(kv_write="scatternd", dtype="float16"))
    assert attention_note(SimpleNamespace(kv_write="scatternd", dtype="float32")) is None
    assert attention_note(SimpleNamespace(kv_write="attention", dtype="float16")) is None
    for args, message in ((["--target", "tpu"], "--target must be one of"),
                          (["--kv-write", "attention", "--max-seq-len", "100"], "--max-seq-len must be in"),
                          (["--kv-write", "attention", "--opset", "18"], "--kv-write attention needs ONNX opset 24"),
                          (["--kv-write", "tensorscatter", "--opset", "20"], "tensorscatter needs ONNX opset 24"),
                          (["--target", "tensorrt", "--dtype", "fp16", "--opset", "19"],
                           "--target tensorrt's --kv-write attention needs ONNX opset 24")):
        out = tmp_path / "export"
        result = CliRunner().invoke(app, ["export", "--model", "tiny", "--out", str(out), *args])
        assert result.exit_code != 0 and message in result.stderr, result.stderr
        assert len(result.stderr.strip().splitlines()) == 1 and not out.exists()


def test_serving_engine_runs_the_attention_form_like_run(tmp_path_factory, requests_3):
    """The continuous-batching engine (what `serve` and the Triton model run) on an attention export: its
    static slot caches written in place, three requests at once answer like `run`'s generate, one by one."""
    from himap_trt.runtime.engine import Engine, SamplingParams

    out, _, _ = _export(tmp_path_factory, *CASES[0].values)
    pipe = open_pipeline(export_dir=out, backend="onnxruntime").pipeline
    images, questions = requests_3
    solo = [list(pipe.generate(pipe.prepare([image], [question]), GenerationConfig(max_new_tokens=5)).tokens[0])
            for image, question in zip(images, questions)]
    engine = Engine(pipe, max_batch=3).start()
    try:
        assert engine.cache.max_lens == [MAX_SEQ_LEN, MAX_SEQ_LEN - 72, MAX_SEQ_LEN - 126]
        handles = [engine.submit(engine.prepare(image, question), SamplingParams(max_tokens=5, temperature=0))
                   for image, question in zip(images, questions)]
        done = [list(h.result(timeout=300).token_ids) for h in handles]
    finally:
        engine.stop(timeout=10)
    assert done == solo


def test_bench_table_is_legible_when_piped(tmp_path_factory):
    """`bench`'s table printed to a pipe (not a terminal: rich would cut it to 80 columns) is at its natural
    width: every header and figure whole, the load average in its title, and each row's TTFT ratio the row's
    TTFT over the base's (the first contender here)."""
    import re

    from typer.testing import CliRunner

    from himap_trt.cli import app

    out, _, _ = _export(tmp_path_factory, *CASES[0].values)
    result = CliRunner().invoke(app, ["bench", "--export-dir", str(out), "--export-dir", str(out), "--max-new-tokens",
                                      "2", "--repeats", "1", "--full-cache"], env={"COLUMNS": "80"})
    assert result.exit_code == 0, result.output
    assert "…" not in result.stdout and "load_average(1/5/15 min)=" in result.stdout
    header = next(line for line in result.stdout.splitlines() if "TTFT ms" in line)
    assert "TTFT/base" in header and "peak RSS +MiB" in header and len(header) > 80
    rows = [[cell.strip() for cell in line.split("│")[1:-1]] for line in result.stdout.splitlines()
            if line.startswith("│") and "himap (attention)" in line]
    assert len(rows) == 2 and rows[1][0] == f"himap (attention) ({out})"
    columns = [cell.strip() for cell in header.split("┃")[1:-1]]
    ttft, ratio = columns.index("TTFT ms"), columns.index("TTFT/base")
    assert rows[0][ratio] == "1.00x"
    assert float(rows[1][ratio].rstrip("x")) == pytest.approx(float(rows[1][ttft]) / float(rows[0][ttft]), rel=0.01, abs=0.01)
    assert re.search(r"prefill per graph, himap \(attention\) \(batch 1, 2 new\): .*segment_0 [\d.]+ ms", result.stdout)
