"""A toy training loop that scores its model with ``lowshot.Evaluator`` after every step (the torchrun test).

    python -m tests.evaluator_worker DATA CACHE OUT_PREFIX [--steps 2]

Run alone or under ``torchrun --nproc-per-node N``: each rank joins the gloo group itself, as a training script
does, trains the same seeded model on the same seeded batches, and writes OUT_PREFIX.rank<R>.json: the top-1 rows
of every step and how many images its evaluator decoded.
"""

import argparse
import json
import os

import torch


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("data")
    parser.add_argument("cache")
    parser.add_argument("out")
    parser.add_argument("--steps", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(1)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        torch.distributed.init_process_group("gloo")
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0

    from transformers import ViTMSNConfig, ViTMSNModel

    import lowshot

    torch.manual_seed(0)
    model = ViTMSNModel(ViTMSNConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=64))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    evaluator = lowshot.Evaluator(args.data, shots=(1, 2), percents=(), seeds=2, cache_dir=args.cache,
                                  pixels="memory", batch_size=4)
    decoded = sum(len(rows) for store in evaluator._stores.values() for rows, _ in store.parts)
    steps = []
    for step in range(args.steps):
        model.train()
        batch = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(step))
        loss = model(pixel_values=batch).last_hidden_state.pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        results = evaluator(model, step=step)
        steps.append({"step": results.meta["step"],
                      "rows": [[r["subset"], r["seed"], r["top1"]] for r in results.rows],
                      "features": evaluator.features[1].features[:2].tolist()})
    with open(f"{args.out}.rank{rank}.json", "w") as handle:
        json.dump({"rank": rank, "decoded": decoded, "steps": steps}, handle)
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
