"""The embedded default: the paper's recipe at 2-core-CPU scale, on bundled teachers and data.

Teachers all-mpnet-base-v2 (768) + all-MiniLM-L6-v2 (384) -> 1152-d target; the student is the
MiniLM-L6 architecture initialised from all-MiniLM-L6-v2 (as Jasper's student is one of its own
teachers). `get_config("2")` gives stage 2; stages differ only by the overrides in STAGES.
`jasper-jax demo` fills in data dirs and init_from for each stage.
"""

import ml_collections

TEACHER_DIM = 768 + 384
REDUCED_HEADS = (256, 128)

# Per-stage differences from the base (paper: 1e-4 / 8e-5 / 7e-5 learning rates). Measured on
# the demo's data (README, "What the main job does"): stage 1 is the closed-form head alone
# (gradient steps from it lowered held-out Spearman at every lr tried); stages 2-3 train
# without dropout, at the paper's order of learning rate, with the in-batch similarity terms
# at a tenth of the paper's weights (at batch 64 they trade held-out Spearman for retrieval).
STAGES = {
    1: dict(trainable="heads", heads=(TEACHER_DIM,), lr=1e-4, steps=0),
    2: dict(trainable="heads+last_layers", heads=(TEACHER_DIM,), lr=1e-4, steps=150),
    3: dict(trainable="all", heads=(TEACHER_DIM, *REDUCED_HEADS), lr=5e-5, steps=150),
    # Stage 4: only the vision tower trains (from scratch here, so a larger lr than the paper's).
    4: dict(trainable="vision", heads=(TEACHER_DIM, *REDUCED_HEADS), lr=2e-3, steps=500),
}
PAPER_LOSS = dict(similarity=200.0, relative_similarity=20.0)
TEXT_LOSS = dict(similarity=20.0, relative_similarity=2.0)

# Long documents (dewey-style chunk alignment): stage 3 continued on documents of consecutive
# corpus texts, each aligned as a whole and chunk by chunk. 256 tokens (BERT reaches 512) keeps
# the demo's teacher pass (mpnet over every document and chunk) and training to minutes on CPU.
LONG = dict(max_length=256, max_chunks=12, batch_size=8, lr=5e-5, steps=40)


# Stage 3 on pairs (`get_config("pairs")`, what the demo's stage 3 runs): WordNet usage examples
# with their definitions and one neighbouring definition as a hard negative, every text with its
# teacher vectors; distillation on all of them plus InfoNCE (learned temperature) on the pairs.
# Measured against distillation alone and InfoNCE alone on the same data (README, "Distillation
# and contrastive training").
PAIRS = dict(infonce=1.0, negatives=1)

# Named variants -> the stage whose workdir they start from (launch/tpu.sh chains on this):
# "long" continues stage 3; "pairs" is stage 3 on pair data, after stage 2 (as the demo runs it).
VARIANTS = {"long": 3, "pairs": 2}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    if arg == "long":
        return _long_documents(get_config("3"))
    if arg == "pairs":
        return _pairs(get_config("3"))
    stage = int(arg or 1)
    if stage not in STAGES:
        raise ValueError(f"embedded_default has stages {sorted(STAGES)}; got {arg!r}")
    s = STAGES[stage]
    c = ml_collections.ConfigDict()
    c.name = "embedded_default"
    c.stage = stage
    c.seed = 0
    c.dtype = "float32"  # compute dtype; "bfloat16" on accelerators
    c.mesh_shape = (-1, 1, 1)  # (data, fsdp, tensor); -1 takes the remaining devices
    c.trainable = s["trainable"]
    c.init_from = ""  # previous stage's workdir (weights only); "" starts from model.init_hf

    c.model = ml_collections.ConfigDict()
    c.model.init_hf = "all-MiniLM-L6-v2"  # local HF folder or a bundled teacher's name
    c.model.pooling = "mean"
    c.model.heads = s["heads"]
    c.model.trainable_last_layers = 3
    # New heads: "lstsq" fits them in closed form (ridge regression of the teacher target on
    # the features they read, one forward pass over head_init_texts train texts, reduced heads
    # by PCA of the full head's predictions; jasper_jax.train.head_init); "random" is the
    # paper's (FC layers at PyTorch's default init).
    c.model.head_init = "lstsq"
    c.model.head_init_texts = 12000
    c.model.head_init_ridge = 1e-3  # x trace(X^T X) / hidden
    # Heads read the unit-length pooled vector: MiniLM's own output is normalised, so a linear
    # head can then reproduce the student's own slice of the target exactly.
    c.model.normalize_pooled = True
    # Dropout on the student's encoder: off for the text stages (the targets are fixed vectors;
    # dropout noise lowered held-out fidelity in every run), on for the long-document step.
    c.model.dropout = False
    c.model.remat = "none"  # per-layer activation remat: "none" | "full" | "dots"
    # Attention: "auto" (dense up to attention_block keys, then flash kernels on GPU/TPU or
    # "blockwise" elsewhere), "dense", "blockwise" (memory O(block * length)) or "flash".
    c.model.attention = "auto"
    c.model.attention_block = 512
    c.model.rope_scaling = ""  # Qwen2 students: e.g. "yarn:4:32768"; "" keeps the checkpoint's
    # Stage 4: a small SigLIP-shaped tower (no pretrained vision weights offline) whose patch
    # tokens are pooled to `image_tokens` x hidden and fed to the frozen student.
    c.model.image_tokens = 8
    c.model.vision = ml_collections.ConfigDict()
    c.model.vision.init_hf = ""  # local HF SigLIP folder; "" trains the tower from scratch
    c.model.vision.image_size = 64
    c.model.vision.patch_size = 8
    c.model.vision.hidden_size = 192
    c.model.vision.intermediate_size = 768
    c.model.vision.num_hidden_layers = 4
    c.model.vision.num_attention_heads = 6

    c.teachers = ("all-mpnet-base-v2", "all-MiniLM-L6-v2")  # for `demo` to build the data
    c.data = ml_collections.ConfigDict()
    c.data.train_dir = ""
    c.data.eval_dir = ""
    c.data.batch_size = 64
    c.data.max_length = 48
    # Length-grouped batches: draw 16 batches at a time, regroup their texts by token count and
    # pad each batch to its longest text rounded up to 16 tokens (16/32/48: three compiles).
    # Corpus texts average 13 tokens, so fixed 48-token batches were mostly padding; grouped,
    # a stage-3 step takes half the time at the same held-out scores (README). 1: fixed length.
    c.data.length_groups = 16
    c.data.pad_multiple = 16
    # Student prompts by role (exported as sentence-transformers `prompts`): pair data's queries
    # get query_prompt; its documents, and every text of single-text data, document_prompt.
    c.data.query_prompt = ""
    c.data.document_prompt = ""
    c.data.negatives = -1  # hard negatives per pair row used (-1: all the pair dataset holds)
    c.data.worker_count = 0
    c.data.eval_texts = 1000
    c.data.train_texts = 12000  # corpus texts the demo encodes with the teachers
    c.data.train_pairs = 4800  # WordNet train pairs the demo encodes for get_config("pairs")
    c.data.corpus = "embedded"
    c.data.text_eval_dir = ""  # stage 4: teacher data showing the text side did not move
    c.data.eval_images = 500  # stage 4: held-out images (recall@1 among groups of 100)
    c.data.train_images = 6000  # stage 4: generated shapes images the demo captions
    # Chunk alignment (dewey): > 0 reads a chunk-mode teacher dataset and aligns up to this many
    # chunks per document besides the document vector; 0 is plain distillation.
    c.data.max_chunks = 0
    # The demo's long documents (set by get_config("long")): how they are cut, their lengths
    # in student tokens, how many the demo builds from consecutive train texts.
    c.data.chunking = ""
    c.data.document_tokens = ()
    c.data.train_documents = 0

    c.loss = ml_collections.ConfigDict()
    c.loss.cosine = 10.0
    loss = TEXT_LOSS if stage in (2, 3) else PAPER_LOSS
    c.loss.similarity = loss["similarity"]
    c.loss.relative_similarity = loss["relative_similarity"]
    c.loss.margin = 0.015
    c.loss.mrl_dims = ()
    c.loss.infonce = 0.0  # stage 4: image<->caption InfoNCE (in-batch negatives), full head
    c.loss.infonce_temperature = 0.05  # the fixed one, or where a learned one starts
    c.loss.infonce_symmetric = True  # also positive -> query (in-batch queries only)
    # Learn log(temperature) with the student, clipped to [min, max] (jina-v5: learnable).
    c.loss.learn_temperature = False
    c.loss.min_temperature = 0.01
    c.loss.max_temperature = 1.0
    c.loss.gor = 0.0
    c.loss.resim_block_size = 0  # 0: automatic tile size
    # "global": in-batch losses see the whole batch across devices (what a bigger batch buys);
    # "per_device": each data-parallel device's rows alone, as the authors' DeepSpeed reference.
    c.loss.in_batch = "global"
    # Chunk alignment terms (data.max_chunks > 0), over all valid chunks of the batch; dewey
    # aligns chunks with cosine + similarity only.
    c.loss.chunk_cosine = 10.0
    c.loss.chunk_similarity = 200.0
    c.loss.chunk_relative_similarity = 0.0

    c.optim = ml_collections.ConfigDict()
    c.optim.lr = s["lr"]
    c.optim.warmup_fraction = 0.05
    c.optim.weight_decay = 0.01
    c.optim.clip_norm = 1.0
    c.optim.b1 = 0.9
    c.optim.b2 = 0.999

    c.train = ml_collections.ConfigDict()
    c.train.steps = s["steps"]
    c.train.log_every = 10
    c.train.checkpoint_every = 50
    c.train.keep_checkpoints = 2
    c.train.max_nonfinite_in_row = 5
    c.train.gradcache_chunk = 0  # rows encoded at a time (gradient cache); 0: whole batch
    if stage == 4:
        c.data.batch_size = 32  # more, cheaper updates for a tower learning from scratch
        # Contrastive image<->caption term: distillation alone pulls every image towards the
        # mean caption (held-out recall@1 ~2%); with it, images separate (~20% at 300 steps).
        c.loss.infonce = 10.0
    return c


def _pairs(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """`get_config("pairs")`: stage 3 on a pair dataset (`jasper-jax teachers --pairs`), batches
    of 64 (query, positive, negative) rows, distillation + InfoNCE with a learned temperature."""
    c.data.negatives = PAIRS["negatives"]
    c.loss.infonce = PAIRS["infonce"]
    c.loss.learn_temperature = True
    return c


def _long_documents(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """`get_config("long")`: stage 3 in chunk mode; the demo builds its data with `chunking`."""
    # The long-document step keeps the recipe it was measured with (paper weights, dropout).
    c.model.dropout = True
    c.loss.similarity = PAPER_LOSS["similarity"]
    c.loss.relative_similarity = PAPER_LOSS["relative_similarity"]
    c.data.max_length = LONG["max_length"]
    c.data.max_chunks = LONG["max_chunks"]
    c.data.length_groups = 1  # documents with chunk spans keep fixed-length batches
    c.data.batch_size = LONG["batch_size"]
    c.data.eval_texts = 96  # held-out documents
    c.data.chunking = "sentences:32"  # demo: how documents are cut (student tokens)
    c.data.document_tokens = (64, 250)  # demo: document lengths drawn from this range
    c.data.train_documents = 160  # demo: documents built from consecutive train texts
    c.optim.lr = LONG["lr"]
    c.train.steps = LONG["steps"]
    c.train.checkpoint_every = 20
    return c
