"""Train step throughput: jasper-jax vs a straightforward PyTorch version of the same step.

Both sides: the all-MiniLM-L6-v2 student (bundled weights), mean pooling, a 384 -> 1152 linear
head, loss 10*cos + 200*sim + 20*resim (margin 0.015), AdamW (wd 0.01) with clipping at 1.0,
dropout on, every parameter trained (stage 3). The PyTorch side follows the authors' reference:
the relative-similarity loss materialises all pair-of-pair differences. Same CPU, same batches,
one run. Prints a table and appends it to `benchmarks/results.md`.

    python benchmarks/train_step.py [--batches 32,64] [--lengths 48,128] [--steps 5]
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.common import report
from jasper_jax.config import load_settings
from jasper_jax.data.corpus import load_corpus
from jasper_jax.data.teacher_assets import teacher_folder
from jasper_jax.models.embedder import Embedder, EmbedderConfig, head_name, init_params
from jasper_jax.models.loading import load_model
from jasper_jax.train import state as st
from jasper_jax.train.step import loss_config, make_train_step, text_forward
from jasper_jax.vectors import unit_rows

TEACHER_DIM = 1152


def make_batches(folder, batch: int, length: int, count: int) -> list[dict]:
    """`count` batches of real corpus texts tokenized to [batch, length] plus unit teachers."""
    import transformers

    tok = transformers.AutoTokenizer.from_pretrained(str(folder))
    texts = load_corpus("embedded", split="train")[: batch * count]
    rng = np.random.default_rng(0)
    out = []
    for k in range(count):
        enc = tok(
            texts[k * batch : (k + 1) * batch],
            padding="max_length",
            truncation=True,
            max_length=length,
            return_tensors="np",
        )
        teacher = rng.normal(size=(batch, TEACHER_DIM)).astype(np.float32)
        teacher = unit_rows(teacher)
        out.append(
            {
                "input_ids": enc["input_ids"].astype(np.int32),
                "attention_mask": enc["attention_mask"].astype(np.int32),
                "teacher": teacher,
            }
        )
    return out


def build_jax_step(folder, gradcache_chunks: int = 1):
    """(jitted stage-3 step, initial state) for the MiniLM student with a 1152-d head."""
    loaded = load_model(folder)
    config = EmbedderConfig(
        encoder=loaded.config.encoder,
        pooling="mean",
        heads=(TEACHER_DIM,),
        default_head=head_name(TEACHER_DIM),
    )
    params = init_params(config, jax.random.key(0))
    params = {**params, "encoder": loaded.params["encoder"]}
    s = load_settings("configs/embedded_default.py:3", {"model.heads": (TEACHER_DIM,)})
    paths = st.trainable_paths(params, s)
    tx = st.make_optimizer(s)
    schedule = st.learning_rate_schedule(s.optim, 1000)
    forward = text_forward(Embedder(config), config.head_names, dropout=True)
    train_step = make_train_step(
        forward, loss_config(s.loss), tx, paths, schedule, gradcache_chunks=gradcache_chunks
    )
    state = jax.jit(lambda p: st.init_state(p, paths, tx, seed=0))(params)
    return jax.jit(train_step, donate_argnums=0), state


def jax_steps_per_second(folder, batches: list[dict], steps: int) -> float:
    step, state = build_jax_step(folder)
    device_batches = [jax.tree.map(jnp.asarray, b) for b in batches]
    state, metrics = step(state, device_batches[0])  # compile
    jax.block_until_ready(metrics)
    start = time.perf_counter()
    for k in range(steps):
        state, metrics = step(state, device_batches[k % len(device_batches)])
    jax.block_until_ready(metrics)
    return steps / (time.perf_counter() - start)


def torch_losses(s, t, margin: float = 0.015):
    """cos, sim, resim as the reference computes them (full pair-of-pair matrix)."""
    import torch
    import torch.nn.functional as F

    s, t = F.normalize(s, dim=-1), F.normalize(t, dim=-1)
    cos = (1 - (s * t).sum(-1)).mean()
    s_sim, t_sim = s @ s.T, t @ t.T
    sim = F.mse_loss(s_sim, t_sim)
    rows, cols = torch.triu_indices(len(s), len(s), offset=1)
    ps, pt = s_sim[rows, cols], t_sim[rows, cols]
    d_s = ps[None, :] - ps[:, None]
    label = torch.where(pt[None, :] - pt[:, None] < 0, 1.0, -1.0)
    upper = torch.triu(torch.ones_like(d_s, dtype=torch.bool), diagonal=1)
    resim = torch.relu(label * d_s + margin)[upper].mean()
    return 10 * cos + 200 * sim + 20 * resim


def torch_steps_per_second(folder, batches: list[dict], steps: int) -> float:
    import torch
    import transformers

    torch.manual_seed(0)
    encoder = transformers.AutoModel.from_pretrained(str(folder))
    head = torch.nn.Linear(encoder.config.hidden_size, TEACHER_DIM)
    encoder.train()
    params = list(encoder.parameters()) + list(head.parameters())
    optimizer = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.01)
    torch_batches = [{k: torch.from_numpy(v).long() for k, v in b.items()} for b in batches]
    for b, nb in zip(torch_batches, batches, strict=True):
        b["teacher"] = torch.from_numpy(nb["teacher"])

    def one(b):
        mask = b["attention_mask"]
        hidden = encoder(input_ids=b["input_ids"], attention_mask=mask).last_hidden_state
        pooled = (hidden * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
        loss = torch_losses(head(pooled), b["teacher"])
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()

    one(torch_batches[0])  # warm-up
    start = time.perf_counter()
    for k in range(steps):
        one(torch_batches[k % len(torch_batches)])
    return steps / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batches", default="32,64")
    parser.add_argument("--lengths", default="48,128")
    parser.add_argument("--steps", type=int, default=5)
    args = parser.parse_args()
    import torch

    folder = teacher_folder("all-MiniLM-L6-v2")
    rows = []
    for batch in map(int, args.batches.split(",")):
        for length in map(int, args.lengths.split(",")):
            data = make_batches(folder, batch, length, count=3)
            ours = jax_steps_per_second(folder, data, args.steps)
            ref = torch_steps_per_second(folder, data, args.steps)
            tokens = batch * length
            rows.append([batch, length, ours * tokens, ref * tokens, ours / ref])
            print(rows[-1], flush=True)
    report(
        "Train step (stage 3, MiniLM-L6 student, 1152-d head, cos+sim+resim, AdamW), fp32",
        ["batch", "length", "jasper-jax tokens/s", "PyTorch reference tokens/s", "ratio"],
        rows,
        f"tokens = batch x padded length; {args.steps} timed steps after one warm-up; "
        f"torch {torch.__version__} with {torch.get_num_threads()} threads.",
    )


if __name__ == "__main__":
    main()
