"""Run one extraction in a subprocess (kill -9, concurrency, thread-count and torchrun tests).

    python -m tests.extract_worker MODEL DATA CACHE [--shard N] [--sleep SECONDS] [--threads N] [--out FILE.npy]
        [--pid-dir DIR]

--sleep slows every batch on every rank (so a test can kill a run mid-way); --pid-dir writes rank<R>.pid.
"""

import argparse
import os
import time
from pathlib import Path

import numpy as np
import torch

from lowshot.features import extract, store
from lowshot.models.backbones import Backbone


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("model")
    parser.add_argument("data")
    parser.add_argument("cache")
    parser.add_argument("--shard", type=int, default=0)
    parser.add_argument("--sleep", type=float, default=0.0)
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--out", default=None)
    parser.add_argument("--pid-dir", default=None)
    args = parser.parse_args()
    if args.pid_dir:
        Path(args.pid_dir).mkdir(parents=True, exist_ok=True)
        (Path(args.pid_dir) / f"rank{os.environ.get('RANK', '0')}.pid").write_text(str(os.getpid()))
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.shard:
        store.SHARD_SIZE = args.shard

    if args.sleep:
        embed = Backbone.embed

        def slow_embed(self, pixels):
            time.sleep(args.sleep)
            return embed(self, pixels)

        Backbone.embed = slow_embed

    def report(task: str, done: int, total: int) -> None:
        print(f"{task} {done}/{total}", flush=True)

    run = extract.extract_features(args.model, args.data, cache_dir=args.cache, device="cpu", batch_size=4,
                                   progress=report)
    if args.out and int(os.environ.get("RANK", "0")) == 0:
        np.save(args.out, np.asarray(run.train.features.features))
    print("cached" if run.train.cached else "extracted", flush=True)


if __name__ == "__main__":
    main()
