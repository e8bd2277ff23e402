"""Train the built-in ``shapes`` model (himap_trt/models/shapes.py) on generated scenes, on CPU.

    nice -n 10 .venv/bin/python scripts/train_shapes.py --out himap_trt/models/weights/shapes.safetensors

Deterministic for a seed (and thread count): the model init, the training stream (split ``train``
of himap_trt.data.shapes) and the order are all seeded. Every step draws a fresh batch of items,
so no item is seen twice; the held-out dev set (split ``eval``, seed 1 — the accuracy figures in
docs/PERFORMANCE.md use split ``eval``, seed 0) is scored every ``--eval-every`` steps.

The loss is the cross-entropy of the answer tokens and EOS after the LLaVA-1.5 prompt
(``USER: <image>\\n{question} ASSISTANT:`` -> ``{answer}</s>``), plus an auxiliary per-patch loss
that only training uses: a linear probe on each image token (the projector's output) predicts,
from the scene description, the colour and kind of the shape under the patch centre and whether
the patch holds a shape's centre. Without it the from-scratch vision tower learns too slowly for a
CPU budget (dev accuracy stayed near chance for 400 steps); the probe is not part of the model. Dev accuracy is exact match under
teacher forcing: every answer token and the EOS are the argmax given the right prefix, which is
exactly when greedy decoding produces the answer.
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

from himap_trt.data.shapes import COLORS, SHAPES, SPLITS, TEMPLATES, generate, random_item, shape_mask  # noqa: E402
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
            "patch_labels": torch.stack([(patch_coverage if aux_targets == "coverage" else patch_labels)(it.scene, spec)
                                         for it in items])}


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
        aux = probe(captured["features"])                                             # [B,patches,sum(classes)]
        targets = batch["patch_labels"]
        soft = targets.is_floating_point()   # coverage distributions, else class indices
        for part, target_k in zip(aux.split(AUX_CLASSES, dim=-1),
                                  targets.split(AUX_CLASSES, dim=-1) if soft else targets.unbind(-1)):
            target_k = target_k.flatten(0, 1) if soft else target_k.flatten()
            loss = loss + torch.nn.functional.cross_entropy(part.flatten(0, 1), target_k) / len(AUX_CLASSES)
    return loss, exact


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
          aux: bool = True, aux_targets: str = "box", init: Path | None = None, log=print) -> tuple[torch.nn.Module, dict[str, float]]:
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
    params = list(model.named_parameters()) + (list(probe.named_parameters(prefix="probe")) if probe else [])
    decay = [p for n, p in params if p.ndim >= 2 and "embed" not in n]
    other = [p for n, p in params if not (p.ndim >= 2 and "embed" not in n)]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": 0.01}, {"params": other, "weight_decay": 0.0}],
                                  lr=lr, betas=(0.9, 0.98))

    def schedule(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, steps - warmup)
        return final_lr + (1 - final_lr) * 0.5 * (1 + math.cos(math.pi * progress))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
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
    parser.add_argument("--steps", type=int, default=3000, help="optimizer steps (default 3000)")
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
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1: on a shared CPU, more threads spin and run slower)")
    parser.add_argument("--dev-items", type=int, default=256, help="held-out dev items (default 256)")
    parser.add_argument("--eval-every", type=int, default=250, help="dev evaluation period in steps (default 250)")
    parser.add_argument("--init", type=Path, help="continue from this weights file (fresh optimizer and schedule)")
    parser.add_argument("--no-aux", action="store_true", help="train without the auxiliary patch loss")
    parser.add_argument("--spec", type=json.loads, default={},
                        help="JSON overrides of the model spec for experiments, e.g. '{\"hidden_size\": 96}' "
                             "(the shipped weights must use the default spec)")
    args = parser.parse_args(argv)
    spec = dataclasses.replace(SHAPES_SPEC, **args.spec)
    print(f"spec {spec}", flush=True)
    model, acc = train(steps=args.steps, batch_size=args.batch_size, lr=args.lr, warmup=args.warmup,
                       final_lr=args.final_lr, seed=args.seed, spec=spec, dev_items=args.dev_items,
                       eval_every=args.eval_every, threads=args.threads, aux=not args.no_aux,
                       aux_targets=args.aux_targets, init=args.init, log=lambda line: print(line, flush=True))
    params = sum(p.numel() for p in model.parameters())
    print(f"parameters {params}; final dev accuracy {acc.get('all', float('nan')):.3f}", flush=True)
    if args.out:
        if args.spec:
            print("note: --spec overrides given; these weights do not fit the shipped model", flush=True)
        size = save_weights(model, args.out)
        print(f"wrote {args.out} ({size / 1e6:.2f} MB)", flush=True)


if __name__ == "__main__":
    main()
