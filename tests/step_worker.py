"""One train step of a tiny model, shared by tests/test_equivalence.py and its 2-process run.

``python tests/step_worker.py PROCESS_ID NUM_PROCESSES PORT OUT.npz``: each process feeds its own
contiguous part of the global batch to the jit step over all devices of all processes, and
writes the step's outputs (``outputs``) to OUT.npz.
"""
import sys

import numpy as np

IMG, K, BATCH = (8, 8, 1), 3, 16
METHOD, OVERRIDES = 'lmoe', {'lam_per_example': True}  # every loss term; per-example lam slices


def record_gradients():
    """An optax transform that keeps the gradient it is given as its state (to compare it)."""
    import jax
    import jax.numpy as jnp
    import optax
    return optax.GradientTransformation(lambda params: jax.tree.map(jnp.zeros_like, params),
                                        lambda updates, state, params=None: (updates, updates))


def initial_state(bn_axis_name=None):
    """The same state on every process: small_cnn (width 4), SGD + momentum + weight decay."""
    import jax
    import ml_collections
    import optax
    from lmoe_jax import train
    from lmoe_jax.models import create_model
    model = create_model(ml_collections.ConfigDict(dict(name='small_cnn', width=4)), K,
                         bn_axis_name=bn_axis_name)
    tx, lr_fn = train.make_optimizer(ml_collections.ConfigDict(dict(
        optimizer='sgd', learning_rate=0.05, end_learning_rate=0.0, warmup_steps=0, momentum=0.9,
        nesterov=True, weight_decay=1e-4, grad_clip_norm=0.0)), 100)
    return train.create_train_state(jax.random.key(0), model, optax.chain(record_gradients(), tx),
                                    lr_fn, IMG)


def method():
    from lmoe_jax import losses
    return losses.get_method(METHOD, OVERRIDES)


def global_batch(seed=0):
    """Class = bright quadrant of the image; outliers are noise (as tests/test_train_step.py)."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, K, BATCH).astype(np.int32)
    img = rng.normal(0, 0.3, (BATCH, *IMG)).astype(np.float32)
    for i, y in enumerate(labels):
        r, c = divmod(int(y), 2)
        img[i, r * 4:(r + 1) * 4, c * 4:(c + 1) * 4] += 2.0
    return {'image': img, 'label': labels, 'ood_image': rng.normal(0, 1, (BATCH, *IMG)).astype(np.float32)}


STEP_RNG_SEED = 42


def outputs(state, metrics) -> dict:
    """Host float64 arrays of what one step computes: gradients, updated params, BatchNorm
    statistics and the metrics (loss terms...), flattened to 'kind/path' names."""
    import jax
    from flax import traverse_util
    # one replica of each replicated array: a global array of several processes is not fetchable
    state, metrics = jax.tree.map(lambda x: np.asarray(x.addressable_data(0)), (state, metrics))
    trees = {'grads': state.opt_state[0], 'params': state.params, 'batch_stats': state.batch_stats}
    out = {f'{kind}/{"/".join(path)}': np.float64(v) for kind, tree in trees.items()
           for path, v in traverse_util.flatten_dict(tree).items()}
    out.update({f'metrics/{k}': np.float64(v) for k, v in metrics.items()})
    return out


def jit_step_on_processes(process_id: int, num_processes: int) -> dict:
    """This process's part of the global batch through the jit step over every device."""
    import jax
    from lmoe_jax import parallel
    mesh = parallel.make_mesh()
    part = {k: np.array_split(v, num_processes)[process_id] for k, v in global_batch().items()}
    state = parallel.replicate(initial_state(), mesh)
    state, metrics = parallel.jit_train_step(method(), mesh)(
        state, parallel.global_batch(part, mesh),
        parallel.replicate(jax.random.key(STEP_RNG_SEED), mesh))
    return outputs(state, metrics)


if __name__ == '__main__':
    process_id, num_processes, port, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
    import jax
    jax.distributed.initialize(coordinator_address=f'127.0.0.1:{port}', num_processes=num_processes,
                               process_id=process_id)
    np.savez(out, **jit_step_on_processes(process_id, num_processes))
