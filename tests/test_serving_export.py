"""An export that serving stacks read correctly: a strict reader written here from the published
rules of Text Embeddings Inference (TEI) and vLLM checks the folder field by field, for BERT,
MPNet and Qwen2 students; sentence-transformers reproduces our encoder for every head; the
reader itself rejects each kind of broken folder.

The rules (facts from TEI `backends/src/lib.rs`, `router/src/lib.rs`,
`backends/candle/src/models/dense.rs`; vLLM `model_executor/models/adapters.py`
`_load_st_projector`, `transformers_utils/config.py` `get_pooling_config`, the pooler heads,
`ModelConfig.is_matryoshka`, `PoolingParams` verification):

- modules.json: a list of {idx: int, name: str, path: str, type}; TEI parses `type` only as one
  of four exact `sentence_transformers.models.*` strings (anything else: no Dense is loaded),
  vLLM compares the same strings. TEI reads `1_Pooling/config.json` by that literal path.
- Pooling: TEI needs the four classic `pooling_mode_*` keys as JSON booleans; vLLM takes the
  key whose value `is True`. One mode, one that servers run (cls, mean, last token).
- Dense: config {in_features, out_features, bias, activation_function}, TEI knows only the
  Identity and Tanh activation strings; weights `linear.weight` [out, in], `linear.bias` [out].
  vLLM runs the first Dense of modules.json; TEI runs it, or `--dense-path` when there is one.
  Both apply it to the pooled vector directly: a Normalize before it is skipped.
- config.json: vLLM (and transformers >= 5.2) runs Qwen2 causally unless `"is_causal": false`;
  vLLM accepts a `dimensions` request only with `is_matryoshka` / `matryoshka_dimensions`, and
  only widths listed there.
- TEI needs `tokenizer.json`; its token limit is `max_seq_length` of sentence_bert_config.json.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from safetensors import safe_open

from jasper_jax.config import to_settings
from jasper_jax.encode import TextEncoder
from jasper_jax.export import export_workdir, set_default_head
from jasper_jax.export.st_folder import modules_json
from jasper_jax.run_folder import is_workdir, load_workdir_model
from tests.text_samples import varied_texts
from tests.train_fixtures import TOKENIZER_FILES, tiny_config, tiny_setup  # noqa: F401

ST = "sentence_transformers.models."
MODULE_TYPES = {ST + k for k in ("Transformer", "Pooling", "Dense", "Normalize")}
POOL_KEYS = (  # TEI's PoolConfig: all four required, booleans
    "pooling_mode_cls_token",
    "pooling_mode_mean_tokens",
    "pooling_mode_max_tokens",
    "pooling_mode_mean_sqrt_len_tokens",
)
SERVED_POOLS = {"pooling_mode_cls_token", "pooling_mode_mean_tokens", "pooling_mode_lasttoken"}
ACTIVATIONS = {"torch.nn.modules.linear.Identity", "torch.nn.modules.activation.Tanh"}
DECODERS = {"qwen2", "qwen3", "mistral"}  # run causally unless config.json says otherwise
HEADS = (384, 32)
MRL_DIMS = (64, 128)  # the Qwen2 student's trained Matryoshka prefixes of its 384 head


# ---- the strict reader -----------------------------------------------------------------------


def _json(path: Path, problems: list[str]):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        problems.append(f"{path.name}: unreadable ({e.__class__.__name__})")
        return None


def _check_modules(modules, problems: list[str]) -> list[dict]:
    """modules.json entries as TEI's ModuleConfig / vLLM read them."""
    if not isinstance(modules, list):
        problems.append("modules.json: not a list")
        return []
    for m in modules:
        ok = isinstance(m.get("idx"), int) and isinstance(m.get("name"), str)
        if not ok or not isinstance(m.get("path"), str):
            problems.append(f"modules.json: entry {m} lacks idx:int, name:str or path:str")
        if m.get("type") not in MODULE_TYPES:
            problems.append(f"modules.json: type {m.get('type')!r} is not a type TEI parses")
    kinds = [str(m.get("type", "")).rsplit(".", 1)[-1] for m in modules]
    if kinds[:2] != ["Transformer", "Pooling"] or modules[0].get("path") != "":
        problems.append(f"modules.json: must start Transformer (path '') -> Pooling, not {kinds}")
    if len(modules) > 1 and modules[1].get("path") != "1_Pooling":
        problems.append("modules.json: TEI reads the pooling config from 1_Pooling/ only")
    if kinds.count("Dense") > 1:
        problems.append("modules.json: more than one Dense (TEI chains them, vLLM runs one)")
    if "Dense" in kinds and "Normalize" in kinds[: kinds.index("Dense")]:
        problems.append("modules.json: Normalize before Dense (TEI and vLLM skip it)")
    return modules


def _check_pooling(pool, hidden: int, problems: list[str]) -> None:
    if not isinstance(pool, dict):
        return
    for key in POOL_KEYS:
        if key not in pool:
            problems.append(f"1_Pooling/config.json: {key} missing (TEI requires it)")
    modes = {k: v for k, v in pool.items() if k.startswith("pooling_mode_")}
    for key, value in modes.items():
        if not isinstance(value, bool):
            problems.append(f"1_Pooling/config.json: {key}={value!r} is not a JSON boolean")
    on = [k for k, v in modes.items() if v is True]
    if len(on) != 1 or on[0] not in SERVED_POOLS:
        problems.append(f"1_Pooling/config.json: modes on {on}; need exactly one served mode")
    if pool.get("word_embedding_dimension") != hidden:
        problems.append("1_Pooling/config.json: word_embedding_dimension != hidden_size")


def _check_dense(folder: Path, hidden: int, problems: list[str]) -> int | None:
    """One 2_Dense_<dim> folder; returns its out_features."""
    cfg = _json(folder / "config.json", problems)
    if not isinstance(cfg, dict):
        return None
    name = folder.name
    dim = int(name.removeprefix("2_Dense_")) if name.removeprefix("2_Dense_").isdigit() else None
    types = {"in_features": int, "out_features": int, "bias": bool}
    for key, kind in types.items():
        if not isinstance(cfg.get(key), kind) or (kind is int and isinstance(cfg[key], bool)):
            problems.append(f"{name}/config.json: {key}={cfg.get(key)!r} is not {kind.__name__}")
    if cfg.get("activation_function") not in ACTIVATIONS:
        problems.append(f"{name}/config.json: activation {cfg.get('activation_function')!r}")
    if cfg.get("in_features") != hidden or (dim is not None and cfg.get("out_features") != dim):
        problems.append(f"{name}/config.json: not [{hidden} -> {dim}]")
    out, in_ = cfg.get("out_features"), cfg.get("in_features")
    want = {"linear.weight": [out, in_], **({"linear.bias": [out]} if cfg.get("bias") else {})}
    try:
        with safe_open(str(folder / "model.safetensors"), "np") as f:
            names = list(f.keys())  # a safe_open handle is not iterable
            shapes = {k: list(f.get_slice(k).get_shape()) for k in names}
    except (OSError, ValueError, RuntimeError) as e:
        problems.append(f"{name}/model.safetensors: unreadable ({e.__class__.__name__})")
        return None
    if shapes != want:
        problems.append(f"{name}/model.safetensors: tensors {shapes}, servers read {want}")
    return out


def _check_matryoshka(config: dict, width: int, problems: list[str]) -> None:
    if not any(k in config for k in ("is_matryoshka", "matryoshka_dimensions")):
        return
    dims = config.get("matryoshka_dimensions")
    if config.get("is_matryoshka") is not True:
        problems.append("config.json: matryoshka_dimensions without is_matryoshka: true")
    ok = isinstance(dims, list) and dims and all(isinstance(d, int) for d in dims)
    if not ok or dims != sorted(set(dims)) or dims[0] < 1 or dims[-1] != width:
        problems.append(f"config.json: matryoshka_dimensions {dims} not sorted in [1, {width}]")


def serving_violations(folder: Path) -> list[str]:
    """Every way `folder` breaks what TEI and vLLM read; [] when it follows them all."""
    problems: list[str] = []
    config = _json(folder / "config.json", problems) or {}
    hidden = config.get("hidden_size")
    modules = _check_modules(_json(folder / "modules.json", problems), problems)
    _check_pooling(_json(folder / "1_Pooling" / "config.json", problems), hidden, problems)
    widths = {}
    for sub in sorted(folder.glob("2_Dense_*")):
        widths[sub.name] = _check_dense(sub, hidden, problems)
    dense = [m["path"] for m in modules if m.get("type") == ST + "Dense"]
    if dense and dense[0] not in widths:
        problems.append(f"modules.json: Dense path {dense[0]!r} is not a 2_Dense_<dim> folder")
    width = widths.get(dense[0]) if dense else hidden
    if config.get("model_type") in DECODERS and not isinstance(config.get("is_causal"), bool):
        problems.append("config.json: a decoder without is_causal runs causally in vLLM")
    _check_matryoshka(config, width, problems)
    for name in ("tokenizer.json", "tokenizer_config.json", "model.safetensors"):
        if not (folder / name).is_file():
            problems.append(f"{name} missing")
    st = _json(folder / "sentence_bert_config.json", problems) or {}
    limit = config.get("max_position_embeddings", 0)
    if not isinstance(st.get("max_seq_length"), int) or st["max_seq_length"] > limit:
        problems.append(f"max_seq_length {st.get('max_seq_length')} > {limit} positions")
    return problems


# ---- three students, trained a step and exported ----------------------------------------------


def _qwen2_student(folder: Path, tokenizer: Path) -> Path:
    import torch
    import transformers

    torch.manual_seed(3)
    cfg = transformers.Qwen2Config(
        vocab_size=30522,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    transformers.Qwen2Model(cfg).save_pretrained(folder)
    for name in TOKENIZER_FILES:
        shutil.copy(tokenizer / name, folder / name)
    return folder


def _mpnet_student(folder: Path, tokenizer: Path) -> Path:
    import torch
    import transformers

    torch.manual_seed(4)
    cfg = transformers.MPNetConfig(
        vocab_size=30522,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=66,
    )
    transformers.MPNetModel(cfg).save_pretrained(folder)
    for name in TOKENIZER_FILES:
        shutil.copy(tokenizer / name, folder / name)
    return folder


@pytest.fixture(scope="module")
def exports(tiny_setup, tmp_path_factory) -> dict[str, tuple[Path, Path]]:  # noqa: F811
    """{arch: (workdir, export)}: BERT, MPNet and Qwen2 students with heads 384 and 32 on the
    raw pooled vector (what servers compute), one stage-3 step each; the Qwen2 run also trains
    Matryoshka prefixes of its 384 head."""
    from jasper_jax.train.loop import train_and_evaluate

    root = tmp_path_factory.mktemp("serving")
    tokenizer = Path(tiny_setup["student"])
    students = {
        "bert": tokenizer,
        "mpnet": _mpnet_student(root / "mpnet_student", tokenizer),
        "qwen2": _qwen2_student(root / "qwen2_student", tokenizer),
    }
    out = {}
    for arch, student in students.items():
        fields = {
            "model.init_hf": str(student),
            "model.heads": HEADS,
            "model.normalize_pooled": False,
            "train.steps": 1,
            "data.eval_texts": 16,
        }
        if arch == "qwen2":
            fields["loss.mrl_dims"] = MRL_DIMS
        workdir = root / arch
        if not is_workdir(workdir):
            train_and_evaluate(to_settings(tiny_config(tiny_setup, 3, **fields)), workdir)
        export_workdir(workdir, root / f"{arch}_export")
        out[arch] = (workdir, root / f"{arch}_export")
    return out


@pytest.fixture(scope="module")
def texts() -> list[str]:
    return varied_texts(24)


def _config(folder: Path) -> dict:
    return json.loads((folder / "config.json").read_text())


# ---- the folders follow the servers' rules ----------------------------------------------------


@pytest.mark.parametrize("arch", ["bert", "mpnet", "qwen2"])
def test_every_student_export_follows_tei_and_vllm_rules(exports, arch):
    _, folder = exports[arch]
    assert serving_violations(folder) == []
    modules = json.loads((folder / "modules.json").read_text())
    assert [m["path"] for m in modules if m["type"] == ST + "Dense"] == ["2_Dense_384"]
    assert {p.name for p in folder.glob("2_Dense_*")} == {"2_Dense_384", "2_Dense_32"}
    pool = json.loads((folder / "1_Pooling" / "config.json").read_text())
    assert pool["pooling_mode_mean_tokens"] is True


def test_qwen2_export_says_bidirectional_and_matryoshka(exports):
    _, folder = exports["qwen2"]
    config = _config(folder)
    assert config["is_causal"] is False and config["architectures"] == ["Qwen2Model"]
    assert config["is_matryoshka"] is True
    assert config["matryoshka_dimensions"] == [64, 128, 384]  # the trained prefixes + full
    for arch in ("bert", "mpnet"):  # trained without prefixes: no claim
        assert "matryoshka_dimensions" not in _config(exports[arch][1])


def test_set_default_head_moves_the_matryoshka_fields_with_the_head(exports, tmp_path):
    folder = Path(shutil.copytree(exports["qwen2"][1], tmp_path / "view"))
    set_default_head(folder, 32)  # 32 was never cut into prefixes: vLLM must refuse dimensions
    config = _config(folder)
    assert "is_matryoshka" not in config and "matryoshka_dimensions" not in config
    assert serving_violations(folder) == []
    set_default_head(folder, "dense_384")
    assert _config(folder)["matryoshka_dimensions"] == [64, 128, 384]


def test_heads_on_the_unit_pooled_vector_are_flagged_for_servers(exports, tmp_path):
    """normalize_pooled folders (the embedded default) put a Normalize before the Dense: TEI and
    vLLM would skip it, and the reader says so."""
    folder = Path(shutil.copytree(exports["bert"][1], tmp_path / "view"))
    layout = modules_json("dense_384", normalize_pooled=True)  # what export writes for them
    (folder / "modules.json").write_text(json.dumps(layout))
    assert serving_violations(folder) == [
        "modules.json: Normalize before Dense (TEI and vLLM skip it)"
    ]


def test_model_card_says_how_each_server_picks_a_head(exports):
    from jasper_jax.export.model_card import model_card

    card = (exports["qwen2"][1] / "README.md").read_text()
    assert "`--dense-path 2_Dense_32`" in card and "set_default_head(folder, dim)" in card
    assert "Matryoshka prefixes (64, 128, 384)" in card
    assert "skip that Normalize" not in card  # these heads read the raw pooled vector
    summary = {"heads": [384, 32], "default_head": "dense_384", "normalize_pooled": True}
    assert "skip that Normalize" in model_card({"stage": 3}, summary, None)


# ---- the reader can fail ---------------------------------------------------------------------


def _edit_json(path: Path, change) -> None:
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


def _rename_dense_weight(folder: Path) -> None:
    from safetensors.numpy import load_file, save_file

    path = folder / "2_Dense_32" / "model.safetensors"
    tensors = load_file(str(path))
    save_file({"weight": tensors["linear.weight"], "bias": tensors["linear.bias"]}, str(path))


def _transpose_dense_weight(folder: Path) -> None:
    from safetensors.numpy import load_file, save_file

    path = folder / "2_Dense_384" / "model.safetensors"
    tensors = load_file(str(path))
    tensors["linear.weight"] = np.ascontiguousarray(tensors["linear.weight"].T)
    save_file(tensors, str(path))


BREAKAGES = {
    "new-style type string": (
        lambda f: _edit_json(
            f / "modules.json", lambda m: m[2].update(type="sentence_transformers.Dense")
        ),
        "is not a type TEI parses",
    ),
    "pooling value as a string": (
        lambda f: _edit_json(
            f / "1_Pooling" / "config.json", lambda p: p.update(pooling_mode_mean_tokens="true")
        ),
        "is not a JSON boolean",
    ),
    "two pooling modes": (
        lambda f: _edit_json(
            f / "1_Pooling" / "config.json", lambda p: p.update(pooling_mode_cls_token=True)
        ),
        "need exactly one served mode",
    ),
    "pooling key left out": (
        lambda f: _edit_json(
            f / "1_Pooling" / "config.json", lambda p: p.pop("pooling_mode_max_tokens")
        ),
        "pooling_mode_max_tokens missing",
    ),
    "tanh-less unknown activation": (
        lambda f: _edit_json(
            f / "2_Dense_32" / "config.json",
            lambda c: c.update(activation_function="torch.nn.modules.activation.GELU"),
        ),
        "activation 'torch.nn.modules.activation.GELU'",
    ),
    "dense weight names": (_rename_dense_weight, "servers read"),
    "dense weight transposed": (_transpose_dense_weight, "servers read"),
    "dense path not a head folder": (
        lambda f: _edit_json(f / "modules.json", lambda m: m[2].update(path="2_Dense")),
        "is not a 2_Dense_<dim> folder",
    ),
    "decoder without is_causal": (
        lambda f: _edit_json(f / "config.json", lambda c: c.pop("is_causal")),
        "runs causally in vLLM",
    ),
    "matryoshka wider than the head": (
        lambda f: _edit_json(
            f / "config.json", lambda c: c.update(matryoshka_dimensions=[64, 512])
        ),
        "matryoshka_dimensions [64, 512]",
    ),
    "no fast tokenizer": (lambda f: (f / "tokenizer.json").unlink(), "tokenizer.json missing"),
    "longer than the positions": (
        lambda f: _edit_json(
            f / "sentence_bert_config.json", lambda c: c.update(max_seq_length=4096)
        ),
        "max_seq_length 4096 > 64",
    ),
}


@pytest.mark.parametrize("breakage", sorted(BREAKAGES))
def test_the_reader_rejects_a_broken_folder(exports, tmp_path, breakage):
    folder = Path(shutil.copytree(exports["qwen2"][1], tmp_path / "broken"))
    assert serving_violations(folder) == []
    damage, message = BREAKAGES[breakage]
    damage(folder)
    problems = serving_violations(folder)
    assert any(message in p for p in problems), problems


# ---- sentence-transformers reproduces our encoder, every head ------------------------------------


def _st_cosines(workdir: Path, folder: Path, head: str, texts: list[str], tmp: Path):
    from sentence_transformers import SentenceTransformer

    view = Path(shutil.copytree(folder, tmp / f"view_{head}"))
    set_default_head(view, head)
    st = SentenceTransformer(str(view), device="cpu", local_files_only=True)
    ref = st.encode(texts, normalize_embeddings=True)
    ours = TextEncoder(load_workdir_model(workdir)[0]).encode(texts, head=head)
    assert ours.shape == ref.shape
    return np.sum(ours * ref, axis=1)


@pytest.mark.parametrize("arch", ["bert", "mpnet", "qwen2"])
def test_sentence_transformers_equals_our_encoder_for_every_head(exports, texts, tmp_path, arch):
    workdir, folder = exports[arch]
    for head in ("dense_384", "dense_32", "pooled"):
        cos = _st_cosines(workdir, folder, head, texts, tmp_path)
        print(f"{arch} {head}: min cos {cos.min():.8f} over {len(texts)} texts")
        assert cos.min() >= 0.9999, (arch, head, float(cos.min()))


def test_qwen2_runs_bidirectionally_only_because_config_says_so(exports, texts, tmp_path):
    """Without `"is_causal": false` transformers runs the Qwen2 causally: the vectors move away
    from our bidirectional encoder (so the field, and transformers >= 5.2, are what keep them)."""
    workdir, folder = exports["qwen2"]
    causal = Path(shutil.copytree(folder, tmp_path / "causal"))
    _edit_json(causal / "config.json", lambda c: c.pop("is_causal"))
    cos = _st_cosines(workdir, causal, "pooled", texts, tmp_path)
    print(f"qwen2 without is_causal: min cos {cos.min():.4f}")
    assert cos.min() < 0.999, float(cos.min())
