"""Write a random-weight LLaVA-1.5 checkpoint of 7B or 13B dimensions, shard by shard, for the
bounded-memory export benchmarks (docs/PERFORMANCE.md, "7B/13B exports").

The result is an ordinary Hugging Face model directory (``config.json``, ``generation_config.json``,
``model-0000k-of-0000n.safetensors`` + ``model.safetensors.index.json``, tokenizer, image processor,
chat template) that ``transformers`` loads with ``trust_remote_code=False`` and ``himap-trt export
--model DIR`` exports.

- Dimensions: LLaVA-1.5's published ones (``himap_trt.arch.llava_known``): CLIP ViT-L/14 at 336 px (576
  image tokens, 24 layers, hidden 1024), 2-layer GELU projector, Llama decoder 4096 hidden / 32 heads /
  FFN 11008 (``--size 7b``) or 5120 / 40 / 13824 (``--size 13b``), vocabulary 32064; ``--layers N``
  builds fewer decoder layers (default: 32 / 40).
- Weights: fp16 (``--dtype``), N(0, 0.02) for matrices and embeddings (transformers' own
  ``initializer_range``: the residual stream stays well inside fp16's range over 40 layers), ones for
  norm weights, zeros for biases. Each tensor has its own generator seeded from ``--seed`` and the
  tensor's name, so a tensor's values do not depend on the shard layout or on ``--layers``.
- Written tensor by tensor: every shard's safetensors header is computed from the shapes first, then
  each tensor is generated, written and dropped (peak memory: the largest tensor in fp32, ~0.5 GB).
- Processor: the offline one the built-in models use (``himap_trt.models.tiny``): byte-level BPE without
  merges (256 byte tokens + ``<unk> <s> </s> <pad> <image>``: 261 ids) and LLaVA-1.5's chat template;
  the embedding and lm_head keep the config's 32064 rows (as llava-hf's 32002-token tokenizer does
  with its padded 32064-row embedding): ids 261..32063 are never produced by the tokenizer. The image
  token is ``<image>`` (id 4), the pad token ``<pad>`` (id 3), EOS ``</s>`` (id 2).

Usage::

    python benchmarks/make_big_checkpoint.py --size 7b --out /tmp/big/llava-7b-32
    python benchmarks/make_big_checkpoint.py --size 7b --layers 8 --out /tmp/big/llava-7b-8
    python benchmarks/make_big_checkpoint.py --size 13b --layers 20 --out /tmp/big/llava-13b-20
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import shutil
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
try:
    import himap_trt  # noqa: F401 - installed, or on PYTHONPATH
except ImportError:        # run from the tree without an install (e.g. the GPU check): import it from here
    sys.path.insert(0, str(ROOT))

from himap_trt.arch.llava_known import known_config  # noqa: E402
from himap_trt.models.tiny import BOS_ID, EOS_ID, IMAGE_ID, PAD_ID, TinySpec, _processor, _tokenizer  # noqa: E402

SIZES = {"7b": "llava-1.5-7b", "13b": "llava-1.5-13b"}
DTYPES = {"fp16": (torch.float16, "F16"), "bf16": (torch.bfloat16, "BF16"), "fp32": (torch.float32, "F32")}
#: Shard size (bytes), as transformers' save_pretrained default.
SHARD_BYTES = 5 * 1024**3
INIT_STD = 0.02


def checkpoint_name(state_name: str) -> str:
    """The name transformers' ``save_pretrained`` writes for a model state_dict name (llava-hf layout)."""
    for new, old in (("model.language_model.", "language_model.model."), ("lm_head.", "language_model.lm_head."),
                     ("model.vision_tower.", "vision_tower."), ("model.multi_modal_projector.", "multi_modal_projector.")):
        if state_name.startswith(new):
            return old + state_name[len(new):]
    return state_name


def build_config(size: str, layers: int | None):
    config = known_config(SIZES[size])
    if layers is not None:
        config.text_config.num_hidden_layers = layers
    config.image_token_index = IMAGE_ID
    text = config.text_config
    text.bos_token_id, text.eos_token_id, text.pad_token_id = BOS_ID, EOS_ID, PAD_ID
    text.initializer_range = INIT_STD
    return config


def tensor_list(config) -> list[tuple[str, tuple[int, ...]]]:
    """(checkpoint name, shape) of every weight, in transformers' state_dict order (no weights allocated)."""
    from transformers import LlavaForConditionalGeneration

    with torch.device("meta"):
        model = LlavaForConditionalGeneration(config)
    return [(checkpoint_name(name), tuple(t.shape)) for name, t in model.state_dict().items()]


def make_tensor(name: str, shape: tuple[int, ...], seed: int, dtype: torch.dtype) -> torch.Tensor:
    """The deterministic random value of one weight (see the module docstring)."""
    leaf = name.rsplit(".", 1)[-1]
    is_norm = any(key in name for key in ("norm", "layrnorm", "layer_norm"))
    if leaf == "bias":
        return torch.zeros(shape, dtype=dtype)
    if is_norm:
        return torch.ones(shape, dtype=dtype)
    digest = hashlib.blake2b(f"{seed}:{name}".encode(), digest_size=8).digest()
    gen = torch.Generator().manual_seed(int.from_bytes(digest, "little") & (2**63 - 1))
    return (torch.randn(shape, generator=gen) * INIT_STD).to(dtype)


def plan_shards(tensors, itemsize: int, shard_bytes: int) -> list[list[tuple[str, tuple[int, ...]]]]:
    shards, current, size = [], [], 0
    for name, shape in tensors:
        nbytes = math.prod(shape) * itemsize
        if current and size + nbytes > shard_bytes:
            shards.append(current)
            current, size = [], 0
        current.append((name, shape))
        size += nbytes
    if current:
        shards.append(current)
    return shards


def write_shard(path: Path, tensors, seed: int, dtype: torch.dtype, tag: str, itemsize: int) -> int:
    """A safetensors file written tensor by tensor: the header (offsets from the shapes), then each
    tensor's little-endian bytes in header order. Returns the bytes of tensor data."""
    header, offset = {}, 0
    for name, shape in tensors:
        nbytes = math.prod(shape) * itemsize
        header[name] = {"dtype": tag, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    header["__metadata__"] = {"format": "pt"}
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)       # the data starts 8-byte aligned
    with open(path, "wb") as f:
        f.write(len(raw).to_bytes(8, "little"))
        f.write(raw)
        for name, shape in tensors:
            tensor = make_tensor(name, shape, seed, dtype)
            f.write(tensor.contiguous().view(torch.uint8).numpy().data)   # no bytes copy
            del tensor
    return offset


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--size", choices=sorted(SIZES), default="7b", help="LLaVA-1.5 dimensions")
    parser.add_argument("--layers", type=int, default=None,
                        help="decoder layers (default: the published model's, 32 for 7b, 40 for 13b)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp16", help="stored weight dtype")
    parser.add_argument("--seed", type=int, default=0, help="weights seed")
    parser.add_argument("--shard-gb", type=float, default=SHARD_BYTES / 1024**3, help="max shard size (GiB)")
    parser.add_argument("--out", type=Path, required=True, help="checkpoint directory to create (must not exist)")
    args = parser.parse_args(argv)
    if args.out.exists():
        print(f"--out {args.out} exists; remove it first", file=sys.stderr)
        return 2
    if args.layers is not None and args.layers < 1:
        print(f"--layers must be >= 1, got {args.layers}", file=sys.stderr)
        return 2
    from transformers import GenerationConfig

    dtype, tag = DTYPES[args.dtype]
    itemsize = torch.empty((), dtype=dtype).element_size()
    config = build_config(args.size, args.layers)
    config.dtype = args.dtype.replace("fp", "float").replace("bf16", "bfloat16")
    tensors = tensor_list(config)
    shards = plan_shards(tensors, itemsize, int(args.shard_gb * 1024**3))
    tmp = args.out.with_name(f".{args.out.name}.partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    start = time.perf_counter()
    weight_map, total = {}, 0
    for k, shard in enumerate(shards, 1):
        name = f"model-{k:05d}-of-{len(shards):05d}.safetensors" if len(shards) > 1 else "model.safetensors"
        total += write_shard(tmp / name, shard, args.seed, dtype, tag, itemsize)
        weight_map.update({tensor: name for tensor, _ in shard})
        print(f"  {name}: {len(shard)} tensors, {total / 1e9:.2f} GB so far, {time.perf_counter() - start:.0f} s",
              file=sys.stderr)
    if len(shards) > 1:
        (tmp / "model.safetensors.index.json").write_text(json.dumps(
            {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2) + "\n")
    config.save_pretrained(tmp)
    GenerationConfig(bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID).save_pretrained(tmp)
    vision = config.vision_config
    spec = TinySpec("big", num_key_value_heads=config.text_config.num_key_value_heads,
                    image_size=vision.image_size, patch_size=vision.patch_size)
    _processor(spec, _tokenizer()).save_pretrained(tmp)
    tmp.rename(args.out)
    print(f"wrote {args.out}: {args.size} dims, {config.text_config.num_hidden_layers} decoder layers, "
          f"{len(tensors)} tensors, {total / 1e9:.2f} GB {args.dtype} in {len(shards)} shard(s), "
          f"{time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
