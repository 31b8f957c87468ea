"""What the trainer's loop costs a step besides the train step itself, on the demo's data.

1. The train stream (configs/fashion_mnist.py's data, batch 64): wall and CPU milliseconds per
   batch with the outlier stream (stage 2) and without it (stage 1 reads none). On a small
   machine the stream's CPU time is taken from the XLA step beside it.
2. Averaging LMoE's nine step metrics with CLU: ``single_from_model_output`` + ``merge`` run
   eagerly (what the loop did) against ``trainer.make_metric_accumulator`` (one jitted call).

Needs the demo's data (scripts/setup.sh). Run alone: `.venv/bin/python benchmarks/loop_overheads.py`.
"""
from __future__ import annotations

import os
import resource
import sys
import time

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..'))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from configs import fashion_mnist  # noqa: E402
from lmoe_jax import data, trainer  # noqa: E402

LMOE_METRICS = ('loss/ce', 'loss/oe', 'loss/logit_mix', 'loss/consistency', 'loss/total',
                'accuracy', 'lam', 'grad_norm', 'learning_rate')


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def stream_cost(outliers: bool, batches: int = 300) -> tuple[float, float]:
    """(wall ms, CPU ms) per batch, after the first batches (which decode and cache the set)."""
    stream = data.train_stream(fashion_mnist.get_config().data, batch_size=64, seed=0,
                               process_index=0, process_count=1, outliers=outliers)
    for _ in range(5):
        next(stream)
    cpu, wall = _cpu_seconds(), time.perf_counter()
    for _ in range(batches):
        next(stream)
    return (1e3 * (time.perf_counter() - wall) / batches,
            1e3 * (_cpu_seconds() - cpu) / batches)


def metric_cost(steps: int = 500) -> dict[str, float]:
    """Milliseconds a step to fold one step's metrics into the running averages."""
    metrics = {name: jnp.float32(i) for i, name in enumerate(LMOE_METRICS)}
    collection_cls = trainer.make_train_collection(metrics)

    def eager(collection, step_metrics):
        update = collection_cls.single_from_model_output(
            **{trainer._metric_field(k): v for k, v in step_metrics.items()})
        return update if collection is None else collection.merge(update)

    results = {}
    for name, accumulate in (('eager CLU merge', eager),
                             ('make_metric_accumulator', trainer.make_metric_accumulator(metrics))):
        collection = None
        for _ in range(20):  # warm-up (and compilation)
            collection = accumulate(collection, metrics)
        jax.block_until_ready(collection)
        collection, start = None, time.perf_counter()
        for _ in range(steps):
            collection = accumulate(collection, metrics)
        jax.block_until_ready(collection)
        results[name] = 1e3 * (time.perf_counter() - start) / steps
        lam = trainer.collection_to_scalars(collection)['train/lam']
        assert lam == LMOE_METRICS.index('lam'), lam  # the average of a constant is itself
    return results


def main() -> None:
    print(f'load average before: {os.getloadavg()}')
    for outliers in (True, False):
        wall, cpu = stream_cost(outliers)
        print(f'train stream, batch 64, outliers={outliers!s:5}: {wall:5.1f} ms wall, '
              f'{cpu:5.1f} ms CPU per batch')
    for name, ms in metric_cost().items():
        print(f'{name:24}: {ms:6.2f} ms per step ({len(LMOE_METRICS)} metrics)')
    print(f'load average after: {os.getloadavg()}')


if __name__ == '__main__':
    main()
