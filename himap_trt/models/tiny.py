"""The built-in models: deterministic random-weight LLaVA checkpoints for tests, demos and benchmarks.

Each is written once to a cache directory as an ordinary Hugging Face model directory
(``config.json``, ``model.safetensors``, tokenizer, image processor, chat template) and loaded
back through the same code path as real checkpoints, so the loading code is exercised offline.

The weights are random: generated text is meaningless. Shapes (``tiny``):

- vision: CLIP, 96x96 px images, 8x8 px patches -> 12x12 = 144 image tokens, hidden 64, 3 layers
  (features from the second-to-last, as LLaVA-1.5).
- decoder: Llama, 12 layers, hidden 64, 4 heads of 16, FFN 176; ``tiny-gqa`` has 2 KV heads.
- ``medium`` (the benchmark model): CLIP 336 px / 14 px patches = 576 image tokens (LLaVA-1.5's
  count), vision hidden 64 x 3 layers (so the decoder dominates); Llama decoder hidden 512, 12
  layers, 8 heads, FFN 1408; initialised with std 0.02 (trained-model scale, finite activations at
  this width); ~40 M parameters, ~160 MB on disk.
- tokenizer: byte-level BPE without merges (one token per byte) plus ``<unk> <s> </s> <pad>
  <image>``; LLaVA-1.5 chat template (``USER: <image>\\n{question} ASSISTANT:``).
"""

from __future__ import annotations

import hashlib
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from himap_trt.errors import HimapError
from himap_trt.fsutil import cache_root  # noqa: F401  (re-exported: models.tiny.cache_root)
from himap_trt.models.loaded import LoadedModel

#: Bump when the recipe changes, so cached directories of an older recipe are not reused.
RECIPE_VERSION = 1

SPECIAL_TOKENS = ("<unk>", "<s>", "</s>", "<pad>", "<image>")
UNK_ID, BOS_ID, EOS_ID, PAD_ID, IMAGE_ID = range(len(SPECIAL_TOKENS))

#: Weight scale of the random init. Larger than a trained model's typical 0.02 so that attention
#: is peaked (pruning scores are well separated, no near-ties at the top-k cut-off) and greedy
#: logits have clear margins (token-for-token comparisons are not decided by rounding).
INIT_STD = 0.2

# LLaVA-1.5's conversation format, written for this project (the hub's llava-1.5 processors carry
# an equivalent template): "USER: <image>\n{question} ASSISTANT:".
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['role'] != 'system' -%}{{ message['role'] | upper }}: {% endif -%}"
    "{%- for item in message['content'] if item['type'] == 'image' -%}{{ '<image>\n' }}{%- endfor -%}"
    "{%- for item in message['content'] if item['type'] == 'text' -%}{{ item['text'] }} {% endfor -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}ASSISTANT:{%- endif -%}"
)


@dataclass(frozen=True)
class TinySpec:
    """Dimensions of a built-in tiny model."""

    name: str
    num_key_value_heads: int
    num_layers: int = 12
    hidden_size: int = 64
    num_heads: int = 4
    intermediate_size: int = 176
    image_size: int = 96
    patch_size: int = 8
    vision_hidden: int = 64
    vision_layers: int = 3
    seed: int = 0
    init_std: float = 0.2


TINY_MODELS: dict[str, TinySpec] = {
    "tiny": TinySpec("tiny", num_key_value_heads=4),
    "tiny-gqa": TinySpec("tiny-gqa", num_key_value_heads=2, seed=1),
    "medium": TinySpec("medium", num_key_value_heads=8, hidden_size=512, num_heads=8, intermediate_size=1408,
                       image_size=336, patch_size=14, seed=2, init_std=0.02),
}


def _tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for ch in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab[ch] = len(vocab)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", BOS_ID)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>",
        extra_special_tokens={"image_token": "<image>"}, padding_side="left",
    )


def _processor(spec: TinySpec, tokenizer):
    from transformers import LlavaProcessor
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": spec.image_size}, crop_size={"height": spec.image_size, "width": spec.image_size}
    )
    return LlavaProcessor(
        image_processor=image_processor, tokenizer=tokenizer, patch_size=spec.patch_size,
        vision_feature_select_strategy="default", chat_template=CHAT_TEMPLATE, num_additional_image_tokens=1,
    )


def _config(spec: TinySpec, vocab_size: int):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    vision = CLIPVisionConfig(
        hidden_size=spec.vision_hidden, intermediate_size=2 * spec.vision_hidden,
        num_hidden_layers=spec.vision_layers, num_attention_heads=4, image_size=spec.image_size,
        patch_size=spec.patch_size, projection_dim=spec.vision_hidden,
    )
    text = LlamaConfig(
        hidden_size=spec.hidden_size, intermediate_size=spec.intermediate_size, num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads, num_key_value_heads=spec.num_key_value_heads, vocab_size=vocab_size,
        max_position_embeddings=2048, bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID,
        initializer_range=spec.init_std,
    )
    n_image = (spec.image_size // spec.patch_size) ** 2
    return LlavaConfig(
        vision_config=vision, text_config=text, image_token_index=IMAGE_ID, image_seq_length=n_image,
        vision_feature_layer=-2, vision_feature_select_strategy="default",
    )


@torch.no_grad()
def _randomize(model: torch.nn.Module, seed: int, std: float = INIT_STD) -> None:
    """Deterministic init that does not depend on transformers' own init code: N(0, std) for
    weight matrices, embeddings and other non-norm parameters; ones / zeros for norm weights / biases."""
    gen = torch.Generator().manual_seed(seed)
    for name, param in sorted(model.named_parameters()):
        is_norm = any(key in name for key in ("norm", "layrnorm", "layer_norm"))
        if name.endswith("bias"):
            param.zero_()
        elif is_norm:
            param.fill_(1.0)
        else:
            param.copy_(torch.randn(param.shape, generator=gen) * std)


def tiny_model_dir(name: str) -> Path:
    """Return the directory of built-in model ``name``, writing it on first use.

    The directory is built in a temporary sibling and renamed into place, so an interrupted
    build never leaves a half-written model behind.

    Raises:
        KeyError: if ``name`` is not one of :data:`TINY_MODELS`.
    """
    spec = TINY_MODELS[name]

    def build(tmp: Path) -> None:
        from transformers import LlavaForConditionalGeneration

        tokenizer = _tokenizer()
        processor = _processor(spec, tokenizer)
        config = _config(spec, vocab_size=len(tokenizer))
        model = LlavaForConditionalGeneration(config)
        _randomize(model, spec.seed, spec.init_std)
        model.generation_config.pad_token_id = PAD_ID
        model.save_pretrained(tmp)
        processor.save_pretrained(tmp)

    return cached_model_dir(cache_root() / "models" / f"{name}-r{RECIPE_VERSION}", build)


def cached_model_dir(target: Path, build) -> Path:
    """A built-in model's Hugging Face directory in the cache, written once and atomically.

    Args:
        target: the directory (under :func:`cache_root`); returned as is when it already holds
            ``config.json`` and ``model.safetensors``.
        build: called with an empty sibling temporary directory to write the model into; the
            directory is renamed to ``target`` afterwards (if another process finished first, its
            copy is kept) and removed on any error, so no half-written model is ever left.

    Returns:
        ``target``.
    """
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        return target
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        build(tmp)
        try:
            tmp.rename(target)
        except OSError:  # another process finished first
            if not (target / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def trained_model_dir(name: str, weights: Path, new_model, save_processor, script: str) -> Path:
    """The cache directory of a trained built-in model (``shapes``, ``motion``), written from its
    shipped weights on first use: the untrained model from ``new_model()`` with ``weights`` loaded,
    saved with ``save_processor(directory)``'s files beside it. The directory name carries a hash of
    the weights file, so new weights get a new directory.

    Args:
        name: the model's name (``--model``); weights: its safetensors file in the package;
        new_model: builds the untrained model; save_processor: writes the processor files into a
        directory; script: the training script named in errors.

    Raises:
        HimapError: the weights file is missing from the installation or does not fit the model
            (a missing ``lm_head.weight`` is accepted only where the config ties it to the embeddings).
    """
    if not weights.is_file():
        raise HimapError(f"the trained weights of --model {name} are missing ({weights}); "
                         f"train them with {script}")
    digest = hashlib.blake2b(weights.read_bytes(), digest_size=8).hexdigest()

    def build(tmp: Path) -> None:
        from safetensors.torch import load_file

        model = new_model()
        missing, unexpected = model.load_state_dict(load_file(weights), strict=False)
        untied = [k for k in missing if k != "lm_head.weight" or not model.config.tie_word_embeddings]
        if unexpected or untied:
            raise HimapError(f"{weights} does not match the {name} model (missing {missing[:3]}, unexpected "
                             f"{unexpected[:3]}); retrain with {script}")
        model.eval().save_pretrained(tmp)
        save_processor(tmp)

    return cached_model_dir(cache_root() / "models" / f"{name}-{digest}", build)


def random_model(config, *, dtype: torch.dtype = torch.float32, device: str = "cpu"):
    """A random-weight model with any LLaVA config (e.g. LLaVA-1.5-7B's dimensions), with the
    built-in byte-level tokenizer and a processor sized to the config's vision tower. In memory
    only: for benchmarks, where weights do not matter but shapes do.

    transformers' own init (``initializer_range``) is used, so activations stay in range at any
    width. The config's image token id is set to the built-in tokenizer's ``<image>``.

    Returns:
        A :class:`himap_trt.models.LoadedModel`.
    """
    from transformers import LlavaForConditionalGeneration

    vision = config.vision_config
    spec = TinySpec("random", num_key_value_heads=config.text_config.num_key_value_heads,
                    image_size=vision.image_size, patch_size=vision.patch_size)
    tokenizer = _tokenizer()
    config.image_token_index = IMAGE_ID
    config.text_config.pad_token_id, config.text_config.eos_token_id = PAD_ID, EOS_ID
    with torch.device(device):
        model = LlavaForConditionalGeneration(config).to(dtype).eval()
    model.generation_config.pad_token_id = PAD_ID
    model.generation_config.eos_token_id = EOS_ID
    return LoadedModel(model=model, processor=_processor(spec, tokenizer), source="random", path="(in memory)")
