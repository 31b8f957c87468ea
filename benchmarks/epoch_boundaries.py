"""The train loop at its epoch boundaries: how long the first batch of each epoch takes, with
tf.data's autotuning model thread on and off (``config.data.autotune``), in the trainer itself.

Each case is a fresh process running ``trainer.train_stage`` of the demo's stage 1
(configs/fashion_mnist.py: 506 steps per epoch, validation and a checkpoint every 500 steps) for
``--steps`` steps; every train-stream ``next()`` over 0.1 s is recorded with its step, and so is
the stage's wall time. Cases alternate (off, on, off, on, ...) so that a drifting machine load
hits both alike. Why (issue 22): with autotuning on, the main thread was seen (py-spy, gdb) waiting
in the destructor of the finished epoch's iterator for its model thread, which sleeps in
``Model::OptimizeLoop`` for a period that grows to 60 s; the loop stood still that long.

    .venv/bin/python benchmarks/epoch_boundaries.py --steps=2100 --repeats=2 \\
        --out=benchmarks/results/epoch_boundaries.json
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SLOW_S = 0.1


def one_case(autotune: bool, steps: int) -> dict:
    """Stage 1 of the demo for ``steps`` steps in this process; the slow ``next()`` calls."""
    os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
    sys.path.insert(0, ROOT)
    from configs import fashion_mnist
    from lmoe_jax import trainer
    from lmoe_jax.data import pipeline

    slow, calls = [], [0]
    plain_next = pipeline.TrainStream.__next__

    def timed_next(stream):  # the instrument: the trainer builds its stream itself
        start = time.perf_counter()
        batch = plain_next(stream)
        calls[0] += 1
        took = time.perf_counter() - start
        if took > SLOW_S:
            slow.append({'step': calls[0], 'epoch_step': (calls[0] - 1) % stream.steps_per_epoch,
                         'seconds': round(took, 3)})
        return batch

    pipeline.TrainStream.__next__ = timed_next
    config = trainer.baseline_stage_config(fashion_mnist.get_config())
    config.num_train_steps = steps
    config.data.autotune = autotune
    workdir = tempfile.mkdtemp(prefix='epoch_boundaries_')
    try:
        trainer.enable_compilation_cache(config, workdir)
        start = time.perf_counter()
        trainer.train_stage(config, workdir, stage='baseline')
        wall = time.perf_counter() - start
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    boundaries = [s for s in slow if s['epoch_step'] == 0 and s['step'] > 1]
    return {'autotune': autotune, 'steps': steps, 'wall_s': round(wall, 1), 'slow_next': slow,
            'worst_epoch_start_s': max([s['seconds'] for s in boundaries], default=0.0),
            'load_after': [round(x, 2) for x in os.getloadavg()]}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--steps', type=int, default=2100, help='stage-1 steps per case')
    parser.add_argument('--repeats', type=int, default=2, help='cases per arm')
    parser.add_argument('--out', default=None, help='JSON of every case')
    parser.add_argument('--case', choices=('on', 'off'), default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.case:  # the child: one case, its JSON on the last line
        print(json.dumps(one_case(args.case == 'on', args.steps)))
        return
    cases = []
    for r in range(args.repeats):
        for arm in ('off', 'on'):
            load = os.getloadavg()[0]
            out = subprocess.run([sys.executable, os.path.abspath(__file__), f'--case={arm}',
                                  f'--steps={args.steps}'], capture_output=True, text=True,
                                 check=True)
            case = json.loads(out.stdout.strip().splitlines()[-1])
            case['load_before'] = round(load, 2)
            cases.append(case)
            starts = ', '.join(f"{s['step']}: {s['seconds']:.2f} s" for s in case['slow_next']
                               if s['epoch_step'] == 0)
            print(f"[{r}] autotune {arm:3s}: stage 1 {case['wall_s']:6.1f} s; epoch starts over "
                  f"{SLOW_S} s: {starts or 'none'} (load {case['load_before']} -> "
                  f"{case['load_after'][0]})", flush=True)
    for arm in ('off', 'on'):
        mine = [c for c in cases if c['autotune'] == (arm == 'on')]
        print(f"autotune {arm}: stage 1 wall {', '.join(str(c['wall_s']) for c in mine)} s; "
              f"worst epoch start {max(c['worst_epoch_start_s'] for c in mine):.2f} s")
    if args.out:
        with open(args.out, 'w') as f:
            json.dump({'command': ' '.join(sys.argv), 'cases': cases}, f, indent=1)


if __name__ == '__main__':
    main()
