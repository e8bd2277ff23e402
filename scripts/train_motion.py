"""Train the built-in ``motion`` model (himap_trt/models/motion.py, a small Qwen3-VL) on generated
clips and still images (himap_trt/data/motion.py), on CPU.

    .venv/bin/python scripts/train_motion.py --out himap_trt/models/weights/motion.safetensors

reproduces the shipped weights (defaults as in docs/PERFORMANCE.md "The trained `motion` model").
Deterministic for a seed and thread count: the model init, the training streams (split ``train``
of himap_trt.data.motion) and the order are all seeded. Every step draws fresh items, so no item is
seen twice; a held-out dev set (split ``eval``, seed 1; the accuracy figures in docs/PERFORMANCE.md
use split ``eval``, seed 0) is scored every ``--eval-every`` steps.

Training batches are built by the inference code itself: the Qwen3-VL family's ``prepare_batch``
(himap_trt/arch/qwen3_vl.py) turns each clip (a :class:`himap_trt.video.Video` of its 8 frames at 4
fps) or still image into the prompt ids, pixel patches, grid and M-RoPE positions the exported
graphs receive; the answer's ids and ``<|im_end|>`` follow the prompt. transformers'
``Qwen3VLForConditionalGeneration`` runs them with those positions (a clip's pads are image tokens
with a (4, 6, 6) grid, which is how the pipeline feeds it too).

Two stages, as scripts/train_shapes.py (whose recipe this follows; see there for why):

1. **Vision** (``--vision-steps``): the vision tower alone learns an auxiliary per-token task: a
   linear probe on each visual token (the merger's output, one per 32 x 32 px cell of a temporal
   patch) predicts, from the clip description, the colour, kind and direction of motion of the shape
   covering most of the cell at the patch's first frame (or background), and per colour whether it
   is present in the cell and whether it overlaps another shape there (:func:`token_flags`; the
   contact flags are what a ``meet`` question needs). No decoder runs.
2. **Full model** (``--steps``): the cross-entropy of the answer tokens and ``<|im_end|>``, plus the
   same auxiliary loss.

Training items are drawn with template weights (:data:`TRAIN_TEMPLATE_WEIGHTS`); the dev and
held-out sets are uniform over templates.

Dev accuracy is exact match under teacher forcing: every answer token and the EOS are the argmax
given the right prefix, which is exactly when greedy decoding produces the answer.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from train_shapes import cpu_seconds, save_weights, warmup_cosine  # noqa: E402

from himap_trt.arch.qwen3_vl import Qwen3_VL  # noqa: E402
from himap_trt.data.motion import (  # noqa: E402
    COLORS, DIRECTIONS, FPS, FRAMES, SHAPES, SPLITS, TEMPLATES, generate, random_item)
from himap_trt.models.motion import MOTION_SPEC, new_motion_model, motion_processor  # noqa: E402
from himap_trt.models.tiny_qwen import ENDOFTEXT_ID, IM_END_ID, IMAGE_PAD_ID  # noqa: E402
from himap_trt.video import frames_video  # noqa: E402

IGNORE = -100
#: Per-token auxiliary classes: colour (5 + background), kind (3 + background), direction (5 + background).
AUX_CLASSES = (len(COLORS) + 1, len(SHAPES) + 1, len(DIRECTIONS) + 1)
#: Per-token auxiliary flags (:func:`token_flags`): each colour present in the cell, each colour in contact.
AUX_FLAGS = 2 * len(COLORS)
#: Weight of a positive contact flag in its binary cross-entropy (contacts are rare: without it the
#: probe learned to say "no contact" everywhere within 100 steps).
CONTACT_POS_WEIGHT = 4.0
#: How often training draws each template (relative; the dev and held-out sets are uniform). The
#: templates the first model got wrong most (meet at chance, how many move, the still-image ones)
#: are drawn more, first colour (1.000 held out) less.
TRAIN_TEMPLATE_WEIGHTS: dict[str, float] = {"direction": 1.0, "first_color": 0.5, "last_color": 1.0,
                                            "count_moving": 1.5, "meet": 2.0, "image_color": 1.5,
                                            "image_count": 1.5}
#: Visual tokens the training prompts may hold (the exports' --max-image-tokens for this model).
MAX_VISUAL_TOKENS = 64
ARCH = Qwen3_VL()


def draw_items(rng: np.random.Generator, n: int) -> list:
    """``n`` fresh training items, templates drawn by :data:`TRAIN_TEMPLATE_WEIGHTS`."""
    names = list(TEMPLATES)
    weights = np.array([TRAIN_TEMPLATE_WEIGHTS[t] for t in names])
    return [random_item(rng, names[int(i)]) for i in rng.choice(len(names), size=n, p=weights / weights.sum())]


def visual(item):
    """What ``prepare_batch`` takes for an item: its still image, or its clip as a Video (every frame, FPS)."""
    frames = item.frames
    return frames[0] if item.clip.still else frames_video(frames, fps=FPS, max_frames=FRAMES)


def token_labels(clip, grid: tuple[int, int, int], cell: int) -> torch.Tensor:
    """[t·h·w, 3] int64 auxiliary targets of one visual input: for each temporal patch k (first frame
    2k; frame 0 for a still image) and merged cell (row-major, ``cell`` px square), the colour, kind
    and direction indices of the shape whose box covers most of the cell (drawn last on ties), or
    the background classes."""
    t, h, w = grid
    labels = torch.tensor([len(COLORS), len(SHAPES), len(DIRECTIONS)]).repeat(t * h * w, 1)
    for k in range(t):
        frame = 2 * k
        best = np.zeros((h, w))
        for s in clip.shown(frame):
            x, y = s.box(frame)
            for r in range(h):
                for c in range(w):
                    ox = min(x + s.size, (c + 1) * cell) - max(x, c * cell)
                    oy = min(y + s.size, (r + 1) * cell) - max(y, r * cell)
                    area = max(ox, 0) * max(oy, 0)
                    if area > 0 and area >= best[r, c]:
                        best[r, c] = area
                        labels[k * h * w + r * w + c] = torch.tensor(
                            [list(COLORS).index(s.color), SHAPES.index(s.kind), list(DIRECTIONS).index(s.direction)])
    return labels


def _cells_hit(x0: int, y0: int, x1: int, y1: int, h: int, w: int, cell: int) -> list[tuple[int, int]]:
    """(row, col) of the ``cell`` px cells of an h x w grid that the box [x0, x1) x [y0, y1) covers (area > 0)."""
    return [(r, c) for r in range(h) for c in range(w)
            if min(x1, (c + 1) * cell) > max(x0, c * cell) and min(y1, (r + 1) * cell) > max(y0, r * cell)]


def token_flags(clip, grid: tuple[int, int, int], cell: int) -> torch.Tensor:
    """[t·h·w, 2·colours] float32 auxiliary flags of one visual input, per temporal patch k (frames
    2k and 2k+1; frame 0 for a still image) and merged cell (row-major, ``cell`` px square): columns
    0..4 whether a shape of that colour (:data:`COLORS` order) covers part of the cell in either
    frame, columns 5..9 whether a shape of that colour overlaps another shape there (their boxes'
    intersection covers part of the cell), which is what a ``meet`` question asks about."""
    t, h, w = grid
    colors = list(COLORS)
    flags = torch.zeros(t * h * w, AUX_FLAGS)
    for k in range(t):
        for frame in ((0,) if clip.still else (2 * k, 2 * k + 1)):
            shown = clip.shown(frame)
            boxes = [(*s.box(frame), s.size) for s in shown]
            for s, (x, y, size) in zip(shown, boxes):
                for r, c in _cells_hit(x, y, x + size, y + size, h, w, cell):
                    flags[k * h * w + r * w + c, colors.index(s.color)] = 1
            for i, (a, (ax, ay, asz)) in enumerate(zip(shown, boxes)):
                for b, (bx, by, bsz) in zip(shown[i + 1:], boxes[i + 1:]):
                    x0, y0, x1, y1 = max(ax, bx), max(ay, by), min(ax + asz, bx + bsz), min(ay + asz, by + bsz)
                    if x1 > x0 and y1 > y0:
                        for r, c in _cells_hit(x0, y0, x1, y1, h, w, cell):
                            for s in (a, b):
                                flags[k * h * w + r * w + c, len(colors) + colors.index(s.color)] = 1
    return flags


def fast_pixels(items, processor) -> torch.Tensor:
    """[patches, C·T·P·P] float32: the pixel patches ``prepare_batch`` gives for ``items`` (frames
    already a multiple of patch x merge px, so no resize: rescale, normalise, then Qwen's patch
    layout), computed in one numpy pass (the image processor takes ~30 ms a clip)."""
    ip = processor.image_processor
    temporal, patch, merge = int(ip.temporal_patch_size), int(ip.patch_size), int(ip.merge_size)
    mean = np.asarray(ip.image_mean, np.float32)[:, None, None]
    std = np.asarray(ip.image_std, np.float32)[:, None, None]
    out = []
    for it in items:
        frames = np.stack([np.asarray(f, np.float32) for f in it.frames]).transpose(0, 3, 1, 2)  # [F,C,H,W]
        if len(frames) % temporal:
            frames = np.concatenate([frames, np.repeat(frames[-1:], temporal - len(frames) % temporal, 0)])
        frames = (frames * np.float32(ip.rescale_factor) - mean) / std
        f, c, height, width = frames.shape
        t, gh, gw = f // temporal, height // patch, width // patch
        x = frames.reshape(t, temporal, c, gh // merge, merge, patch, gw // merge, merge, patch)
        x = x.transpose(0, 3, 6, 4, 7, 2, 1, 5, 8)
        out.append(x.reshape(t * gh * gw, c * temporal * patch * patch))
    return torch.from_numpy(np.concatenate(out))


_PROMPTS: dict[tuple[str, str], tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}


def _prompt(item, processor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(prompt ids [S], M-RoPE positions [3, S], grid [3]) of one item from ``prepare_batch``; cached
    by (media, question): every clip (and every still image) has the same size, frame count and
    times, so its prompt depends on the question alone."""
    key = (item.media, item.question)
    if key not in _PROMPTS:
        batch = ARCH.prepare_batch(processor, [visual(item)], [item.question], IMAGE_PAD_ID, MAX_VISUAL_TOKENS)
        real = batch.attention_mask[0].bool()
        _PROMPTS[key] = (batch.input_ids[0, real], batch.position_ids[:, 0, real], batch.image_grid_thw[0])
    return _PROMPTS[key]


def make_batch(items, processor, fast: bool = True) -> dict[str, torch.Tensor]:
    """Training tensors: each row the inference prompt (``prepare_batch``'s real tokens and M-RoPE
    positions), then the answer's ids and ``<|im_end|>``, right-padded; answer positions continue the
    prompt's on all three axes. ``fast``: prompts cached by question (:func:`_prompt`) and pixels
    from :func:`fast_pixels` (tests check both equal ``prepare_batch``'s for the batch).

    Returns:
        input_ids, attention_mask, labels [B, T] int64 (labels[t] is the target of position t),
        position_ids [3, B, T] int64, pixel_values [patches, C·T·P·P] float32, image_grid_thw
        [B, 3] int64, token_labels [visual tokens, 3] int64 (:func:`token_labels`, in the merger's
        output order), token_flags [visual tokens, 10] float32 (:func:`token_flags`).
    """
    if fast:
        prompts = [_prompt(it, processor) for it in items]
        pixel_values, grids = fast_pixels(items, processor), torch.stack([g for _, _, g in prompts])
    else:
        batch = ARCH.prepare_batch(processor, [visual(it) for it in items], [it.question for it in items],
                                   IMAGE_PAD_ID, MAX_VISUAL_TOKENS)
        real = batch.attention_mask.bool()
        prompts = [(batch.input_ids[b, real[b]], batch.position_ids[:, b, real[b]], None) for b in range(len(items))]
        pixel_values, grids = batch.pixel_values, batch.image_grid_thw
    rows, positions, targets = [], [], []
    for (prompt, pos, _), it in zip(prompts, items):
        answer = processor.tokenizer(it.answer, add_special_tokens=False)["input_ids"] + [IM_END_ID]
        after = pos.max() + 1 + torch.arange(len(answer) - 1)
        rows.append(torch.cat([prompt, torch.tensor(answer[:-1], dtype=torch.long)]))
        positions.append(torch.cat([pos, after[None].expand(3, -1)], dim=1))
        targets.append([IGNORE] * (len(prompt) - 1) + answer)
    width = max(len(r) for r in rows)
    size = len(rows)
    input_ids = torch.full((size, width), ENDOFTEXT_ID, dtype=torch.long)
    labels = torch.full((size, width), IGNORE, dtype=torch.long)
    mask = torch.zeros((size, width), dtype=torch.long)
    position_ids = torch.zeros((3, size, width), dtype=torch.long)
    for b, (row, pos, target) in enumerate(zip(rows, positions, targets)):
        input_ids[b, :len(row)] = row
        labels[b, :len(target)] = torch.tensor(target)
        mask[b, :len(row)] = 1
        position_ids[:, b, :len(row)] = pos
    merge = processor.image_processor.merge_size
    cell = processor.image_processor.patch_size * merge
    cells = [(int(g[0]), int(g[1]) // merge, int(g[2]) // merge) for g in grids]
    aux = torch.cat([token_labels(it.clip, grid, cell) for it, grid in zip(items, cells)])
    flags = torch.cat([token_flags(it.clip, grid, cell) for it, grid in zip(items, cells)])
    return {"input_ids": input_ids, "attention_mask": mask, "labels": labels, "position_ids": position_ids,
            "pixel_values": pixel_values, "image_grid_thw": grids, "token_labels": aux, "token_flags": flags}


def batched_vision_attention(self, hidden_states, cu_seqlens, position_embeddings=None, max_seqlen=None, **kwargs):
    """transformers' ``Qwen3VLVisionAttention.forward`` (non-flash path) for the case where every
    chunk of ``cu_seqlens`` has the same length (every frame pair of this data: 6 x 6 patches): one
    ``scaled_dot_product_attention`` over [chunks, heads, length, head_dim] instead of one call per
    chunk (~100 per block at batch 32, most of a training step's CPU); other cases go to the original."""
    lengths = cu_seqlens[1:] - cu_seqlens[:-1]
    if not bool((lengths == lengths[0]).all()):
        return type(self).forward(self, hidden_states, cu_seqlens, position_embeddings, max_seqlen, **kwargs)
    from transformers.models.qwen3_vl.modeling_qwen3_vl import apply_rotary_pos_emb_vision

    seq_length, length = hidden_states.shape[0], int(lengths[0])
    q, k, v = self.qkv(hidden_states).reshape(seq_length, 3, self.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
    cos, sin = position_embeddings
    q, k = apply_rotary_pos_emb_vision(q, k, cos, sin)                                  # [S, H, d]
    chunks = seq_length // length
    q, k, v = (x.reshape(chunks, length, self.num_heads, -1).transpose(1, 2) for x in (q, k, v))
    out = torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=self.scaling)  # [n, H, L, d]
    return self.proj(out.transpose(1, 2).reshape(seq_length, -1))


def use_batched_vision_attention(model) -> None:
    """Route every vision block of ``model`` through :func:`batched_vision_attention` (training only;
    the shipped weights do not depend on it)."""
    import types

    for block in model.model.visual.blocks:
        block.attn.forward = types.MethodType(batched_vision_attention, block.attn)


def probe_outputs(probe, features: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
    """``probe`` on ``features`` [N, hidden], split into its heads: the three class heads' logits
    ([N, c] for each c of :data:`AUX_CLASSES`), then the presence and contact flags' logits [N, 5] each."""
    *heads, presence, contact = probe(features).split((*AUX_CLASSES, len(COLORS), len(COLORS)), dim=-1)
    return heads, presence, contact


def aux_loss(probe, features: torch.Tensor, targets: torch.Tensor, flags: torch.Tensor) -> torch.Tensor:
    """The per-token auxiliary loss: ``probe`` on ``features`` [N, hidden]; the mean of the three
    heads' cross-entropies against ``targets`` [N, 3] and the binary cross-entropies of the presence
    and contact flags against ``flags`` [N, 10]."""
    heads, presence, contact = probe_outputs(probe, features)
    terms = [torch.nn.functional.cross_entropy(part, target) for part, target in zip(heads, targets.unbind(-1))]
    present, touching = flags.split(len(COLORS), dim=-1)
    terms.append(torch.nn.functional.binary_cross_entropy_with_logits(presence, present))
    terms.append(torch.nn.functional.binary_cross_entropy_with_logits(
        contact, touching, pos_weight=torch.tensor(CONTACT_POS_WEIGHT)))
    return sum(terms) / len(terms)


def visual_features(model, batch) -> torch.Tensor:
    """[visual tokens, hidden] float32: the vision tower's merged output for the batch (what replaces
    the image pads; DeepStack's features aside)."""
    captured = {}
    hook = model.model.visual.merger.register_forward_hook(lambda m, i, o: captured.update(features=o))
    try:
        model.model.visual(batch["pixel_values"], grid_thw=batch["image_grid_thw"])
    finally:
        hook.remove()
    return captured["features"]


def forward_loss(model, batch, probe=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean answer-token cross-entropy + the auxiliary loss if ``probe`` is given, per-row exact
    match [B] bool under teacher forcing)."""
    captured = {}
    hook = model.model.visual.merger.register_forward_hook(lambda m, i, o: captured.update(features=o))
    try:
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                       position_ids=batch["position_ids"], pixel_values=batch["pixel_values"],
                       image_grid_thw=batch["image_grid_thw"]).logits                 # [B,T,V]
    finally:
        hook.remove()
    labels = batch["labels"]
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=IGNORE)
    exact = ((logits.argmax(-1) == labels) | (labels == IGNORE)).all(-1)
    if probe is not None:
        loss = loss + aux_loss(probe, captured["features"], batch["token_labels"], batch["token_flags"])
    return loss, exact


def pretrain_vision(model, probe, processor, *, steps: int, batch_size: int, lr: float, rng, log=print) -> None:
    """Stage 1: the vision tower and the probe alone on the auxiliary loss, fresh items every step;
    linear warm-up (5% of ``steps``) then cosine decay to 10% of ``lr``."""
    params = list(model.model.visual.parameters()) + list(probe.parameters())
    optimizer = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.98), weight_decay=0.01)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(steps, max(1, steps // 20), 0.1))
    started, running = time.perf_counter(), []
    for step in range(1, steps + 1):
        batch = make_batch(draw_items(rng, batch_size), processor)
        features = visual_features(model, batch)
        loss = aux_loss(probe, features, batch["token_labels"], batch["token_flags"])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        scheduler.step()
        with torch.no_grad():
            heads, _, contact_logits = probe_outputs(probe, features)
            targets, contact = batch["token_labels"], batch["token_flags"][:, len(COLORS):]
            on = targets[:, 0] != len(COLORS)
            accs = [(p.argmax(-1) == targets[:, i])[on].float().mean().item() for i, p in enumerate(heads)]
            hits = (contact_logits > 0)[contact > 0]
            recall = hits.float().mean().item() if len(hits) else float("nan")
        running.append((loss.item(), *accs, recall))
        if step % 50 == 0 or step == steps:
            loss_avg, color_acc, kind_acc, dir_acc, contact_recall = np.nanmean(running, axis=0)
            running.clear()
            log(f"vision step {step}/{steps} aux-loss {loss_avg:.4f} color-acc {color_acc:.3f} kind-acc {kind_acc:.3f} "
                f"direction-acc {dir_acc:.3f} (tokens on a shape) contact-recall {contact_recall:.3f} "
                f"{time.perf_counter() - started:.0f}s wall")


@torch.no_grad()
def dev_accuracy(model, processor, items, batch_size: int = 32) -> dict[str, float]:
    """Exact-match accuracy per template and overall (teacher forcing = greedy exact match)."""
    model.eval()
    hits: dict[str, list[bool]] = defaultdict(list)
    for start in range(0, len(items), batch_size):
        chunk = items[start:start + batch_size]
        _, exact = forward_loss(model, make_batch(chunk, processor))
        for it, ok in zip(chunk, exact.tolist()):
            hits[it.template].append(ok)
    model.train()
    result = {t: float(np.mean(hits[t])) for t in TEMPLATES if hits[t]}
    result["all"] = float(np.mean([v for vs in hits.values() for v in vs]))
    return result


def train(*, steps: int, batch_size: int = 32, lr: float = 2e-3, warmup: int = 100, final_lr: float = 0.1,
          seed: int = 0, spec=MOTION_SPEC, dev_items: int = 280, eval_every: int = 200, threads: int = 1,
          vision_steps: int = 0, vision_lr: float = 3e-3, init: Path | None = None,
          checkpoint: Path | None = None, log=print) -> tuple[torch.nn.Module, dict[str, float]]:
    """Train from scratch (or continue from the weights file ``init``); returns the model (eval mode)
    and the final dev accuracy. ``checkpoint``: written after every dev evaluation."""
    torch.set_num_threads(threads)
    model = new_motion_model(spec, seed=seed)
    if init is not None:
        from safetensors.torch import load_file

        model.load_state_dict(load_file(init), strict=True)
    for config in (model.config, model.config.text_config, model.config.vision_config):
        config._attn_implementation = "sdpa"   # training speed; the exported graphs use their own attention
    use_batched_vision_attention(model)
    model.train()
    processor = motion_processor(spec)
    probe = torch.nn.Linear(spec.hidden_size, sum(AUX_CLASSES) + AUX_FLAGS)
    if vision_steps:
        pretrain_vision(model, probe, processor, steps=vision_steps, batch_size=batch_size, lr=vision_lr,
                        rng=np.random.default_rng([seed, SPLITS["train"], 1]), log=log)
    params = list(model.named_parameters()) + list(probe.named_parameters(prefix="probe"))
    decay = [p for n, p in params if p.ndim >= 2 and "embed" not in n]
    other = [p for n, p in params if not (p.ndim >= 2 and "embed" not in n)]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": 0.01}, {"params": other, "weight_decay": 0.0}],
                                  lr=lr, betas=(0.9, 0.98))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(steps, warmup, final_lr))
    rng = np.random.default_rng([seed, SPLITS["train"]])
    dev = generate(dev_items, seed=1, split="eval") if dev_items else []
    started, cpu_started = time.perf_counter(), cpu_seconds()
    acc: dict[str, float] = {}
    running = []
    for step in range(1, steps + 1):
        batch = make_batch(draw_items(rng, batch_size), processor)
        loss, exact = forward_loss(model, batch, probe)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for _, p in params], 1.0)
        optimizer.step()
        scheduler.step()
        running.append((loss.item(), exact.float().mean().item()))
        if step % 25 == 0 or step == steps:
            loss_avg, acc_avg = np.mean(running, axis=0)
            running.clear()
            log(f"step {step}/{steps} loss {loss_avg:.4f} train-acc {acc_avg:.3f} "
                f"lr {scheduler.get_last_lr()[0]:.2e} {time.perf_counter() - started:.0f}s wall "
                f"{cpu_seconds() - cpu_started:.0f}s cpu")
        if dev and (step % eval_every == 0 or step == steps):
            acc = dev_accuracy(model, processor, dev)
            log(f"step {step} dev " + " ".join(f"{k} {v:.3f}" for k, v in acc.items()))
            if checkpoint is not None:
                save_weights(model, checkpoint)
    return model.eval(), acc


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, help="safetensors file to write (default: write nothing)")
    parser.add_argument("--checkpoint", type=Path, help="safetensors file rewritten after every dev evaluation")
    parser.add_argument("--steps", type=int, default=2700, help="stage 2 optimizer steps, full model (default 2700)")
    parser.add_argument("--batch-size", type=int, default=32, help="items per step (default 32)")
    parser.add_argument("--lr", type=float, default=2e-3, help="peak learning rate (default 2e-3)")
    parser.add_argument("--warmup", type=int, default=100, help="linear warm-up steps (default 100)")
    parser.add_argument("--final-lr", type=float, default=0.1,
                        help="learning rate at the last step, as a fraction of the peak (cosine decay; default 0.1)")
    parser.add_argument("--seed", type=int, default=0, help="seed of init and data (default 0)")
    parser.add_argument("--threads", type=int, default=2,
                        help="torch CPU threads (default 2, the machine's cores; on a loaded machine 1 ran faster)")
    parser.add_argument("--dev-items", type=int, default=280, help="held-out dev items (default 280)")
    parser.add_argument("--eval-every", type=int, default=200, help="dev evaluation period in steps (default 200)")
    parser.add_argument("--vision-steps", type=int, default=800,
                        help="stage 1: steps training only the vision tower on the auxiliary loss (default 800)")
    parser.add_argument("--vision-lr", type=float, default=3e-3, help="stage 1 peak learning rate (default 3e-3)")
    parser.add_argument("--init", type=Path, help="continue from this weights file (fresh optimizer and schedule)")
    parser.add_argument("--spec", type=json.loads, default={},
                        help="JSON overrides of the model spec for experiments (the shipped weights use the default)")
    args = parser.parse_args(argv)
    if args.vision_steps < 0 or args.steps < 1:
        parser.error(f"--vision-steps must be >= 0 and --steps >= 1, got {args.vision_steps} and {args.steps}")
    spec = dataclasses.replace(MOTION_SPEC, **args.spec)
    print(f"spec {spec}", flush=True)
    model, acc = train(steps=args.steps, batch_size=args.batch_size, lr=args.lr, warmup=args.warmup,
                       final_lr=args.final_lr, seed=args.seed, spec=spec, dev_items=args.dev_items,
                       eval_every=args.eval_every, threads=args.threads, vision_steps=args.vision_steps,
                       vision_lr=args.vision_lr, init=args.init, checkpoint=args.checkpoint,
                       log=lambda line: print(line, flush=True))
    params = sum(p.numel() for p in model.parameters())
    print(f"parameters {params}; final dev accuracy {acc.get('all', float('nan')):.3f}", flush=True)
    if args.out:
        size = save_weights(model, args.out)
        print(f"wrote {args.out} ({size / 1e6:.2f} MB)", flush=True)


if __name__ == "__main__":
    main()
