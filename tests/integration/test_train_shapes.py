"""scripts/train_shapes.py: training batches match the inference prompt, and a few steps run and
write weights the shapes loader accepts (the full training is not run in CI)."""

import importlib.util
from pathlib import Path

import pytest
import torch

from himap_trt.data.shapes import generate
from himap_trt.models.shapes import SHAPES_SPEC, new_shapes_model, shapes_processor
from himap_trt.models.tiny import EOS_ID
from himap_trt.prompt import prepare_batch

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "train_shapes.py"


def _script():
    spec = importlib.util.spec_from_file_location("train_shapes", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_training_batch_is_the_inference_prompt_then_the_answer():
    train = _script()
    items = generate(3, seed=5, split="train")
    processor = shapes_processor()
    batch = train.make_batch(items, processor)
    n_image = (SHAPES_SPEC.image_size // SHAPES_SPEC.patch_size) ** 2
    inference = prepare_batch(processor, [i.image for i in items], [i.question for i in items],
                              processor.tokenizer.convert_tokens_to_ids("<image>"), n_image)
    assert torch.equal(batch["pixel_values"], inference.pixel_values)
    for row, item in enumerate(items):
        prompt = inference.input_ids[row][inference.attention_mask[row].bool()].tolist()
        answer = processor.tokenizer(item.answer, add_special_tokens=False)["input_ids"]
        assert processor.tokenizer.decode(answer) == item.answer
        length = int(batch["attention_mask"][row].sum())
        assert batch["input_ids"][row, :len(prompt)].tolist() == prompt
        assert batch["input_ids"][row, len(prompt):length].tolist() == answer    # EOS is a target, not an input
        # position t is trained to predict token t+1; the last prompt position predicts the answer's first token
        targets = batch["labels"][row]
        assert targets[len(prompt) - 1:length].tolist() == answer + [EOS_ID]
        assert (targets[:len(prompt) - 1] == train.IGNORE).all() and (targets[length:] == train.IGNORE).all()
        shapes_here = batch["patch_labels"][row]
        assert int(shapes_here[:, 2].sum()) <= len(item.scene.shapes)
        colour, kind, centre = train.patch_coverage(item.scene, SHAPES_SPEC).split(train.AUX_CLASSES, dim=-1)
        assert torch.allclose(colour.sum(-1), torch.ones(n_image)) and torch.allclose(kind.sum(-1), torch.ones(n_image))
        assert int(centre[:, 1].sum()) == len(item.scene.shapes)   # boxes 2 px apart: never two centres in a patch


def test_the_coverage_targets_train_the_probe():
    train = _script()
    items = generate(2, seed=6, split="train")
    batch = train.make_batch(items, shapes_processor(), aux_targets="coverage")
    assert batch["patch_labels"].dtype == torch.float32
    model = new_shapes_model(seed=0)
    probe = torch.nn.Linear(SHAPES_SPEC.hidden_size, sum(train.AUX_CLASSES))
    with_aux, _ = train.forward_loss(model, batch, probe)
    answer_only, _ = train.forward_loss(model, batch)
    assert torch.isfinite(with_aux) and with_aux > answer_only   # soft cross-entropy is positive
    with_aux.backward()
    assert probe.weight.grad is not None and probe.weight.grad.abs().sum() > 0


def test_patch_targets_are_the_covered_fraction_of_each_patch():
    from himap_trt.data.shapes import COLORS, SHAPES, Scene, Shape

    train = _script()
    # a red square over x 10..33, y 20..39 and a blue circle with its box centre in patch (row 6, col 6)
    scene = Scene((240, 240, 240), (Shape("square", "red", 10, 20, 24), Shape("circle", "blue", 70, 70, 20)))
    labels = train.patch_coverage(scene, SHAPES_SPEC)
    colour, kind, centre = labels.split(train.AUX_CLASSES, dim=-1)
    p, grid = SHAPES_SPEC.patch_size, SHAPES_SPEC.image_size // SHAPES_SPEC.patch_size
    red, square = list(COLORS).index("red"), SHAPES.index("square")
    for r in range(grid):
        for c in range(grid):
            # overlap of the square's box with the patch, by hand
            w = max(0, min(34, (c + 1) * p) - max(10, c * p))
            h = max(0, min(44, (r + 1) * p) - max(20, r * p))
            assert colour[r * grid + c, red].item() == pytest.approx(w * h / p**2)
            assert kind[r * grid + c, square].item() == pytest.approx(w * h / p**2)
    assert colour[6 * grid + 6, list(COLORS).index("blue")] > 0.5 and kind[6 * grid + 6, SHAPES.index("circle")] > 0.5
    assert colour[0, len(COLORS)] == 1 and kind[0, len(SHAPES)] == 1          # background only
    assert set(torch.nonzero(centre[:, 1]).flatten().tolist()) == {(32 // p) * grid + 22 // p, 6 * grid + 6}


def test_a_few_training_steps_change_the_weights_and_save_loadable_safetensors(tmp_path):
    from safetensors.torch import load_file

    train = _script()
    before = new_shapes_model(seed=0).state_dict()
    lines = []
    model, acc = train.train(steps=3, batch_size=4, warmup=1, dev_items=4, eval_every=3, log=lines.append)
    assert any(line.startswith("step 3/3 loss") for line in lines) and 0.0 <= acc["all"] <= 1.0
    after = model.state_dict()
    assert not torch.equal(before["model.language_model.layers.0.mlp.up_proj.weight"],
                           after["model.language_model.layers.0.mlp.up_proj.weight"])
    assert not torch.equal(before["model.vision_tower.embeddings.patch_embedding.weight"],
                           after["model.vision_tower.embeddings.patch_embedding.weight"])
    path = tmp_path / "w.safetensors"
    assert train.save_weights(model, path) > 0
    fresh = new_shapes_model(seed=1)
    missing, unexpected = fresh.load_state_dict(load_file(path), strict=False)
    assert not unexpected and all(k == "lm_head.weight" for k in missing)
    assert torch.equal(fresh.state_dict()["model.language_model.norm.weight"], after["model.language_model.norm.weight"])


def test_image_features_are_the_image_tokens_llava_inserts():
    train = _script()
    model = new_shapes_model(seed=0).eval()
    items = generate(2, seed=7, split="train")
    batch = train.make_batch(items, shapes_processor())
    with torch.no_grad():
        ours = train.image_features(model, batch["pixel_values"])
        theirs = model.model.get_image_features(
            pixel_values=batch["pixel_values"], vision_feature_layer=model.config.vision_feature_layer,
            vision_feature_select_strategy=model.config.vision_feature_select_strategy).pooler_output
    assert ours.shape == (2, (SHAPES_SPEC.image_size // SHAPES_SPEC.patch_size) ** 2, SHAPES_SPEC.hidden_size)
    assert torch.equal(ours, torch.stack(list(theirs)))


def test_vision_pretraining_moves_only_the_vision_tower_and_projector():
    import numpy as np

    train = _script()
    model = new_shapes_model(seed=0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    probe = torch.nn.Linear(SHAPES_SPEC.hidden_size, sum(train.AUX_CLASSES))
    lines = []
    train.pretrain_vision(model, probe, shapes_processor(), steps=2, batch_size=3, lr=1e-3,
                          rng=np.random.default_rng(0), log=lines.append)
    assert lines and lines[-1].startswith("vision step 2/2 aux-loss")
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    assert any(k.startswith("model.vision_tower.") for k in changed)
    assert any(k.startswith("model.multi_modal_projector.") for k in changed)
    assert all(k.startswith(("model.vision_tower.", "model.multi_modal_projector.")) for k in changed)


@pytest.mark.parametrize("args,flag", [(["--vision-steps", "-1"], "--vision-steps"), (["--vision-lr", "0"], "--vision-lr"),
                                       (["--no-aux"], "--no-aux")])
def test_bad_vision_stage_options_are_one_clear_error(args, flag):
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, str(SCRIPT), "--steps", "1", *args], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    error = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert len(error) == 1 and flag in error[0]
    assert not proc.stdout    # refused before any training or writing
