"""TensorRT optimization profiles, derived from the graph declarations and the plan.

One profile per phase per graph (TensorRT engines carry several; the runtime keeps one execution
context per profile):

==========  ===========  ==========================================  ===============================
graph       profile      ``sequence``                                ``cache_sequence``
==========  ===========  ==========================================  ===============================
segment j   prefill      2 .. max_seq_len - 1 - dropped_j            = ``sequence`` (exact-size buffer)
segment j   decode       1                                           2 .. max_seq_len - dropped_j
scoring j   prefill      entering_j + 1 .. max_seq_len - 1 - dropped_j   --
embed       prefill      2 .. max_seq_len - 1                        --
embed       decode       1                                           --
vision      prefill      --                                          --
==========  ===========  ==========================================  ===============================

``dropped_j`` is the number of image tokens the stages before segment j removed
(|V| - image tokens of segment j), which is why pruned segments have smaller maxima. A prompt
holds at most ``max_seq_len - 1`` tokens (one must remain for the answer). Prefill runs a segment
on buffers of exactly the prompt's length; decode on the slot cache's preallocated buffers of
``max_len_j = max_seq_len - dropped_j`` positions (:class:`himap_trt.runtime.kv_cache.SlotKVCache`;
``generate`` allocates prompt + new tokens, at most that). ``batch`` is 1 .. max_batch
everywhere. ``opt`` is a typical LLaVA request: |V| image tokens plus :data:`OPT_TEXT_TOKENS`.

**Engine profile forms** (:data:`PROFILE_FORMS`, ``build --profiles``): ``phase`` builds the table
above, one optimization profile per phase; ``shared`` merges a graph's phase profiles into one that
covers prefill and decode (:func:`shared_profile`: per input the smallest min, the largest max, the
prefill profile's opt). TensorRT-RTX 1.7 stores a copy of the weights per profile (an fp16
segment with two profiles is 1.8-2.0x its weights, with one 1.0x plus ~2 MB of kernel source; see
docs/ARCHITECTURE.md, "Engine size and build memory"), and specialises kernels for the shapes it
meets at run time, so one profile costs it no tuning. ``auto`` is ``shared`` for TensorRT-RTX and
``phase`` for TensorRT, whose tactics are chosen per profile at build time.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from himap_trt.errors import HimapError
from himap_trt.graphs.spec import GraphSpec, torch_dtype
from himap_trt.plan import PruningPlan

#: Text tokens (system + instruction) of the prompt the profiles are tuned for.
OPT_TEXT_TOKENS = 64
#: Generated tokens the decode profiles are tuned for.
OPT_NEW_TOKENS = 32


@dataclass(frozen=True)
class ShapeRange:
    """min / opt / max shape of one input."""

    min: tuple[int, ...]
    opt: tuple[int, ...]
    max: tuple[int, ...]


@dataclass(frozen=True)
class Profile:
    """One optimization profile: a shape range for every input of a graph."""

    name: str
    shapes: dict[str, ShapeRange]

    def covers(self, shapes: dict[str, tuple[int, ...]]) -> bool:
        """Whether every given input shape lies within this profile's ranges."""
        for name, shape in shapes.items():
            r = self.shapes.get(name)
            if r is None or len(shape) != len(r.min):
                return False
            if any(not lo <= s <= hi for s, lo, hi in zip(shape, r.min, r.max)):
                return False
        return True

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "shapes": {k: {"min": list(v.min), "opt": list(v.opt), "max": list(v.max)}
                                             for k, v in self.shapes.items()}}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Profile:
        return cls(data["name"], {k: ShapeRange(tuple(v["min"]), tuple(v["opt"]), tuple(v["max"]))
                                  for k, v in data["shapes"].items()})


def _profile(spec: GraphSpec, name: str, ranges: dict[str, tuple[int, int, int]]) -> Profile:
    """Evaluate every input's symbolic shape at the min, opt and max of the named sizes."""
    at = [{key: value[i] for key, value in ranges.items()} for i in range(3)]
    return Profile(name, {t.name: ShapeRange(t.concrete(at[0]), t.concrete(at[1]), t.concrete(at[2]))
                          for t in spec.inputs})


def graph_profiles(spec: GraphSpec, plan: PruningPlan, *, max_batch: int, max_seq_len: int,
                   opt_batch: int = 1) -> list[Profile]:
    """The optimization profiles of one graph (see the module table).

    Args:
        spec: the graph's declaration.
        plan: the plan of the export (keep counts set the pruned segments' maxima).
        max_batch: most prompts per batch.
        max_seq_len: most tokens (prompt + generated) per sequence.
        opt_batch: batch size to tune for.

    Raises:
        HimapError: if ``max_seq_len`` cannot hold the image tokens and one text token, or
            ``max_batch`` < 1.
    """
    n_img = plan.num_image_tokens
    if max_batch < 1:
        raise HimapError(f"--max-batch must be at least 1, got {max_batch}")
    if max_seq_len < n_img + 2:
        raise HimapError(f"--max-seq-len {max_seq_len} cannot hold the {n_img} image tokens, a text token "
                         "and an answer token")
    opt_batch = min(max(opt_batch, 1), max_batch)
    batch = (1, opt_batch, max_batch)
    longest = max_seq_len - 1
    opt_prompt = min(n_img + OPT_TEXT_TOKENS, longest)
    if _variable(spec):
        return _variable_profiles(spec, plan, batch, longest)
    if spec.kind == "vision":
        return [_profile(spec, "prefill", {"batch": batch})]
    if spec.kind == "embed":
        # prefill from 2 tokens, so a decode call (1 token) selects the decode profile (first match wins)
        return [_profile(spec, "prefill", {"batch": batch, "sequence": (2, opt_prompt, longest)}),
                _profile(spec, "decode", {"batch": batch, "sequence": (1, 1, 1)})]
    if spec.kind == "scoring":
        dropped = n_img - spec.attrs["entering"]
        top = longest - dropped
        low = spec.attrs["entering"] + 1
        return [_profile(spec, "prefill", {"batch": batch, "sequence": (low, max(low, opt_prompt - dropped), top)})]
    if spec.kind == "segment":
        dropped = n_img - spec.attrs["image_tokens"]
        top = longest - dropped
        prompt = opt_prompt - dropped
        cache = min(prompt + OPT_NEW_TOKENS, top + 1)
        return [
            # prefill from 2 tokens (a prompt holds |V| + 1 at least), so decode calls select the decode profile
            _profile(spec, "prefill", {"batch": batch, "sequence": (2, prompt, top), "cache_sequence": (2, prompt, top)}),
            _profile(spec, "decode", {"batch": batch, "sequence": (1, 1, 1), "cache_sequence": (2, cache, top + 1)}),
        ]
    raise HimapError(f"graph {spec.name!r}: no profiles for kind {spec.kind!r}")


#: The image a per-request-count model's profiles are tuned for (tokens; a 448x448 Qwen2.5-VL image).
OPT_IMAGE_TOKENS = 256


def _variable(spec: GraphSpec) -> bool:
    """Whether ``spec`` belongs to a model with per-request image-token counts (Qwen2.5-VL)."""
    return bool(spec.attrs.get("variable")) or (spec.kind == "vision" and "spatial_merge_size" in spec.attrs) or \
        (spec.kind == "segment" and spec.inputs[1].shape[0] == 3)


def _variable_profiles(spec: GraphSpec, plan: PruningPlan, batch: tuple[int, int, int], longest: int) -> list[Profile]:
    """Profiles where |V| varies per request, up to the export's bound ``plan.num_image_tokens``:
    the vision graph takes 1 .. max_batch images of up to |V| tokens (``num_patches`` = tokens x
    merge²); a scoring graph takes 1 .. E image slots and keeps 1 .. C; every segment's cache may hold
    the whole ``max_seq_len`` (a small image drops few tokens)."""
    n_img = plan.num_image_tokens
    opt_img = min(n_img, OPT_IMAGE_TOKENS)
    opt_prompt = min(opt_img + OPT_TEXT_TOKENS, longest)
    if spec.kind == "vision":
        return [_profile(spec, "prefill", _vision_ranges(spec, n_img, opt_img, batch))]
    if spec.kind == "embed":
        return [_profile(spec, "prefill", {"batch": batch, "sequence": (2, opt_prompt, longest)}),
                _profile(spec, "decode", {"batch": batch, "sequence": (1, 1, 1)})]
    if spec.kind == "scoring":
        entering, keep = spec.attrs["entering"], spec.attrs["keep"]     # at the bound |V| = n_img
        return [_profile(spec, "prefill", {
            "batch": batch, "sequence": (2, opt_prompt, longest),
            "image_slots": (1, max(1, round(opt_img * entering / n_img)), entering),
            "kept_slots": (1, max(1, round(opt_img * keep / n_img)), keep)})]
    cache = min(opt_prompt + OPT_NEW_TOKENS, longest + 1)
    return [_profile(spec, "prefill", {"batch": batch, "sequence": (2, opt_prompt, longest),
                                       "cache_sequence": (2, opt_prompt, longest)}),
            _profile(spec, "decode", {"batch": batch, "sequence": (1, 1, 1), "cache_sequence": (2, cache, longest + 1)})]


#: Most temporal patches (frames / 2) of one request's video the vision profile takes (256 frames).
MAX_TEMPORAL_PATCHES = 128


def _vision_ranges(spec: GraphSpec, n_img: int, opt_img: int, batch: tuple[int, int, int]) -> dict:
    """Named-size ranges of a Qwen vision graph: patches of 1 .. max_batch inputs of up to |V| tokens;
    attention blocks (docs/ARCHITECTURE.md, "Vision attention per frame and window"): frames 1 ..
    max_batch x min(|V|, :data:`MAX_TEMPORAL_PATCHES`) of up to |V| tokens' patches each; windows
    1 .. max_batch x |V| (a window holds at least one merged token). The attention scores at the
    maxima are frames x frame_len² (the frame sizes of one call add up to the patch count, which a
    profile cannot express), so keep ``--max-image-tokens`` to what the clips need."""
    area = spec.attrs["spatial_merge_size"] ** 2
    ranges = {"num_patches": (area, area * opt_img * batch[1], area * n_img * batch[2])}
    names = {d for t in spec.inputs for d in t.shape if isinstance(d, str)}
    if "num_frames" in names:
        ranges["num_frames"] = (1, batch[1], batch[2] * min(n_img, MAX_TEMPORAL_PATCHES))
        ranges["frame_len"] = (area, area * opt_img, area * n_img)
    if "num_windows" in names:
        window = next(t.shape[1] for t in spec.inputs if t.name == "window_blocks")
        ranges["num_windows"] = (1, max(1, area * opt_img * batch[1] // window), batch[2] * n_img)
    return ranges

#: ``build --profiles`` choices (``auto``: :func:`resolve_profile_form`).
PROFILE_FORMS = ("auto", "shared", "phase")


def resolve_profile_form(form: str, flavour_key: str) -> str:
    """``shared`` or ``phase`` for a ``--profiles`` value and a flavour key (``rtx`` / ``tensorrt``).

    Raises:
        HimapError: for a value outside :data:`PROFILE_FORMS`, naming ``--profiles``.
    """
    if form not in PROFILE_FORMS:
        raise HimapError(f"--profiles must be one of {', '.join(PROFILE_FORMS)}, got {form!r}")
    if form == "auto":
        return "shared" if flavour_key == "rtx" else "phase"
    return form


def shared_profile(profiles: list[Profile]) -> Profile:
    """One profile covering every given one: per input and dimension the smallest min and the largest
    max; the opt of the first (the prefill profile). A single profile is returned as it is.

    Raises:
        HimapError: if the profiles do not declare the same inputs with the same ranks.
    """
    if len(profiles) == 1:
        return profiles[0]
    first = profiles[0]
    shapes = {}
    for name, shape in first.shapes.items():
        ranges = [p.shapes.get(name) for p in profiles]
        if any(r is None or len(r.min) != len(shape.min) for r in ranges):
            raise HimapError(f"profiles {[p.name for p in profiles]} do not all declare input {name!r} with rank "
                             f"{len(shape.min)}")
        low = tuple(min(r.min[i] for r in ranges) for i in range(len(shape.min)))
        high = tuple(max(r.max[i] for r in ranges) for i in range(len(shape.max)))
        shapes[name] = ShapeRange(low, tuple(min(max(o, lo), hi) for o, lo, hi in zip(shape.opt, low, high)), high)
    return Profile("shared", shapes)


def engine_profiles(spec: GraphSpec, plan: PruningPlan, *, max_batch: int, max_seq_len: int, form: str = "phase",
                    opt_batch: int = 1) -> list[Profile]:
    """The optimization profiles an engine of ``spec`` is built with: :func:`graph_profiles` for
    ``form="phase"``, their :func:`shared_profile` for ``form="shared"`` (one profile).

    Raises:
        HimapError: see :func:`graph_profiles`; a form other than ``phase`` / ``shared``.
    """
    profiles = graph_profiles(spec, plan, max_batch=max_batch, max_seq_len=max_seq_len, opt_batch=opt_batch)
    if form == "phase":
        return profiles
    if form == "shared":
        return [shared_profile(profiles)]
    raise HimapError(f"profile form must be phase or shared, got {form!r}")


def kv_cache_bytes(specs: list[GraphSpec], batch: int, tokens_per_segment: list[int]) -> int:
    """Bytes of every segment's KV cache for ``batch`` sequences holding ``tokens_per_segment[j]``
    tokens in segment j (buffers of that many positions)."""
    total = 0
    for spec, tokens in zip([s for s in specs if s.kind == "segment"], tokens_per_segment):
        for tensor in (t for t in spec.inputs if t.name.startswith("past_key_values.")):
            size = tensor.concrete({"batch": batch, "cache_sequence": tokens})
            count = 1
            for dim in size:
                count *= dim
            total += count * torch_dtype(tensor.dtype).itemsize
    return total
