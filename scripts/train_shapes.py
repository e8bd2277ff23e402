"""Train the built-in ``shapes`` model (himap_trt/models/shapes.py) on generated scenes, on CPU.

    .venv/bin/python scripts/train_shapes.py --out himap_trt/models/weights/shapes.safetensors

reproduces the shipped weights (defaults: 2 threads, 2,000 vision steps then 3,500 full steps, batch
32; 18:40 wall on an idle 2-core VM, docs/PERFORMANCE.md). Deterministic for a seed and thread
count: the model init, the training streams (split ``train`` of himap_trt.data.shapes) and the
order are all seeded. Every step draws fresh items, so no item is seen twice; the held-out dev set
(split ``eval``, seed 1; the accuracy figures in docs/PERFORMANCE.md use split ``eval``, seed 0) is
scored every ``--eval-every`` steps.

Two stages:

1. **Vision** (``--vision-steps``): the vision tower and projector alone learn an auxiliary
   per-patch task: a linear probe on each image token (the projector's output) predicts, from the
   scene description, the colour and kind of the shape whose box holds the patch centre and whether
   the patch holds a shape's centre. No decoder runs, so a step costs ~1/7 of a full one.
2. **Full model** (``--steps``): the cross-entropy of the answer tokens and EOS after the LLaVA-1.5
   prompt (``USER: <image>\\n{question} ASSISTANT:`` -> ``{answer}</s>``), plus the same auxiliary
   loss.

Without the auxiliary loss the from-scratch vision tower learns too slowly for a CPU budget (dev
accuracy stayed near chance for 400 steps); with it but without stage 1 the image tokens told small
shapes' kinds apart late and the model stopped at 0.88 after 3,000 steps; with stage 1 it passed
0.92 by step 2,500. The probe is not part of the model. Dev accuracy is exact match under teacher
forcing: every answer token and the EOS are the argmax given the right prefix, which is exactly
when greedy decoding produces the answer.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import resource
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from himap_trt.data.shapes import (  # noqa: E402
    COLORS, SHAPES, SPLITS, TEMPLATES, generate, random_item, random_scene, render, shape_mask)
from himap_trt.models.shapes import SHAPES_SPEC, new_shapes_model, shapes_processor  # noqa: E402
from himap_trt.models.tiny import EOS_ID, PAD_ID  # noqa: E402
from himap_trt.prompt import build_prompt  # noqa: E402

IGNORE = -100
#: Per-patch auxiliary classes: colour (5 + background), kind (3 + background), shape centre (no / yes).
AUX_CLASSES = (len(COLORS) + 1, len(SHAPES) + 1, 2)


def patch_labels(scene, spec) -> torch.Tensor:
    """[patches, 3] int64 auxiliary targets of one scene (see the module docstring), row-major patches."""
    grid = spec.image_size // spec.patch_size
    labels = torch.tensor([len(COLORS), len(SHAPES), 0]).repeat(grid * grid, 1)
    for s in scene.shapes:
        for r in range(grid):
            for c in range(grid):
                px, py = c * spec.patch_size + spec.patch_size / 2, r * spec.patch_size + spec.patch_size / 2
                if s.x <= px < s.x + s.size and s.y <= py < s.y + s.size:
                    labels[r * grid + c, :2] = torch.tensor([list(COLORS).index(s.color), SHAPES.index(s.kind)])
        cx, cy = int((s.x + s.size / 2) // spec.patch_size), int((s.y + s.size / 2) // spec.patch_size)
        labels[min(cy, grid - 1) * grid + min(cx, grid - 1), 2] = 1
    return labels


def patch_coverage(scene, spec) -> torch.Tensor:
    """[patches, sum(AUX_CLASSES)] float32 alternative auxiliary targets (``--aux-targets coverage``),
    row-major patches: three distributions per patch (each sums to 1) from the pixels :func:`render`
    paints: the fraction of the patch covered by each colour and by background, by each kind and by
    background, and one-hot whether the centre of a shape's bounding box lies in the patch."""
    grid, size = spec.image_size // spec.patch_size, spec.patch_size
    n_colors, n_kinds = len(COLORS), len(SHAPES)
    color = np.zeros((grid * grid, n_colors + 1), np.float32)
    kind = np.zeros((grid * grid, n_kinds + 1), np.float32)
    centre = np.zeros(grid * grid, np.int64)
    for s in scene.shapes:
        cover = shape_mask(s)[:grid * size, :grid * size].reshape(grid, size, grid, size).mean((1, 3)).reshape(-1)
        color[:, list(COLORS).index(s.color)] += cover
        kind[:, SHAPES.index(s.kind)] += cover
        cx, cy = int((s.x + s.size / 2) // size), int((s.y + s.size / 2) // size)
        centre[min(cy, grid - 1) * grid + min(cx, grid - 1)] = 1
    color[:, n_colors] = 1 - color[:, :n_colors].sum(1)   # shapes never overlap: coverage sums to <= 1
    kind[:, n_kinds] = 1 - kind[:, :n_kinds].sum(1)
    return torch.from_numpy(np.concatenate([color, kind, np.eye(2, dtype=np.float32)[centre]], axis=1))


def patch_targets(scenes, spec, aux_targets: str = "box") -> torch.Tensor:
    """The auxiliary targets of ``scenes`` stacked: [B, patches, 3] int64 (:func:`patch_labels`,
    ``box``) or [B, patches, sum(AUX_CLASSES)] float32 (:func:`patch_coverage`, ``coverage``)."""
    return torch.stack([(patch_coverage if aux_targets == "coverage" else patch_labels)(s, spec) for s in scenes])


def make_batch(items, processor, spec=SHAPES_SPEC, aux_targets: str = "box") -> dict[str, torch.Tensor]:
    """Training tensors for items: the processor's prompt ids (image tokens expanded), then the
    answer's ids and EOS, right-padded (so positions are 0..n-1 as in an unpadded prompt).

    Returns:
        input_ids, attention_mask, labels [B, T] int64 (labels IGNORE except answer + EOS, aligned
        with the token they predict: labels[t] is the target of position t), pixel_values [B,3,H,W],
        patch_labels [B, patches, 3] int64 (:func:`patch_labels`; ``aux_targets="box"``) or
        [B, patches, sum(AUX_CLASSES)] float32 (:func:`patch_coverage`; ``aux_targets="coverage"``).
    """
    prompts = [build_prompt(processor, it.question) for it in items]
    processor.tokenizer.padding_side = "left"
    encoded = processor(images=[it.image for it in items], text=prompts, padding=True, return_tensors="pt")
    rows, targets = [], []
    for ids, mask, it in zip(encoded["input_ids"], encoded["attention_mask"], items):
        prompt = ids[mask.bool()].tolist()
        answer = processor.tokenizer(it.answer, add_special_tokens=False)["input_ids"] + [EOS_ID]
        rows.append(prompt + answer[:-1])
        targets.append([IGNORE] * (len(prompt) - 1) + answer)
    width = max(map(len, rows))
    input_ids = torch.full((len(rows), width), PAD_ID, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (row, target) in enumerate(zip(rows, targets)):
        input_ids[i, :len(row)] = torch.tensor(row)
        labels[i, :len(target)] = torch.tensor(target)
        attention_mask[i, :len(row)] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels,
            "pixel_values": encoded["pixel_values"],
            "patch_labels": patch_targets([it.scene for it in items], spec, aux_targets)}


def aux_loss(probe, features: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The auxiliary per-patch loss: ``probe`` on the image tokens ``features`` [B, patches, hidden]
    against ``targets`` (class indices [B, patches, 3] or coverage distributions), mean over the
    three heads (colour, kind, centre)."""
    aux = probe(features)                                                              # [B,patches,sum(classes)]
    soft = targets.is_floating_point()   # coverage distributions, else class indices
    loss = aux.new_zeros(())
    for part, target_k in zip(aux.split(AUX_CLASSES, dim=-1),
                              targets.split(AUX_CLASSES, dim=-1) if soft else targets.unbind(-1)):
        target_k = target_k.flatten(0, 1) if soft else target_k.flatten()
        loss = loss + torch.nn.functional.cross_entropy(part.flatten(0, 1), target_k) / len(AUX_CLASSES)
    return loss


def forward_loss(model, batch, probe=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean answer-token cross-entropy + the auxiliary patch loss if ``probe`` is given, per-row
    exact match [B] bool under teacher forcing)."""
    captured = {}
    hook = model.model.multi_modal_projector.register_forward_hook(lambda m, i, o: captured.update(features=o))
    try:
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                       pixel_values=batch["pixel_values"]).logits                  # [B,T,V]
    finally:
        hook.remove()
    labels = batch["labels"]
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=IGNORE)
    target = labels != IGNORE
    exact = ((logits.argmax(-1) == labels) | ~target).all(-1)
    if probe is not None:
        loss = loss + aux_loss(probe, captured["features"], batch["patch_labels"])
    return loss, exact


def image_features(model, pixel_values: torch.Tensor) -> torch.Tensor:
    """[B, patches, hidden] float32: the projector's output for ``pixel_values`` [B, 3, H, W] (what
    the decoder receives as image tokens: transformers' ``get_image_features`` with the config's
    feature layer and CLS strategy)."""
    config = model.config
    return torch.stack(list(model.model.get_image_features(
        pixel_values=pixel_values, vision_feature_layer=config.vision_feature_layer,
        vision_feature_select_strategy=config.vision_feature_select_strategy).pooler_output))


def warmup_cosine(steps: int, warmup: int, final: float):
    """The learning-rate factor of step ``step`` (0-based): linear warm-up over ``warmup`` steps,
    then cosine decay to ``final`` (a fraction of the peak) at ``steps``."""
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, steps - warmup)
        return final + (1 - final) * 0.5 * (1 + math.cos(math.pi * progress))
    return factor


def pretrain_vision(model, probe, processor, *, steps: int, batch_size: int, lr: float, rng: np.random.Generator,
                    spec=SHAPES_SPEC, aux_targets: str = "box", log=print) -> None:
    """Stage 1: train the vision tower and projector alone on the auxiliary per-patch loss, on
    freshly drawn scenes (no questions, no decoder: ~1/8 of a full step's CPU).

    A from-scratch vision tower learns to tell the kinds of small shapes apart slowly when the
    decoder's answer loss dominates every step; this stage gives the image tokens the colour, kind
    and centre of the shape under each patch before the decoder starts reading them. Linear
    warm-up (5% of ``steps``) then cosine decay to 10% of ``lr``.
    """
    params = list(model.model.vision_tower.parameters()) + list(model.model.multi_modal_projector.parameters()) \
        + list(probe.parameters())
    optimizer = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.98), weight_decay=0.01)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(steps, max(1, steps // 20), 0.1))
    started, running = time.perf_counter(), []
    for step in range(1, steps + 1):
        scenes = [random_scene(rng) for _ in range(batch_size)]
        pixels = processor.image_processor(images=[render(s) for s in scenes], return_tensors="pt")["pixel_values"]
        targets = patch_targets(scenes, spec, aux_targets)
        features = image_features(model, pixels)
        loss = aux_loss(probe, features, targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        scheduler.step()
        if aux_targets == "box":
            with torch.no_grad():
                predicted = [part.argmax(-1) for part in probe(features).split(AUX_CLASSES, dim=-1)]
                shape_patch = targets[..., 1] != len(SHAPES)
                kind_acc = (predicted[1] == targets[..., 1])[shape_patch].float().mean().item()
                color_acc = (predicted[0] == targets[..., 0])[shape_patch].float().mean().item()
            running.append((loss.item(), kind_acc, color_acc))
        else:
            running.append((loss.item(), float("nan"), float("nan")))
        if step % 100 == 0 or step == steps:
            loss_avg, kind_avg, color_avg = np.mean(running, axis=0)
            running.clear()
            log(f"vision step {step}/{steps} aux-loss {loss_avg:.4f} kind-acc {kind_avg:.3f} "
                f"color-acc {color_avg:.3f} (patches on a shape) {time.perf_counter() - started:.0f}s wall")


@torch.no_grad()
def dev_accuracy(model, processor, items, spec=SHAPES_SPEC, batch_size: int = 64) -> dict[str, float]:
    """Exact-match accuracy per template and overall (teacher forcing = greedy exact match)."""
    model.eval()
    hits: dict[str, list[bool]] = defaultdict(list)
    for start in range(0, len(items), batch_size):
        chunk = items[start:start + batch_size]
        _, exact = forward_loss(model, make_batch(chunk, processor, spec))
        for it, ok in zip(chunk, exact.tolist()):
            hits[it.template].append(ok)
    model.train()
    result = {t: float(np.mean(hits[t])) for t in TEMPLATES if hits[t]}
    result["all"] = float(np.mean([v for vs in hits.values() for v in vs]))
    return result


def cpu_seconds() -> float:
    """CPU time (user + sys, seconds) this process has used so far, all threads."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def train(*, steps: int, batch_size: int = 32, lr: float = 2e-3, warmup: int = 100, final_lr: float = 0.1,
          seed: int = 0, spec=SHAPES_SPEC, dev_items: int = 256, eval_every: int = 250, threads: int = 1,
          aux: bool = True, aux_targets: str = "box", init: Path | None = None, vision_steps: int = 0,
          vision_lr: float = 3e-3, log=print) -> tuple[torch.nn.Module, dict[str, float]]:
    """Train from scratch (or continue from the weights file ``init``, with a fresh optimizer,
    schedule and data stream of ``seed``); returns the model (eval mode) and the final dev accuracy."""
    torch.set_num_threads(threads)
    model = new_shapes_model(spec, seed=seed)
    if init is not None:
        from safetensors.torch import load_file

        model.load_state_dict(load_file(init), strict=True)
    model.config._attn_implementation = "sdpa"  # training speed; the exported graphs use their own attention
    model.config.text_config._attn_implementation = "sdpa"
    model.config.vision_config._attn_implementation = "sdpa"
    model.train()
    processor = shapes_processor(spec)
    probe = torch.nn.Linear(spec.hidden_size, sum(AUX_CLASSES)) if aux else None
    if vision_steps:
        if probe is None:
            raise ValueError("vision pre-training (--vision-steps) needs the auxiliary patch loss")
        pretrain_vision(model, probe, processor, steps=vision_steps, batch_size=batch_size, lr=vision_lr,
                        rng=np.random.default_rng([seed, SPLITS["train"], 1]), spec=spec, aux_targets=aux_targets,
                        log=log)
    params = list(model.named_parameters()) + (list(probe.named_parameters(prefix="probe")) if probe else [])
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
        batch = make_batch([random_item(rng) for _ in range(batch_size)], processor, spec, aux_targets)
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
            acc = dev_accuracy(model, processor, dev, spec)
            log(f"step {step} dev " + " ".join(f"{k} {v:.3f}" for k, v in acc.items()))
    return model.eval(), acc


def save_weights(model, path: Path) -> int:
    """Write the state dict as safetensors (fp32); returns the file size (bytes)."""
    from safetensors.torch import save_file

    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(path), metadata={"format": "pt"})
    return path.stat().st_size


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, help="safetensors file to write (default: write nothing)")
    parser.add_argument("--steps", type=int, default=3500, help="stage 2 optimizer steps, full model (default 3500)")
    parser.add_argument("--batch-size", type=int, default=32, help="items per step (default 32)")
    parser.add_argument("--lr", type=float, default=2e-3, help="peak learning rate (default 2e-3)")
    parser.add_argument("--warmup", type=int, default=100, help="linear warm-up steps (default 100)")
    parser.add_argument("--final-lr", type=float, default=0.1,
                        help="learning rate at the last step, as a fraction of the peak (cosine decay; default 0.1)")
    parser.add_argument("--aux-targets", choices=("box", "coverage"), default="box",
                        help="per-patch auxiliary targets: box (colour/kind of the shape whose box holds the patch "
                             "centre; the shipped weights) or coverage (pixel fraction of each colour/kind) "
                             "(default box)")
    parser.add_argument("--seed", type=int, default=0, help="seed of init and data (default 0)")
    parser.add_argument("--threads", type=int, default=2,
                        help="torch CPU threads (default 2: the 2-core budget; on a shared, loaded CPU 1 runs faster)")
    parser.add_argument("--dev-items", type=int, default=256, help="held-out dev items (default 256)")
    parser.add_argument("--eval-every", type=int, default=500, help="dev evaluation period in steps (default 500)")
    parser.add_argument("--vision-steps", type=int, default=2000,
                        help="stage 1: steps training only the vision tower and projector on the auxiliary patch "
                             "loss before the full model (default 2000; 0: none)")
    parser.add_argument("--vision-lr", type=float, default=3e-3, help="stage 1 peak learning rate (default 3e-3)")
    parser.add_argument("--init", type=Path, help="continue from this weights file (fresh optimizer and schedule)")
    parser.add_argument("--no-aux", action="store_true", help="train without the auxiliary patch loss")
    parser.add_argument("--spec", type=json.loads, default={},
                        help="JSON overrides of the model spec for experiments, e.g. '{\"hidden_size\": 96}' "
                             "(the shipped weights must use the default spec)")
    args = parser.parse_args(argv)
    if args.vision_steps < 0 or args.vision_lr <= 0:
        parser.error(f"--vision-steps must be >= 0 and --vision-lr > 0, got {args.vision_steps} and {args.vision_lr}")
    if args.vision_steps and args.no_aux:
        parser.error("--vision-steps trains on the auxiliary patch loss: it cannot be combined with --no-aux "
                     "(use --vision-steps 0)")
    spec = dataclasses.replace(SHAPES_SPEC, **args.spec)
    print(f"spec {spec}", flush=True)
    model, acc = train(steps=args.steps, batch_size=args.batch_size, lr=args.lr, warmup=args.warmup,
                       final_lr=args.final_lr, seed=args.seed, spec=spec, dev_items=args.dev_items,
                       eval_every=args.eval_every, threads=args.threads, aux=not args.no_aux,
                       aux_targets=args.aux_targets, init=args.init, vision_steps=args.vision_steps,
                       vision_lr=args.vision_lr, log=lambda line: print(line, flush=True))
    params = sum(p.numel() for p in model.parameters())
    print(f"parameters {params}; final dev accuracy {acc.get('all', float('nan')):.3f}", flush=True)
    if args.out:
        if args.spec:
            print("note: --spec overrides given; these weights do not fit the shipped model", flush=True)
        size = save_weights(model, args.out)
        print(f"wrote {args.out} ({size / 1e6:.2f} MB)", flush=True)


if __name__ == "__main__":
    main()
