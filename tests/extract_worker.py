"""Run one extraction in a subprocess (for the kill -9, concurrency and thread-count tests).

    python -m tests.extract_worker MODEL DATA CACHE [--shard N] [--sleep SECONDS] [--threads N] [--out FILE.npy]
"""

import argparse
import time

import numpy as np
import torch

from lowshot import extract


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("model")
    parser.add_argument("data")
    parser.add_argument("cache")
    parser.add_argument("--shard", type=int, default=0)
    parser.add_argument("--sleep", type=float, default=0.0)
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.shard:
        extract.SHARD_TARGET = args.shard

    def slow(task: str, done: int, total: int) -> None:
        print(f"{task} {done}/{total}", flush=True)
        time.sleep(args.sleep)

    run = extract.extract_features(args.model, args.data, cache_dir=args.cache, device="cpu", batch_size=4,
                                   progress=slow)
    if args.out:
        np.save(args.out, np.asarray(run.train.features.features))
    print("cached" if run.train.cached else "extracted", flush=True)


if __name__ == "__main__":
    main()
