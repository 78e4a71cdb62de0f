"""`jasper-jax export`: the folder loads in sentence-transformers and transformers, encodes like
our JAX code for every head, re-imports to identical parameters; bad input is refused cleanly."""

import io
import json
import os
import shutil
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import traverse_util

from jasper_jax import run_folder
from jasper_jax.cli import main
from jasper_jax.config import to_settings
from jasper_jax.encode import TextEncoder
from jasper_jax.errors import UserError
from jasper_jax.export import export_workdir, set_default_head
from jasper_jax.export.model_card import hub_name
from jasper_jax.models.loading import load_model
from jasper_jax.run_folder import is_workdir, load_workdir_model
from tests.text_samples import varied_texts
from tests.train_fixtures import tiny_config, tiny_setup  # noqa: F401


@pytest.fixture(scope="module")
def workdir(tiny_setup, tmp_path_factory) -> Path:  # noqa: F811
    """A tiny stage-3 run (heads 384, 32, 16; 2 steps) with a query and a document prompt,
    shared by the export and evaluation tests of one session (trained once)."""
    from jasper_jax.train.loop import train_and_evaluate

    path = tmp_path_factory.getbasetemp() / "export_stage3" / "stage3"
    if not is_workdir(path):
        prompts = {"data.query_prompt": "query: ", "data.document_prompt": "passage: "}
        c = tiny_config(tiny_setup, 3, **{"train.steps": 2, **prompts})
        train_and_evaluate(to_settings(c), path)
    return path


@pytest.fixture(scope="module")
def exported(workdir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("exported") / "out"
    export_workdir(workdir, out)
    return out


@pytest.fixture(scope="module")
def texts() -> list[str]:
    return varied_texts(300)


def _flat(tree) -> dict:
    return {"/".join(k): np.asarray(v) for k, v in traverse_util.flatten_dict(tree).items()}


def test_folder_layout_is_sentence_transformers_with_safetensors_only(exported):
    names = {p.relative_to(exported).as_posix() for p in exported.rglob("*") if p.is_file()}
    assert {"config.json", "model.safetensors", "modules.json", "1_Pooling/config.json"} <= names
    assert {f"2_Dense_{d}/model.safetensors" for d in (384, 32, 16)} <= names
    assert {
        "tokenizer.json",
        "vocab.txt",
        "README.md",
        "config_sentence_transformers.json",
    } <= names
    assert not [n for n in names if n.endswith((".bin", ".pkl", ".pt", ".pth", ".ckpt"))]
    modules = json.loads((exported / "modules.json").read_text())
    # The embedded default's heads read the unit pooled vector: Normalize before the Dense.
    assert [m["type"].rsplit(".", 1)[1] for m in modules] == [
        "Transformer",
        "Pooling",
        "Normalize",
        "Dense",
        "Normalize",
    ]
    assert modules[3]["path"] == "2_Dense_384"  # the full teacher-dim head by default
    st_config = json.loads((exported / "config_sentence_transformers.json").read_text())
    assert st_config["prompts"] == {"query": "query: ", "document": "passage: "}
    assert st_config["default_prompt_name"] == "document"  # plain encode() is for corpora
    leftovers = [p.name for p in exported.parent.iterdir() if p.name.startswith(".out.")]
    assert leftovers == []


def test_reimport_gives_identical_parameters(workdir, exported):
    ours, meta = load_workdir_model(workdir)
    back = load_model(exported)
    a, b = _flat(ours.params), _flat(back.params)
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)
    assert back.config.heads == (16, 32, 384) or set(back.config.heads) == {384, 32, 16}
    assert back.config.default_head == "dense_384"
    assert back.config.pooling == ours.config.pooling
    assert back.max_seq_length == meta["max_seq_length"]
    assert back.prompts == {"query": "query: ", "document": "passage: "}


def test_set_default_head_takes_a_dim_as_the_readme_shows(exported, tmp_path):
    folder = Path(shutil.copytree(exported, tmp_path / "view"))
    set_default_head(folder, 32)  # README: jasper_jax.export.set_default_head(folder, 256)
    assert load_model(folder).config.default_head == "dense_32"
    with pytest.raises(UserError, match="no head 'dense_7'"):
        set_default_head(folder, "7")


def test_automodel_loads_with_no_missing_or_unexpected_weights(exported):
    import transformers

    model, info = transformers.AutoModel.from_pretrained(str(exported), output_loading_info=True)
    assert isinstance(model, transformers.BertModel)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert not info["mismatched_keys"]


@pytest.mark.parametrize("head", ["dense_384", "dense_32", "dense_16", "pooled"])
def test_sentence_transformers_matches_jax_for_every_head(workdir, exported, texts, tmp_path, head):
    from sentence_transformers import SentenceTransformer

    folder = tmp_path / "view"
    shutil.copytree(exported, folder)
    set_default_head(folder, head)
    st = SentenceTransformer(str(folder), device="cpu", local_files_only=True)
    # Plain encode() applies the default prompt: the document one.
    ref = st.encode(texts, normalize_embeddings=True, batch_size=64)
    encoder = TextEncoder(load_workdir_model(workdir)[0])
    ours = encoder.encode(texts, head=head, prompt="passage: ")
    assert ours.shape == ref.shape
    cos = np.sum(ours * ref, axis=1)
    assert cos.min() >= 0.9999, (head, int(cos.argmin()), float(cos.min()))
    # The query prompt travels with the folder: prompt_name="query" == our prompt="query: ".
    q_ref = st.encode(texts[:40], prompt_name="query", normalize_embeddings=True)
    q_ours = encoder.encode(texts[:40], head=head, prompt="query: ")
    assert np.sum(q_ours * q_ref, axis=1).min() >= 0.9999


def test_encode_query_and_document_equal_the_cli_with_the_trained_prompts(
    exported, texts, tmp_path, capsys
):
    """sentence-transformers' encode_query / encode_document on the exported folder ==
    `jasper-jax encode --prompt <trained prompt>` == `--role query|document`."""
    from sentence_transformers import SentenceTransformer

    st = SentenceTransformer(str(exported), device="cpu", local_files_only=True)
    path = tmp_path / "texts.txt"
    path.write_text("\n".join(texts[:50]) + "\n", encoding="utf-8")
    for role, prompt, reference in (
        ("query", "query: ", st.encode_query(texts[:50], normalize_embeddings=True)),
        ("document", "passage: ", st.encode_document(texts[:50], normalize_embeddings=True)),
    ):
        for how in (["--prompt", prompt], ["--role", role]):
            out = tmp_path / f"{role}-{how[0][2:]}.npy"
            argv = ["encode", "--model", str(exported), "--input", str(path), "--output", str(out)]
            assert main([*argv, *how]) == 0
            assert np.sum(np.load(out) * reference, axis=1).min() >= 0.9999, (role, how)
    plain = tmp_path / "plain.npy"  # no prompt flag: the default (document) prompt, as ST
    assert (
        main(["encode", "--model", str(exported), "--input", str(path), "--output", str(plain)])
        == 0
    )
    np.testing.assert_allclose(np.load(plain), np.load(tmp_path / "document-role.npy"), atol=1e-6)
    argv = ["encode", "--model", str(exported), "--input", str(path), "--output", str(plain)]
    assert main([*argv, "--prompt", "x", "--role", "query"]) == 2
    assert "give one of them" in capsys.readouterr().err


def test_cli_export_default_head_and_model_card(workdir, tmp_path, capsys):
    out = tmp_path / "cli_out"
    argv = ["export", "--workdir", str(workdir), "--output", str(out), "--default-head", "32"]
    assert main(argv) == 0
    assert "2_Dense_384" in capsys.readouterr().out
    assert load_model(out).config.default_head == "dense_32"
    card = (out / "README.md").read_text()
    assert "base_model: student" in card  # the tiny student's folder name
    assert "stage 3" in card and "all-MiniLM-L6-v2 (384-d)" in card
    assert "## Evaluation" not in card  # no eval.json in the workdir yet


def test_model_card_names_bundled_base_models():
    from jasper_jax.data.teacher_assets import teacher_folder

    assert hub_name(str(teacher_folder("all-MiniLM-L6-v2"))) == (
        "sentence-transformers/all-MiniLM-L6-v2"
    )
    assert hub_name("/x/teachers/all-mpnet-base-v2") == "sentence-transformers/all-mpnet-base-v2"
    assert hub_name("/models/my-bert") == "my-bert"


def _tree_digest(folder: Path) -> dict[str, bytes]:
    return {
        p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()
    }


def _run(argv, capsys) -> tuple[int, str]:
    code = main(argv)
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return code, err


def test_bad_inputs_are_refused_and_nothing_is_half_written(workdir, tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"
    empty = tmp_path / "empty"
    empty.mkdir()
    code, err = _run(["export", "--workdir", str(empty), "--output", str(out)], capsys)
    assert code == 2 and "model.json" in err and not out.exists()

    no_ckpt = tmp_path / "no_ckpt"
    no_ckpt.mkdir()
    shutil.copy(workdir / "model.json", no_ckpt / "model.json")
    code, err = _run(["export", "--workdir", str(no_ckpt), "--output", str(out)], capsys)
    assert code == 2 and "checkpoints" in err and not out.exists()

    out.mkdir()
    (out / "keep.txt").write_text("mine")
    code, err = _run(["export", "--workdir", str(workdir), "--output", str(out)], capsys)
    assert code == 2 and "--overwrite" in err
    assert _tree_digest(out) == {"keep.txt": b"mine"}

    code, err = _run(
        ["export", "--workdir", str(workdir), "--output", str(out), "--default-head", "7"], capsys
    )
    assert code == 2 and _tree_digest(out) == {"keep.txt": b"mine"}

    # --overwrite never replaces a folder jasper-jax did not write.
    with pytest.raises(UserError, match="not a jasper-jax export"):
        export_workdir(workdir, out, overwrite=True)
    assert _tree_digest(out) == {"keep.txt": b"mine"}
    shutil.rmtree(out)
    assert main(["export", "--workdir", str(workdir), "--output", str(out)]) == 0
    first = _tree_digest(out)

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("jasper_jax.export.st_folder.write_heads", broken)
    with pytest.raises(OSError, match="disk full"):
        export_workdir(workdir, out, overwrite=True)
    assert _tree_digest(out) == first  # the previous export untouched
    assert sorted(os.listdir(tmp_path)) == ["empty", "no_ckpt", "out"]  # no temp folders left
    monkeypatch.undo()

    assert main(["export", "--workdir", str(workdir), "--output", str(out), "--overwrite"]) == 0
    assert (out / "model.safetensors").is_file()
    assert sorted(os.listdir(tmp_path)) == ["empty", "no_ckpt", "out"]


def test_vision_tower_exports_as_siglip_vision_model(workdir, tmp_path, monkeypatch):
    """A stage-4 checkpoint (params with "vision") gets vision/ that transformers loads and that
    computes what our tower computes."""
    import torch
    import transformers

    from jasper_jax.models.siglip import SiglipVisionConfig, SiglipVisionTower

    cfg = SiglipVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=28,
        patch_size=7,
    )
    pixels = np.random.default_rng(0).standard_normal((2, 28, 28, 3)).astype(np.float32)
    tower = SiglipVisionTower(cfg)
    vision = jax.device_get(
        jax.tree.map(lambda x: x * 5.0, tower.init(jax.random.key(3), pixels)["params"])
    )
    real_load = run_folder.load_params
    meta = json.loads((workdir / "model.json").read_text())
    meta.update(vision=cfg.to_hf_dict(), image_tokens=9)  # what stage 4 records
    staged = tmp_path / "stage4"
    shutil.copytree(workdir, staged)
    (staged / "model.json").write_text(json.dumps(meta))

    def with_vision(path, step=None):
        params, step = real_load(path, step)
        return {**params, "vision": vision}, step

    monkeypatch.setattr(run_folder, "load_params", with_vision)
    out = tmp_path / "out"
    summary = export_workdir(staged, out)
    assert summary["vision"]
    assert json.loads((out / "vision" / "jasper_bridge.json").read_text())["image_tokens"] == 9
    assert "SiglipVisionModel.from_pretrained" in (out / "README.md").read_text()

    model, info = transformers.SiglipVisionModel.from_pretrained(
        str(out / "vision"), output_loading_info=True
    )
    assert not info["missing_keys"] and not info["unexpected_keys"]
    with torch.no_grad():
        ref = model.eval()(pixel_values=torch.from_numpy(pixels.transpose(0, 3, 1, 2)))
    ours = tower.apply({"params": vision}, pixels)
    np.testing.assert_allclose(
        np.asarray(ours.last_hidden_state), ref.last_hidden_state.numpy(), atol=1e-4
    )
    # The text part of the same export is unchanged by the tower.
    assert load_model(out).config.heads
    _check_vision_folder_without_jasper(out, tower, vision)


def _check_vision_folder_without_jasper(out: Path, tower, vision) -> None:
    """OUT/vision/ alone (transformers + torch) turns an image into our pooled image tokens:
    its preprocessor config is our training preprocessing, its bridge file says how to pool."""
    import torch
    import transformers
    from PIL import Image

    from jasper_jax.data.images import open_rgb, to_pixels
    from jasper_jax.models.adaptive_pool import adaptive_avg_pool_2d

    assert not (out / "jasper_bridge.json").exists()  # one place: beside the tower
    bridge = json.loads((out / "vision" / "jasper_bridge.json").read_text())
    width = json.loads((out / "config.json").read_text())["hidden_size"]
    # Not square, not 28 px (the resize matters), half transparent (training composites over
    # white, as transformers' RGB conversion does).
    rgba = np.random.default_rng(1).integers(0, 256, (51, 37, 4), dtype=np.uint8)
    png = io.BytesIO()
    Image.fromarray(rgba, "RGBA").save(png, "PNG")
    processor = transformers.SiglipImageProcessor.from_pretrained(str(out / "vision"))
    theirs = processor(images=Image.open(png), return_tensors="pt")["pixel_values"]
    ours_pixels = to_pixels(open_rgb(png.getvalue()), 28)[None]  # what training feeds the tower
    np.testing.assert_allclose(theirs.numpy().transpose(0, 2, 3, 1), ours_pixels, atol=1e-5)

    model = transformers.SiglipVisionModel.from_pretrained(str(out / "vision")).eval()
    pool = torch.nn.AdaptiveAvgPool2d((bridge["image_tokens"], width))
    with torch.no_grad():
        their_tokens = pool(model(pixel_values=theirs).last_hidden_state).numpy()
    patches = tower.apply({"params": vision}, ours_pixels).last_hidden_state
    our_tokens = np.asarray(adaptive_avg_pool_2d(patches, (bridge["image_tokens"], width)))
    assert their_tokens.shape == our_tokens.shape == (1, 9, width)
    np.testing.assert_allclose(their_tokens, our_tokens, atol=1e-4)


def test_heads_on_the_raw_pooled_vector_export_and_match(tiny_setup, tmp_path, texts):  # noqa: F811
    """model.normalize_pooled=False (the paper's stella heads): no Normalize before the Dense,
    and sentence-transformers still encodes like our JAX code."""
    from sentence_transformers import SentenceTransformer

    from jasper_jax.train.loop import train_and_evaluate

    c = tiny_config(tiny_setup, 1, **{"train.steps": 1, "model.normalize_pooled": False})
    train_and_evaluate(to_settings(c), tmp_path / "raw")
    export_workdir(tmp_path / "raw", tmp_path / "out")
    modules = json.loads((tmp_path / "out" / "modules.json").read_text())
    kinds = [m["type"].rsplit(".", 1)[1] for m in modules]
    assert kinds == ["Transformer", "Pooling", "Dense", "Normalize"]
    back = load_model(tmp_path / "out")
    assert back.config.normalize_pooled is False
    ours = TextEncoder(back).encode(texts[:64])
    st = SentenceTransformer(str(tmp_path / "out"), device="cpu").encode(texts[:64])
    cos = np.sum(ours * st, axis=1) / np.linalg.norm(st, axis=1)
    assert cos.min() > 0.9999
