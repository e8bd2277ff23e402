"""The ``random`` plan: HiMAP's layers and keep counts, a seeded random subset of image tokens,
the same in PyTorch and ONNX Runtime."""

import numpy as np
import pytest
import torch

from conftest import exported, tiny
from himap_trt.errors import HimapError
from himap_trt.graphs.modules import StageScorer
from himap_trt.plan import PruningPlan, build_plan
from himap_trt.prompt import TOKEN_IMAGE, TOKEN_INSTRUCTION, TOKEN_PAD, TOKEN_SYSTEM
from himap_trt.runtime import GenerationConfig, reference_pipeline
from himap_trt.runtime.loader import open_pipeline


def test_random_plan_has_himaps_layers_and_counts():
    himap = build_plan("himap", num_layers=12, num_image_tokens=144, k1=3, r1=0.6, k2=7, r2=0.5)
    rand = build_plan("random", num_layers=12, num_image_tokens=144, k1=3, r1=0.6, k2=7, r2=0.5, seed=5)
    assert [(s.layer, s.keep) for s in rand.stages] == [(s.layer, s.keep) for s in himap.stages] == [(3, 58), (7, 29)]
    assert {s.criterion for s in rand.stages} == {"random"} and {s.seed for s in rand.stages} == {5}
    assert PruningPlan.from_dict(rand.to_dict()) == rand
    assert "seed" not in himap.to_dict()["stages"][0]  # existing manifests are unchanged
    assert "seed 5" in rand.describe()
    bad = rand.to_dict()
    del bad["stages"][0]["seed"]
    with pytest.raises(HimapError, match="seed"):
        PruningPlan.from_dict(bad)


def _expected_ordinals(seed: int, stage: int, entering: int, keep: int) -> list[int]:
    """The ordinals a random stage keeps, from the definition: the `keep` largest of a seeded
    permutation (numpy's default_rng([seed, stage])), in ascending order."""
    order = np.random.default_rng([seed, stage]).permutation(entering)
    return sorted(int(t) for t in np.argsort(-order, kind="stable")[:keep])


def test_random_scorer_keeps_the_seeded_ordinals_whatever_the_padding():
    entering, keep = 12, 5
    rows = [[TOKEN_PAD] * pad + [TOKEN_SYSTEM] * 2 + [TOKEN_IMAGE] * entering + [TOKEN_INSTRUCTION] * (4 - pad)
            for pad in (0, 1, 3)]
    types = torch.tensor(rows)
    mask = (types != TOKEN_PAD).long()
    B, S = types.shape
    hidden = torch.randn(B, S, 8)
    positions = torch.arange(S).expand(B, S)
    query, key = torch.randn(B, 2, S, 4), torch.randn(B, 2, S, 4)
    for seed in (0, 1):
        scorer = StageScorer("random", keep, entering, 0.5, seed=seed, stage=1)
        index, gathered, _, _, kept_types = scorer(query, key, mask, types, hidden, positions)
        assert index.shape == (B, S - (entering - keep))
        for row, pad in enumerate((0, 1, 3)):
            first = pad + 2
            kept = [int(i) - first for i, t in zip(index[row], kept_types[row]) if t == TOKEN_IMAGE]
            assert kept == _expected_ordinals(seed, 1, entering, keep)
            assert torch.equal(gathered[row], hidden[row, index[row]])
    assert _expected_ordinals(0, 1, entering, keep) != _expected_ordinals(1, 1, entering, keep)


@pytest.mark.slow
def test_random_export_onnxruntime_equals_reference(tmp_path_factory, requests_3):
    out, manifest, checks = exported(tmp_path_factory, "tiny", "random", seed=3)
    assert checks and all(c.ok for c in checks)
    assert [s.attrs.get("seed") for s in manifest.graphs if s.kind == "scoring"] == [3, 3]
    from himap_trt.engines.compat import check_export

    assert not [o for r in check_export(out, manifest) for o in r.offenses]  # TensorRT's parser takes it
    images, questions = requests_3
    onnx_pipe = open_pipeline(export_dir=out, backend="onnxruntime").pipeline
    ref_pipe = reference_pipeline(tiny("tiny"), manifest.plan)
    batch = ref_pipe.prepare(images, questions)
    ours = onnx_pipe.generate(batch, GenerationConfig(max_new_tokens=4))
    ref = ref_pipe.generate(batch, GenerationConfig(max_new_tokens=4))
    assert torch.equal(ours.sequences, ref.sequences)
    n1, n2 = (s.keep for s in manifest.plan.stages)
    first = [int((batch.token_type_ids[row] == TOKEN_IMAGE).nonzero()[0]) for row in range(3)]
    stage1 = _expected_ordinals(3, 0, 144, n1)
    stage2 = [stage1[t] for t in _expected_ordinals(3, 1, n1, n2)]
    for row in range(3):
        assert ours.stages[0].kept_image_positions[row] == [first[row] + t for t in stage1]
        assert ours.stages[1].kept_image_positions[row] == [first[row] + t for t in stage2]
        assert ref.stages[1].kept_image_positions[row] == ours.stages[1].kept_image_positions[row]
