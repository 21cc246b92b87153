"""Train a tiny model through the Python API, as one process or as each rank under mpiexec.

Run by tests/test_mpi.py (`mpiexec -n 2 python tests/mpi_train.py ...` against `python
tests/mpi_train.py ...`). Each rank writes DUMP/rank{r}.npz: its weights, Adam moments and the loss
of every step, so the test can compare ranks with each other and with one process.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from fastchar import Model, ModelConfig, TextDataset, TrainConfig, Trainer
from fastchar.distributed import world

SMALL = dict(d_model=32, n_layer=2, n_head=4, ctx=16, mlp_hidden=128)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--corpus", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--dump", required=True)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--backend", default="numpy")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--dropout", type=float, default=0.0)
    p.add_argument("--drift-at", type=int, default=0, help="rank 1 nudges one weight after this step")
    p.add_argument("--fail-at", type=int, default=0, help="rank 1 raises an exception after this step")
    args = p.parse_args()

    ds = TextDataset(args.corpus)
    cfg = TrainConfig(batch=args.batch, grad_accum=args.grad_accum, steps=args.steps, warmup=5, eval_every=25,
                      eval_batches=4, log_every=1, out=args.out)  # fmt: skip
    model_cfg = ModelConfig(vocab_size=ds.vocab_size, dropout=args.dropout, **SMALL)
    dist = world()
    # Rank 1 starts from other weights on purpose: the Trainer must broadcast rank 0's.
    model = Model(model_cfg, backend=args.backend, seed=cfg.seed + dist.rank, dtype=np.dtype(args.dtype))
    trainer = Trainer(model, ds, cfg, log=print, progress=False)
    if args.drift_at:
        trainer.train(until=args.drift_at)
        if dist.rank == 1:
            model.params["lm_head"][0, 0] += 1e-3
    if args.fail_at:
        trainer.train(until=args.fail_at)
        if dist.rank == 1:
            raise RuntimeError("a failure on rank 1 only")
    trainer.train()
    dump = Path(args.dump)
    dump.mkdir(parents=True, exist_ok=True)
    np.savez(dump / f"rank{dist.rank}.npz", params=model.params.flat, adam_m=model.adam_m.flat,
             adam_v=model.adam_v.flat, losses=np.array(trainer.losses), ranks=dist.size)  # fmt: skip


if __name__ == "__main__":
    main()
