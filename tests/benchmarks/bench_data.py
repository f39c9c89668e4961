"""Throughput of the synthetic world (samples/s): scene generation + transforms + tokenisation.

Run by hand (not part of the test suite):
    .venv/bin/python tests/benchmarks/bench_data.py [--image-size 64] [--num 2000]

Measures, for shapes and gshapes: one process iterating dataset[i] (what a worker does), and a
DataLoader with 2 workers and batch 32 (what train.py does on a CPU run). The tiny presets train
at 64 px, so 64 is the default model input size.
"""

import argparse
import sys
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
import data  # noqa: E402


def single_process(dataset, num: int) -> tuple[float, float]:
    """-> (samples per wall second, samples per CPU second of this process).

    The second number does not depend on how busy the machine is (shared CI cores)."""
    dataset[0]  # warm up (imports, caches)
    wall, cpu = time.perf_counter(), time.process_time()
    for i in range(num):
        dataset[i]
    return num / (time.perf_counter() - wall), num / (time.process_time() - cpu)


def loader(dataset, num: int, workers: int, batch_size: int = 32) -> float:
    subset = torch.utils.data.Subset(dataset, range(num))
    dl = DataLoader(subset, batch_size=batch_size, num_workers=workers, collate_fn=data.collate)
    it = iter(dl)
    next(it)  # worker start-up is not throughput
    start, seen = time.perf_counter(), 0
    for batch in it:
        seen += len(batch["sentence"])
    return seen / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--num", type=int, default=2000)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(1)
    tokenizer = data.build_tokenizer("bert", None)
    for name in ("shapes", "gshapes"):
        dataset = data.build_dataset(name, "train", tokenizer=tokenizer, family="bert",
                                     image_size=args.image_size, max_tokens=20)  # fmt: skip
        one, one_cpu = single_process(dataset, args.num)
        many = loader(dataset, args.num, args.workers)
        print(f"{name:8s} {args.image_size} px: {one:6.0f} samples/s single process "
              f"({one_cpu:.0f} per CPU-second), {many:6.0f} samples/s "
              f"DataLoader({args.workers} workers, batch 32)")  # fmt: skip


if __name__ == "__main__":
    main()
