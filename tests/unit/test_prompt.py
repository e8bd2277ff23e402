import pytest
import torch
from PIL import Image

from himap_trt.errors import HimapError
from himap_trt.prompt import (TOKEN_IMAGE, TOKEN_INSTRUCTION, TOKEN_PAD, TOKEN_SYSTEM, load_image,
                              position_ids_from_mask, token_type_ids)


def test_spans_found_from_input_ids_not_offsets():
    IMG = 9
    ids = torch.tensor([[0, 0, 5, 6, IMG, IMG, IMG, 7, 8],
                        [5, 6, 6, 6, IMG, IMG, IMG, 7, 8],
                        [0, 5, IMG, IMG, IMG, 7, 7, 7, 8]])
    mask = (ids != 0).long()
    mask[1, 0] = 1
    types = token_type_ids(ids, mask, IMG, 3)
    S, I, V, P = TOKEN_SYSTEM, TOKEN_INSTRUCTION, TOKEN_IMAGE, TOKEN_PAD
    assert types.tolist() == [[P, P, S, S, V, V, V, I, I], [S, S, S, S, V, V, V, I, I], [P, S, V, V, V, I, I, I, I]]


def test_wrong_image_token_count_is_rejected():
    ids = torch.tensor([[5, 9, 9, 7, 9]])
    with pytest.raises(HimapError, match="3 image tokens"):
        token_type_ids(ids, torch.ones_like(ids), 9, 3)
    with pytest.raises(HimapError, match="expects one contiguous span of 4"):
        token_type_ids(ids, torch.ones_like(ids), 9, 4)


def test_position_ids_like_generate():
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    assert position_ids_from_mask(mask).tolist() == [[1, 1, 0, 1, 2], [0, 1, 2, 3, 4]]


def test_image_errors(tmp_path, photo_path):
    with pytest.raises(HimapError, match="does not exist"):
        load_image(tmp_path / "missing.jpg")
    text = tmp_path / "notes.jpg"
    text.write_text("not an image")
    with pytest.raises(HimapError, match="not an image"):
        load_image(text)
    truncated = tmp_path / "truncated.jpg"
    truncated.write_bytes(photo_path.read_bytes()[:5000])
    with pytest.raises(HimapError, match="truncated or corrupt"):
        load_image(truncated)


@pytest.mark.parametrize("mode,size", [("RGBA", (40, 30)), ("L", (64, 64)), ("RGB", (1, 1)), ("RGB", (4000, 3000)),
                                       ("P", (50, 20))])
def test_image_modes_and_sizes_load(tmp_path, mode, size):
    path = tmp_path / f"img-{mode}.png"
    Image.new(mode, size).save(path)
    image = load_image(path)
    assert image.size == size and image.mode == mode
