"""scripts/train_motion.py: training batches are the inference prompt (Qwen3-VL's prepare_batch) then
the answer, the fast paths equal the slow ones, the batched vision attention equals transformers',
and a few steps run and write weights the motion loader accepts (the full training is not run in CI)."""

import importlib.util
from pathlib import Path

import torch

from himap_trt.arch.qwen3_vl import Qwen3_VL
from himap_trt.data import motion
from himap_trt.models.motion import MOTION_SPEC, motion_processor, new_motion_model
from himap_trt.models.tiny_qwen import IM_END_ID, IMAGE_PAD_ID
from himap_trt.video import frames_video

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "train_motion.py"


def _script():
    spec = importlib.util.spec_from_file_location("train_motion", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _items():
    items = motion.generate(7, seed=5, split="train")       # one per template: 5 clips, 2 still images
    return [items[0], items[5], items[4], items[6]]


def test_training_batch_is_the_inference_prompt_then_the_answer():
    train = _script()
    items, processor = _items(), motion_processor()
    batch = train.make_batch(items, processor)
    assert all(torch.equal(batch[k], v) for k, v in train.make_batch(items, processor, fast=False).items()
               if k != "pixel_values")
    visuals = [it.frames[0] if it.clip.still else frames_video(it.frames, fps=motion.FPS, max_frames=motion.FRAMES)
               for it in items]
    inference = Qwen3_VL().prepare_batch(processor, visuals, [it.question for it in items], IMAGE_PAD_ID, 64)
    assert torch.allclose(batch["pixel_values"], inference.pixel_values, atol=1e-6)   # numpy fast path
    assert torch.equal(batch["image_grid_thw"], inference.image_grid_thw)
    assert inference.image_grid_thw.tolist() == [[4, 6, 6], [1, 6, 6], [4, 6, 6], [1, 6, 6]]
    for row, item in enumerate(items):
        real = inference.attention_mask[row].bool()
        prompt = inference.input_ids[row][real].tolist()
        answer = processor.tokenizer(item.answer, add_special_tokens=False)["input_ids"]
        assert processor.tokenizer.decode(answer) == item.answer
        length = int(batch["attention_mask"][row].sum())
        assert batch["input_ids"][row, :len(prompt)].tolist() == prompt
        assert batch["input_ids"][row, len(prompt):length].tolist() == answer          # EOS: a target only
        targets = batch["labels"][row]
        assert targets[len(prompt) - 1:length].tolist() == answer + [IM_END_ID]
        assert (targets[:len(prompt) - 1] == train.IGNORE).all() and (targets[length:] == train.IGNORE).all()
        positions = batch["position_ids"][:, row]
        assert torch.equal(positions[:, :len(prompt)], inference.position_ids[:, row][:, real])
        last = int(inference.position_ids[:, row][:, real].max())
        assert positions[:, len(prompt):length].tolist() == [list(range(last + 1, last + 1 + len(answer)))] * 3
    assert len(batch["token_labels"]) == sum(int(g.prod()) // 4 for g in inference.image_grid_thw)


def test_token_labels_name_the_shape_covering_most_of_each_cell():
    train = _script()
    # a red square 20 px at (40, 10) moving right 5 px a frame, a blue circle shown from frame 4
    clip = motion.Clip((240, 240, 240), (motion.Mover("square", "red", 40, 10, 20, "right", 5, 0),
                                         motion.Mover("circle", "blue", 0, 64, 24, "still", 0, 4)))
    labels = train.token_labels(clip, (4, 3, 3), 32)
    background = [len(motion.COLORS), len(motion.SHAPES), len(motion.DIRECTIONS)]
    red = [list(motion.COLORS).index("red"), motion.SHAPES.index("square"), list(motion.DIRECTIONS).index("right")]
    blue = [list(motion.COLORS).index("blue"), motion.SHAPES.index("circle"), list(motion.DIRECTIONS).index("still")]
    for k in range(4):
        x = 40 + 5 * 2 * k                                   # the square at frame 2k: x .. x+19, y 10..29
        cells = {c for c in range(3) if min(x + 20, 32 * (c + 1)) > max(x, 32 * c)}
        for r in range(3):
            for c in range(3):
                want = red if r == 0 and c in cells else blue if k >= 2 and r == 2 and c == 0 else background
                assert labels[k * 9 + r * 3 + c].tolist() == want, (k, r, c)


def test_batched_vision_attention_equals_transformers():
    train = _script()
    model = new_motion_model(seed=1).eval()
    batch = train.make_batch(_items(), motion_processor())
    with torch.no_grad():
        expected = model.model.visual(batch["pixel_values"], grid_thw=batch["image_grid_thw"])
        train.use_batched_vision_attention(model)
        got = model.model.visual(batch["pixel_values"], grid_thw=batch["image_grid_thw"])
    assert torch.allclose(got.pooler_output, expected.pooler_output, atol=1e-5)
    for a, b in zip(got.deepstack_features, expected.deepstack_features):
        assert torch.allclose(a, b, atol=1e-5)


def test_a_few_training_steps_change_the_weights_and_save_loadable_safetensors(tmp_path):
    from safetensors.torch import load_file

    train = _script()
    before = new_motion_model(seed=0).state_dict()
    lines = []
    model, acc = train.train(steps=2, batch_size=3, warmup=1, dev_items=3, eval_every=2, vision_steps=1,
                             checkpoint=tmp_path / "c.safetensors", log=lines.append)
    assert lines[0].startswith("vision step 1/1 aux-loss") and any(line.startswith("step 2/2 loss") for line in lines)
    assert 0.0 <= acc["all"] <= 1.0 and (tmp_path / "c.safetensors").is_file()
    after = model.state_dict()
    for key in ("model.language_model.layers.0.mlp.up_proj.weight", "model.visual.patch_embed.proj.weight",
                "model.visual.deepstack_merger_list.0.linear_fc1.weight"):
        assert not torch.equal(before[key], after[key]), key
    path = tmp_path / "w.safetensors"
    assert train.save_weights(model, path) > 0
    fresh = new_motion_model(seed=1)
    fresh.load_state_dict(load_file(path), strict=True)
    assert torch.equal(fresh.state_dict()["model.language_model.norm.weight"], after["model.language_model.norm.weight"])
    assert sum(p.numel() for p in fresh.parameters()) < 2_000_000 and MOTION_SPEC.num_layers == 10


def test_token_flags_are_presence_and_contact_per_cell_computed_from_pixel_masks():
    """token_flags against box masks drawn pixel by pixel: a colour is present in a cell when its box
    covers a pixel of it in either frame of the temporal patch, in contact where two boxes share one."""
    import numpy as np

    train = _script()
    colors = list(motion.COLORS)
    items = [it for it in motion.generate(42, seed=2, split="train") if it.template in ("meet", "image_count")]
    assert any(it.answer == "yes" for it in items)
    touching = 0
    for item in items:
        clip, t = item.clip, (1 if item.clip.still else motion.FRAMES // 2)
        flags = train.token_flags(clip, (t, 3, 3), 32)
        want = np.zeros((t, 3, 3, 10))
        for k in range(t):
            for frame in ((0,) if clip.still else (2 * k, 2 * k + 1)):
                masks = []                                   # (colour, box mask) per shape shown
                for s in clip.shapes:
                    if s.appear <= frame:
                        mask = np.zeros((motion.FRAME_SIZE, motion.FRAME_SIZE), bool)
                        x, y = s.box(frame)
                        mask[y:y + s.size, x:x + s.size] = True
                        masks.append((s.color, mask))
                for i, (color, mask) in enumerate(masks):
                    both = np.zeros_like(mask)
                    for j, (_, mask2) in enumerate(masks):
                        if j != i:
                            both |= mask & mask2
                    for r in range(3):
                        for c in range(3):
                            cell = (slice(32 * r, 32 * r + 32), slice(32 * c, 32 * c + 32))
                            for column, hit in ((colors.index(color), mask[cell].any()),
                                                (5 + colors.index(color), both[cell].any())):
                                want[k, r, c, column] = max(want[k, r, c, column], hit)
        assert flags.tolist() == want.reshape(-1, 10).tolist(), item
        touching += int(want[..., 5:].any())
    assert touching >= 3
