"""The paper's recipe: stella_en_1.5B_v5 student distilled from NV-Embed-v2 + stella (12288-d).

Values from SPEC section 3 (paper + the authors' reference config): heads FC1 -> 12288 (stages
1-3) and FC2-4 -> 1024/512/256 (stage 3); lr 1e-4 / 8e-5 / 7e-5; batch 128; 4000 / 7000 / 2200
steps; max length 512; bf16 compute. Stage 4: the so400m SigLIP tower, lr 1e-4, 3500 steps,
batch 96 (the paper's 90, rounded to divide over 8/16/32 devices). Loss weights 10 / 200 / 20
and margin 0.015 are the embedded default's (they are the paper's already).

Everything not named here is the embedded default's field (one schema for all configs); the
fields a user must fill in are the local model folder and the teacher datasets::

    jasper-jax train --config configs/jasper_paper.py:1 --workdir gs://BUCKET/jasper/stage1 \
        --config.model.init_hf=/models/stella_en_1.5B_v5 \
        --config.data.train_dir=gs://BUCKET/teacher_data/train \
        --config.data.eval_dir=gs://BUCKET/teacher_data/validation

Memory: 1.5B params in fp32 with Adam is ~24 GB before activations, so the default mesh puts
every device on the fsdp axis (ZeRO-3 style); see README "Picking a mesh".
"""

from pathlib import Path

import ml_collections

from jasper_jax.config import import_config_module

TEACHER_DIM = 4096 + 8192  # NV-Embed-v2 + stella_en_1.5B_v5 at 8192-d
REDUCED_HEADS = (1024, 512, 256)

STAGES = {
    1: dict(trainable="heads", heads=(TEACHER_DIM,), lr=1e-4, steps=4000, batch=128),
    2: dict(trainable="heads+last_layers", heads=(TEACHER_DIM,), lr=8e-5, steps=7000, batch=128),
    3: dict(trainable="all", heads=(TEACHER_DIM, *REDUCED_HEADS), lr=7e-5, steps=2200, batch=128),
    # The paper's batch is 90; 96 divides over 8 or 16 data-parallel devices.
    4: dict(trainable="vision", heads=(TEACHER_DIM, *REDUCED_HEADS), lr=1e-4, steps=3500, batch=96),
}

# Named variants -> the stage whose workdir they start from (launch/tpu.sh chains on this).
VARIANTS = {"long": 3}  # stage 3 continued on long documents

# The student's query prompt (stella / Jasper config_sentence_transformers.json, "s2p_query";
# PAPER 1.1); documents get none. Exported as the folder's sentence-transformers prompts.
QUERY_PROMPT = (
    "Instruct: Given a web search query, retrieve relevant passages that answer the query.\nQuery: "
)

_embedded = import_config_module(Path(__file__).with_name("embedded_default.py"))


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    if arg == "long":
        return _long_documents(get_config("3"))
    stage = int(arg or 1)
    if stage not in STAGES:
        raise ValueError(f"jasper_paper has stages {sorted(STAGES)}; got {arg!r}")
    s = STAGES[stage]
    c = _embedded.get_config(str(stage))
    c.name = "jasper_paper"
    c.dtype = "bfloat16"
    c.mesh_shape = (1, -1, 1)  # all devices on fsdp: params, grads and Adam state sharded
    c.trainable = s["trainable"]

    c.model.init_hf = "stella_en_1.5B_v5"  # set to the local folder of the HF checkpoint
    c.model.pooling = "mean"
    c.model.heads = s["heads"]
    c.model.trainable_last_layers = 3
    # New heads: "lstsq" fits them in closed form (ridge regression of the teacher target on
    # the features they read, one forward pass over head_init_texts train texts, reduced heads
    # by PCA of the full head's predictions; jasper_jax.train.head_init); "random" is the
    # paper's (FC layers at PyTorch's default init).
    c.model.head_init = "lstsq"
    c.model.head_init_texts = 65536
    c.model.head_init_ridge = 1e-3  # x trace(X^T X) / hidden
    c.model.normalize_pooled = False  # stella's heads read the raw mean-pooled state
    c.model.remat = "full"  # 28 layers x 512 tokens x batch 128 of activations otherwise

    c.teachers = ("nvidia/NV-Embed-v2", "dunzhang/stella_en_1.5B_v5")  # precomputed offline
    c.data.batch_size = s["batch"]
    c.data.query_prompt = QUERY_PROMPT
    c.data.max_length = 512
    c.data.pad_multiple = 128  # length-grouped batches of 128..512 tokens: four compiles
    c.data.eval_texts = 5000
    c.data.corpus = "jasper_text_distill_dataset"

    c.optim.lr = s["lr"]
    c.optim.warmup_fraction = 0.05
    c.optim.weight_decay = 0.01

    c.train.steps = s["steps"]
    c.train.log_every = 50
    c.train.checkpoint_every = 500
    c.train.keep_checkpoints = 3
    if stage == 4:
        _vision_stage(c)
    return c


def _vision_stage(c: ml_collections.ConfigDict) -> None:
    """Stage 4: google/siglip-so400m-patch14-384 (27 x 27 = 729 patch tokens of 1152), pooled
    to 300 x 1536 tokens for the frozen student; data = captioned images (BAAI/Infinity-MM),
    built with `jasper-jax captions --student STAGE3_WORKDIR --manifest ...`."""
    c.model.vision.init_hf = "siglip-so400m-patch14-384"  # set to the local HF folder
    c.model.vision.image_size = 384
    c.model.vision.patch_size = 14
    c.model.vision.hidden_size = 1152
    c.model.vision.intermediate_size = 4304
    c.model.vision.num_hidden_layers = 27
    c.model.vision.num_attention_heads = 16
    c.model.image_tokens = 300
    c.loss.infonce = 0.0  # the paper's stage 4: cos + sim + resim only (the demo adds InfoNCE)
    c.data.eval_images = 1000


def _long_documents(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """`get_config("long")`: stage 3 continued on long documents with chunk alignment (dewey,
    PAPER 7; not part of the Jasper paper). Our choices, not published values: documents up to
    4096 tokens, sentence chunks of <= 256 tokens, batch 32, lr 2e-5. Memory: remat on every
    layer and attention in blocks of 1024 keys (flash kernels on TPU/GPU), so activations grow
    linearly with length. Build the data with
    `jasper-jax teachers ... --chunks sentences:256 --max-length 4096`."""
    c.data.max_length = 4096
    c.data.max_chunks = 64
    c.data.length_groups = 1
    c.data.batch_size = 32
    c.model.remat = "full"
    c.model.attention = "auto"
    c.model.attention_block = 1024
    c.optim.lr = 2e-5
    c.train.steps = 2000
    return c
