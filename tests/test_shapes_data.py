"""Synthetic shapes data, image reading (bad files, odd modes and sizes), caption manifests."""

import io
import json

import numpy as np
import pytest
from PIL import Image

from jasper_jax.data import images, shapes
from jasper_jax.data.caption_dataset import manifest_examples
from jasper_jax.errors import UserError


def test_examples_are_a_pure_function_of_seed_split_and_index():
    a = shapes.generate("train", 12, seed=3)
    b = shapes.generate("train", 6, seed=3)
    for x, y in zip(a[:6], b, strict=True):
        np.testing.assert_array_equal(x.image, y.image)
        assert x.caption == y.caption
    other = shapes.generate("train", 6, seed=4)
    assert [e.caption for e in other] != [e.caption for e in b]
    assert a[0].image.shape == (64, 64, 3) and a[0].image.dtype == np.uint8


def test_held_out_split_has_combinations_absent_from_train():
    def pairs(examples):
        return {(g.colour, g.shape) for e in examples for g in e.groups}

    train = shapes.generate("train", 400)
    held_out = shapes.generate("validation", 200)
    assert not pairs(train) & shapes.UNSEEN_PAIRS
    unseen = [e for e in held_out if e.unseen]
    assert 0.3 < len(unseen) / len(held_out) < 0.7
    assert pairs(unseen) - pairs(train)  # new combinations, named in their captions
    for e in unseen[:20]:
        g = next(g for g in e.groups if g.unseen)
        assert f"{g.colour} {g.shape}" in e.caption


def test_captions_name_every_group_and_vary_in_wording():
    examples = shapes.generate("train", 60)
    for e in examples:
        for g in e.groups:
            assert f"{g.size} {g.colour} {g.shape}" in e.caption
    openings = {e.caption.split(" ")[0] for e in examples}
    assert len(openings) >= 4  # several templates in use
    assert any(g.count > 1 for e in examples for g in e.groups)  # counts appear


def test_objects_are_drawn_in_their_cells_with_their_colour():
    rng = np.random.default_rng(0)
    group = shapes.Group("square", "blue", "large", (0,))  # top-left cell
    image = shapes.render((group,), 60, rng)
    blue = (image[..., 2] > 150) & (image[..., 0] < 100)
    ys, xs = np.nonzero(blue)
    assert blue.sum() > 50 and xs.max() < 25 and ys.max() < 25


def _encoded(image: Image.Image, fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


@pytest.mark.parametrize("mode", ["L", "RGBA", "P", "CMYK", "I;16"])
def test_other_modes_become_rgb(mode):
    image = Image.new(mode, (30, 20))
    pixels = images.load_pixels(_encoded(image, "TIFF" if mode == "CMYK" else "PNG"), 16)
    assert pixels.shape == (16, 16, 3) and pixels.dtype == np.float32


def test_transparent_pixels_become_white_and_values_are_normalised():
    image = Image.new("RGBA", (8, 8), (0, 0, 0, 0))
    pixels = images.load_pixels(_encoded(image), 8)
    np.testing.assert_allclose(pixels, 1.0)  # white -> (1 - 0.5) / 0.5
    black = images.load_pixels(_encoded(Image.new("RGB", (8, 8))), 8)
    np.testing.assert_allclose(black, -1.0)


def test_large_images_are_resized():
    pixels = images.load_pixels(_encoded(Image.new("RGB", (1500, 700), (255, 0, 0))), 32)
    assert pixels.shape == (32, 32, 3)
    np.testing.assert_allclose(pixels[..., 0], 1.0, atol=1e-6)


def test_bad_images_are_user_errors(tmp_path, monkeypatch):
    text_file = tmp_path / "notes.png"
    text_file.write_text("not an image")
    with pytest.raises(UserError, match="notes.png is not a readable image"):
        images.open_rgb(text_file)
    truncated = tmp_path / "cut.png"
    truncated.write_bytes(_encoded(Image.new("RGB", (64, 64), (1, 2, 3)))[:60])
    with pytest.raises(UserError, match="cut.png"):
        images.open_rgb(truncated)
    with pytest.raises(UserError, match="does not exist"):
        images.open_rgb(tmp_path / "missing.jpg")
    with pytest.raises(UserError, match="3x3 pixels, smaller than one 8x8 patch"):
        images.open_rgb(_encoded(Image.new("RGB", (3, 3))), min_side=8)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    with pytest.raises(UserError, match="too large"):
        images.open_rgb(_encoded(Image.new("RGB", (100, 100))))


def test_list_images_expands_folders_in_order(tmp_path):
    for name in ("b.png", "a.jpg", "readme.txt"):
        (tmp_path / name).write_bytes(b"")
    assert [p.name for p in images.list_images([tmp_path])] == ["a.jpg", "b.png"]
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="holds no images"):
        images.list_images([tmp_path / "empty"])
    with pytest.raises(UserError, match="does not exist"):
        images.list_images([tmp_path / "nope.png"])


def test_manifest_names_the_bad_line(tmp_path):
    Image.new("RGB", (16, 16)).save(tmp_path / "ok.png")
    (tmp_path / "bad.png").write_text("junk")
    rows = [{"image": "ok.png", "caption": "a black square"}, {"image": "bad.png", "caption": "x"}]
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("\n".join(json.dumps(r) for r in rows))
    with pytest.raises(UserError, match="m.jsonl line 2"):
        manifest_examples(manifest)
    manifest.write_text(json.dumps(rows[0]) + "\n" + '{"image": "ok.png"}\n')
    with pytest.raises(
        UserError, match="line 2: expected a JSON object with 'image' and 'caption'"
    ):
        manifest_examples(manifest)
    manifest.write_text(json.dumps(rows[0]) + "\n")
    (example,) = manifest_examples(manifest)
    assert example.caption == "a black square" and example.image.startswith(b"\x89PNG")
