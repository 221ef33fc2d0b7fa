"""What a call of ``lowshot.Evaluator`` costs against its floor: the bare forward over the same images plus the fits.

The real DeiT-Tiny, loaded as a Hugging Face model instance (float32, readout ``cls-prenorm``, the fast engine as
``lowshot extract`` runs it), on
Imagenette with a small protocol (default: 1/2/5 shots x 3 seeds with ``limit`` 30 images per class, so a call
encodes 300 test images and the train images the subsets draw). In one run, repetitions interleaved:

- **call**: ``evaluator(model, step=i)``, one weight changed before each so its features are never reused (the
  ``state_dict`` hash is part of the call, as in training);
- **forward**: the same crops, already stacked as one uint8 tensor, normalised and through the same forward (the
  fast engine built from the current weights), in batches of the same size under ``torch.inference_mode()``;
- **fits**: ``run_probe`` on those features (the same function the call runs).

The target: call <= 1.1 x (forward + fits). The first call's cost (listing + decoding when the evaluator is built,
then the call) is reported beside it.

    HF_HUB_OFFLINE=1 python benchmarks/evaluator_speed.py     # writes benchmarks/results/evaluator_speed.{json,md}
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import DEIT_TINY, IMAGENETTE, begin, median, portable, publish  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--limit", type=int, default=30, help="images per class of the test split and train pool")
    parser.add_argument("--shots", default="1,2,5")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=64)
    args, info = begin(parser)

    import tempfile

    import numpy as np
    import torch
    from transformers import AutoModel

    import lowshot
    from lowshot.models.live import live_model

    protocol = lowshot.ProbeSettings(shots=tuple(int(s) for s in args.shots.split(",")), percents=(),
                                     seeds=args.seeds, limit=args.limit)
    # no pooler: the readout (cls-prenorm) does not use it
    model = AutoModel.from_pretrained(DEIT_TINY, dtype=torch.float32, add_pooling_layer=False)
    with tempfile.TemporaryDirectory() as cache:
        start = time.perf_counter()
        evaluator = lowshot.Evaluator(IMAGENETTE, protocol, cache_dir=cache, pixels="memory",
                                      batch_size=args.batch_size)
        build = time.perf_counter() - start
        start = time.perf_counter()
        first = evaluator(model, step=0)
        first_call = time.perf_counter() - start
        images = {name: len(rows) for name, rows in evaluator.images.items()}
        counts = ", ".join(f"{n} {split}" for split, n in images.items())
        stores = evaluator._stores
        crops = {name: torch.from_numpy(stores[name].take(rows)) for name, rows in evaluator.images.items()}
        live = live_model(model, transform=evaluator.transform)

        def bare_forward() -> dict[str, np.ndarray]:
            model.eval()
            out = {}
            with torch.inference_mode():
                forward = live.forward_for_call()
                for name, batch in crops.items():
                    parts = [forward(evaluator.transform.normalize(part)).float().numpy()
                             for part in batch.split(args.batch_size)]
                    out[name] = np.concatenate(parts)
            return out

        def fits():
            train, test = evaluator.features
            return lowshot.run_probe(train, test, protocol)

        calls, forwards, fitted = [], [], []
        for rep in range(args.reps):
            with torch.no_grad():
                model.embeddings.cls_token[0, 0, 0] += 1e-3  # a training step's change: the features are new
            start = time.perf_counter()
            evaluator(model, step=rep + 1)
            calls.append(time.perf_counter() - start)
            start = time.perf_counter()
            features = bare_forward()
            forwards.append(time.perf_counter() - start)
            start = time.perf_counter()
            fits()
            fitted.append(time.perf_counter() - start)
        train, test = evaluator.features
        drift = max(float(np.abs(features[train.manifest["split"]] - train.features).max()),
                    float(np.abs(features[test.manifest["split"]] - test.features).max()))
    call, forward, fit = median(calls), median(forwards), median(fitted)
    ratios = [c / (f + p) for c, f, p in zip(calls, forwards, fitted, strict=True)]  # each interleaved pair
    ratio = median(ratios)
    load_at_end = os.getloadavg()
    payload = {"machine": info, "command": portable(" ".join(sys.argv)), "protocol": protocol.to_dict(),
               "images": images, "model": "deit-tiny-patch16-224 (HF instance, float32, cls-prenorm)",
               "engine": first.meta["live_model"]["engine"],
               "seconds": {"build": build, "first_call": first_call, "calls": calls, "forwards": forwards,
                           "fits": fitted},
               "ratio_call_over_forward_plus_fits": ratio, "ratios": ratios, "load_average_at_end": load_at_end,
               "max_feature_difference": drift,
               "first_top1": [[r["subset"], r["seed"], r["top1"]] for r in first.rows]}
    total = sum(images.values())
    markdown = f"""# Evaluator call against its floor (forward + fits)

`{portable(" ".join(sys.argv))}`; {info['cpu']} (model {info['cpu_model_number']}), {info['cores']} cores,
torch {info['torch']} with {info['torch_threads']} threads.

DeiT-Tiny (`../shared/data/models/deit-tiny-patch16-224`) as a Hugging Face model instance, float32, readout
cls-prenorm, {first.meta['live_model']['engine']} engine, on Imagenette (`../shared/data/datasets/imagenette2-224`).
Protocol: shots {list(protocol.shots)},
{protocol.seeds} seeds, limit {protocol.limit} images per class (test split and train pool):
{counts} images, {total:,} in all. Medians of {args.reps} interleaved repetitions; a weight changes before
each call. Load average {info['load_average_at_start'][0]:.1f} at the start, {load_at_end[0]:.1f} at the end: on a
shared machine the seconds move with the load, the ratio of each pair (measured back to back) much less.

| what | seconds |
| --- | --- |
| evaluator call (state_dict hash + forward + fits) | {call:.2f} |
| bare forward over the same crops | {forward:.2f} |
| fits (`run_probe` on the same features) | {fit:.2f} |
| **call / (forward + fits)**, median of the pairs ({', '.join(f'{r:.3f}' for r in ratios)}) | **{ratio:.3f}** |
| first time: building the evaluator (listing, decoding {total:,} images) | {build:.2f} |
| first time: its first call | {first_call:.2f} |

Largest difference between the call's features and the bare forward's: {drift:.2g}.
"""
    publish("evaluator_speed", payload, markdown, out_dir=args.out or Path(__file__).parent / "results")


if __name__ == "__main__":
    main()
