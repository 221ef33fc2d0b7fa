"""Save a randomly initialised backbone with the same config as a real one: the "no pre-training" row of a
comparison (what the probe gets from architecture and pixels alone).

    python examples/make_random_model.py ../shared/data/models/deit-tiny-patch16-224 examples/out/deit-tiny-random

The weights are not committed: this script makes them (seeded, so the same folder every time).
"""

from __future__ import annotations

import argparse
from pathlib import Path


def make_random_model(like: str | Path, out: str | Path, *, seed: int = 0) -> Path:
    """A ``transformers`` backbone built from ``like``'s config.json with fresh random weights, saved to ``out``."""
    import torch
    from transformers import AutoConfig, AutoModel

    config = AutoConfig.from_pretrained(like)
    config.architectures = None  # the saved model is the bare backbone, not the classifier of the original
    torch.manual_seed(seed)
    model = AutoModel.from_config(config)
    from transformers.utils import logging as hf_logging

    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # its "Writing model shards" bar, for one small file, is noise on stderr
    try:
        model.save_pretrained(out)
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    return Path(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("like", help="a model folder with config.json (its weights are not read)")
    parser.add_argument("out", help="folder to write config.json + model.safetensors into")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    print(make_random_model(args.like, args.out, seed=args.seed))


if __name__ == "__main__":
    main()
