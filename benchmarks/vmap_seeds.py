"""Does training several seeds in one XLA program (``jax.vmap`` over the state) pay on this host?

The method study (``benchmarks/compare_methods.py``) trains every (seed, variant) of the
Fashion-MNIST demo: small_cnn, batch 64, 28x28. On 2 CPU cores one such step leaves the cores
partly idle, so stacking S seeds' states and batches and running one vmapped step could cost
less than S single steps. This measures both for each method, on the demo's own batches:

    .venv/bin/python benchmarks/vmap_seeds.py --seeds=5 --methods=baseline,oe,mixoe_mixup,lmoe

Prints seconds per step of one seed alone, of S seeds vmapped, and the speed-up
S * t_single / t_vmapped (>1: vmap pays), with the load average beside each timing.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--seeds', type=int, default=5)
    parser.add_argument('--methods', default='baseline,oe,mixoe_mixup,lmoe')
    parser.add_argument('--steps', type=int, default=60, help='timed steps (after 5 warm-up steps)')
    parser.add_argument('--data_dir', default='runs/tfds')
    parser.add_argument('--out', default=None, help='write the results as JSON here')
    args = parser.parse_args(argv)

    import jax
    import jax.numpy as jnp
    from benchmarks import compare_methods as cm
    from lmoe_jax import data, losses, train, trainer

    cfg = cm.demo_config(args.data_dir)
    cfg.num_train_steps = 1000  # the schedule's length (as the state had before)
    info = data.dataset_info(cfg.data, process_count=1)
    n_batches = args.steps + 5
    per_seed = []
    for s in range(args.seeds):
        stream = data.train_stream(cfg.data, batch_size=cfg.batch_size, seed=s, process_index=0,
                                   process_count=1)
        got = [next(stream) for _ in range(n_batches)]
        per_seed.append({k: np.stack([b[k] for b in got]) for k in ('image', 'label', 'ood_image')})
    stacked = {k: np.stack([p[k] for p in per_seed], axis=1) for k in per_seed[0]}  # [T, S, ...]

    def states():  # the trainer's own initial state of each seed (config.seed drives init)
        out = []
        for s in range(args.seeds):
            cfg.seed = s
            out.append(jax.device_get(trainer.initial_state(trainer.make_setup(cfg))))
        return out

    def timed(step, state, batches, rng):
        for t in range(5):
            state, m = step(state, {k: v[t] for k, v in batches.items()}, rng)
        jax.block_until_ready(state)
        start, cpu0 = time.perf_counter(), time.process_time()
        for t in range(5, n_batches):
            state, m = step(state, {k: v[t] for k, v in batches.items()}, rng)
        jax.block_until_ready((state, m))
        wall = (time.perf_counter() - start) / args.steps
        return wall, (time.process_time() - cpu0) / args.steps

    results = []
    for name in args.methods.split(','):
        method = losses.get_method(name)
        single = jax.jit(lambda st, b, r, method=method: train.train_step(st, b, r, method=method),
                         donate_argnums=(0,))
        vmapped = jax.jit(jax.vmap(lambda st, b, r, method=method: train.train_step(
            st, b, r, method=method)), donate_argnums=(0,))
        one = states()[0]
        t_single, c_single = timed(single, one, per_seed[0], jax.random.PRNGKey(0))
        load_single = os.getloadavg()[0]
        many = states()
        # Static fields (apply_fn, tx, lr_fn) are equal in behaviour, not identity: keep seed 0's.
        treedef = jax.tree.structure(many[0])
        stacked_state = jax.tree.unflatten(
            treedef, [jnp.stack(xs) for xs in zip(*[jax.tree.leaves(m) for m in many])])
        rngs = jnp.stack([jax.random.PRNGKey(s) for s in range(args.seeds)])
        t_vmap, c_vmap = timed(vmapped, stacked_state, stacked, rngs)
        load_vmap = os.getloadavg()[0]
        row = {'method': name, 'seeds': args.seeds, 'single_s_per_step': t_single,
               'single_cpu_s_per_step': c_single, 'vmap_s_per_step': t_vmap,
               'vmap_cpu_s_per_step': c_vmap,
               'speedup': args.seeds * t_single / t_vmap,
               'load_single': load_single, 'load_vmap': load_vmap}
        results.append(row)
        print(f"{name:12s} one seed {1000 * t_single:7.1f} ms/step (load {load_single:.2f})  "
              f"{args.seeds} seeds vmapped {1000 * t_vmap:7.1f} ms/step (load {load_vmap:.2f})  "
              f"speed-up x{row['speedup']:.2f}", flush=True)
    if args.out:
        with open(args.out, 'w') as f:
            json.dump({'jax': jax.__version__, 'cpu_count': os.cpu_count(), 'results': results}, f,
                      indent=1)


if __name__ == '__main__':
    main()
