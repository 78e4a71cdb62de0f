"""Stage 4 end to end on tiny models: only the vision tower moves, the text side stays
bit-identical, caption datasets, the image pipeline, and `encode --images` / `captions`."""

import io
import json

import flax.linen as nn
import jax
import numpy as np
import pytest
from flax import traverse_util
from PIL import Image

from jasper_jax.cli import main
from jasper_jax.config import load_settings
from jasper_jax.data.caption_dataset import (
    build_caption_dataset,
    load_caption_eval,
    open_caption_dataset,
    shapes_examples,
)
from jasper_jax.data.image_pipeline import make_image_pipeline, target_key
from jasper_jax.demo.vision import text_scores_before
from jasper_jax.encode import TextEncoder
from jasper_jax.encode_images import ImageEncoder
from jasper_jax.errors import UserError
from jasper_jax.run_folder import load_any_model, load_image_model, load_params
from jasper_jax.train.loop import train_and_evaluate
from jasper_jax.train.task import make_task
from tests.train_fixtures import tiny_settings, tiny_setup  # noqa: F401

HEADS = ("dense_384", "dense_32", "dense_16")


def _flat(params) -> dict:
    return {"/".join(k): np.asarray(v) for k, v in traverse_util.flatten_dict(params).items()}


def stage4_settings(setup, stage3, data, **overrides):
    fields = {
        "init_from": stage3,
        "model.heads": (384, 32, 16),
        "model.image_tokens": 6,
        "model.vision.image_size": 16,
        "model.vision.patch_size": 4,
        "model.vision.hidden_size": 32,
        "model.vision.intermediate_size": 64,
        "model.vision.num_hidden_layers": 2,
        "model.vision.num_attention_heads": 4,
        "data.train_dir": data["train"],
        "data.eval_dir": data["validation"],
        "data.text_eval_dir": setup["validation"],
        "data.batch_size": 8,
        "data.eval_texts": 64,
        "data.eval_images": 100,
        "train.steps": 3,
        "train.log_every": 1,
        "train.checkpoint_every": 100,
        "mesh_shape": (1, 1, 1),
        **overrides,
    }
    return load_settings("configs/embedded_default.py:4", fields)


@pytest.fixture(scope="module")
def stage3(tiny_setup, tmp_path_factory):  # noqa: F811
    workdir = tmp_path_factory.mktemp("vision") / "s3"
    train_and_evaluate(tiny_settings(tiny_setup, 3, **{"train.steps": 1}), workdir)
    return workdir


@pytest.fixture(scope="module")
def image_data(stage3, tmp_path_factory):
    root = tmp_path_factory.mktemp("images")
    out = {}
    for split, count in (("train", 32), ("validation", 100)):
        out[split] = root / split
        examples = shapes_examples(split, count, image_size=16)
        build_caption_dataset(examples, stage3, out[split], progress=False)
    return out


@pytest.fixture(scope="module")
def stage4(tiny_setup, stage3, image_data, tmp_path_factory):  # noqa: F811
    workdir = tmp_path_factory.mktemp("vision") / "s4"
    c = stage4_settings(tiny_setup, stage3, image_data)
    result = train_and_evaluate(c, workdir)
    return {"config": c, "workdir": workdir, "result": result}


def test_caption_dataset_holds_the_students_vectors(stage3, image_data):
    data = load_caption_eval(image_data["validation"], limit=10)
    model = load_any_model(stage3)
    want = TextEncoder(model).encode_heads(data["captions"], heads=HEADS)
    for head in HEADS:
        np.testing.assert_allclose(data["targets"][head], want[head], atol=1e-6)
    assert set(data["tags"]) <= {"seen", "unseen"}
    assert data["images"][0].startswith(b"\x89PNG")


def test_image_pipeline_batches_and_resumes(image_data):
    def pipeline():
        return make_image_pipeline(
            image_data["train"], batch_size=8, image_size=16, image_tokens=6, heads=HEADS, seed=1
        )

    it = pipeline()
    first = next(it)
    assert first["pixels"].shape == (8, 16, 16, 3) and first["attention_mask"].shape == (8, 6)
    assert -1.0 <= first["pixels"].min() < first["pixels"].max() <= 1.0
    np.testing.assert_allclose(np.linalg.norm(first[target_key("dense_32")], axis=1), 1, 1e-5)
    state = it.get_state()
    expected = next(it)
    resumed = pipeline()
    resumed.set_state(state)
    np.testing.assert_array_equal(next(resumed)["index"], expected["index"])
    with pytest.raises(UserError, match="no caption vectors for heads"):
        make_image_pipeline(
            image_data["train"], batch_size=8, image_size=16, image_tokens=6, heads=("x",), seed=1
        )


def test_stage4_moves_only_the_vision_tower(stage3, stage4):
    assert stage4["result"]["status"] == "finished"
    before = _flat(load_params(stage3)[0])
    after = _flat(load_params(stage4["workdir"])[0])
    text = {k for k in after if not k.startswith("vision/")}
    assert text == set(before)
    for key in text:
        np.testing.assert_array_equal(after[key], before[key], err_msg=key)
    vision = [k for k in after if k.startswith("vision/")]
    assert len(vision) > 20
    # from random init, every tower tensor got a gradient; compare with a fresh init
    task = make_task(stage4["config"])
    fresh = _flat(nn.meta.unbox(task.init(jax.random.key(stage4["config"].seed))))
    moved = [k for k in vision if not np.array_equal(after[k], fresh[k])]
    assert len(moved) == len(vision), sorted(set(vision) - set(moved))


def test_text_side_scores_do_not_move(stage4):
    scores = stage4["result"]["eval"]
    before = text_scores_before(stage4["config"])
    assert set(before) == {f"text/{h}" for h in HEADS}
    for key, metrics in before.items():
        for name, value in metrics.items():
            assert scores[key][name] == pytest.approx(value, abs=1e-4), (key, name)
    for head in HEADS:
        assert scores[f"image_to_caption/{head}"]["caption_min_cosine_to_stage3"] > 1 - 1e-5


def _recount(images: np.ndarray, captions: np.ndarray, texts: np.ndarray) -> np.ndarray:
    """bool [N]: each image's nearest caption (dot product, all N candidates) has its text."""
    return texts[np.argmax(images @ captions.T, axis=1)] == texts


def test_image_to_caption_recall_is_a_recount_from_the_saved_model(stage4, image_data):
    """The reported recall@1 (overall and per tag) equals a NumPy recount from the saved
    tower's image vectors against the stored stage-3 caption vectors; the 100 held-out images
    form one group of 100 candidates, so chance is 1/100."""
    scores = stage4["result"]["eval"]
    data = load_caption_eval(image_data["validation"])
    assert len(data["captions"]) == 100
    texts, tags = np.array(data["captions"]), np.array(data["tags"])
    model = load_image_model(stage4["workdir"])
    images = ImageEncoder(model.config, model.params).encode_heads(data["images"], heads=HEADS)
    for head in HEADS:
        image, captions = scores[f"image_to_caption/{head}"], data["targets"][head]
        assert _recount(captions, captions, texts).all()  # the recount's own known answer
        hits = _recount(images[head], captions, texts)
        assert image["recall_at_1"] == pytest.approx(hits.mean(), abs=1e-9), head
        assert image["chance"] == pytest.approx(1 / len(texts))
        for tag in ("seen", "unseen"):
            want = hits[tags == tag].mean()
            assert image[f"recall_at_1_{tag}"] == pytest.approx(want, abs=1e-9), (head, tag)


def test_model_json_loads_as_text_and_image_model(stage3, stage4):
    workdir = stage4["workdir"]
    meta = json.loads((workdir / "model.json").read_text())
    assert meta["stage"] == 4 and meta["image_tokens"] == 6 and "vision" in meta
    texts = ["a red circle", "two blue squares"]
    text_now = TextEncoder(load_any_model(workdir)).encode(texts)
    text_then = TextEncoder(load_any_model(stage3)).encode(texts)
    np.testing.assert_array_equal(text_now, text_then)
    model = load_image_model(workdir)
    assert model.config.vision.image_size == 16 and set(model.params) == {
        "vision",
        "encoder",
        "heads",
    }


def test_encode_images_cli(stage3, stage4, tmp_path, capsys):
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i, e in enumerate(shapes_examples("validation", 3, image_size=40)):
        Image.open(io.BytesIO(e.image)).save(folder / f"{i}.png")
    Image.new("LA", (50, 30)).save(folder / "3_gray_alpha.png")  # converted, not refused
    out = tmp_path / "v.npy"
    args = ["encode", "--model", str(stage4["workdir"]), "--images", str(folder)]
    assert main([*args, "--output", str(out), "--head", "32"]) == 0
    vectors = np.load(out)
    assert vectors.shape == (4, 32)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1, atol=1e-5)
    model = load_image_model(stage4["workdir"])
    paths = sorted(folder.iterdir())
    want = ImageEncoder(model.config, model.params).encode(paths, head="dense_32")
    np.testing.assert_allclose(vectors, want, atol=1e-6)
    assert out.with_name("v.npy.paths.txt").read_text().split() == [str(p) for p in paths]

    (folder / "broken.png").write_text("junk")
    assert main([*args, "--output", str(tmp_path / "w.npy")]) == 2
    assert "broken.png is not a readable image" in capsys.readouterr().err
    assert not (tmp_path / "w.npy").exists()
    text_model = ["encode", "--model", str(stage3), "--images", str(paths[0])]
    assert main([*text_model, "--output", str(tmp_path / "x.npy")]) == 2
    assert "no 'vision'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([*args, "--input", "t.txt", "--output", str(tmp_path / "y.npy")])


def test_captions_cli_builds_and_keeps_a_dataset(stage3, tmp_path, capsys):
    out = tmp_path / "caps"
    args = ["captions", "--student", str(stage3), "--shapes", "8", "--image-size", "16"]
    assert main([*args, "--output", str(out)]) == 0
    source, meta = open_caption_dataset(out)
    assert len(source) == 8 and meta["heads"] == {"dense_384": 384, "dense_32": 32, "dense_16": 16}
    stamp = (out / "dataset" / "dataset_info.json").stat().st_mtime_ns
    assert main([*args, "--output", str(out)]) == 0  # same data: kept
    assert (out / "dataset" / "dataset_info.json").stat().st_mtime_ns == stamp
    assert main([*args[:-3], "9", "--output", str(out)]) == 2  # other data: refused
    assert "--overwrite" in capsys.readouterr().err


def test_stage4_config_errors(tiny_setup, image_data):  # noqa: F811
    with pytest.raises(UserError, match="config field init_from"):
        stage4_settings(tiny_setup, "", image_data)
    with pytest.raises(UserError, match="model.vision.num_attention_heads"):
        stage4_settings(tiny_setup, "x", image_data, **{"model.vision.num_attention_heads": 5})
