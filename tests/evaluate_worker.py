"""One process of a multi-process evaluate() run (tests/test_equivalence.py starts two of them).

``python tests/evaluate_worker.py PROCESS_ID NUM_PROCESSES PORT OUT_DIR``: each process feeds its
own contiguous part of every set, padded to the same number of masked batches (as the data
pipeline does), and writes its returned metrics to OUT_DIR/metrics_<id>.json; the report (with the
per-image scores, ood_scores.npz) goes to OUT_DIR/report (process 0 only).
"""
import json
import sys

from etils import epath
import numpy as np

H, K, BATCH = 8, 3, 8
SCORES = ('msp', 'odin', 'energy', 'kl_matching', 'mahalanobis', 'vim', 'react')


def tiny_model():
    import flax.linen as nn

    class Tiny(nn.Module):
        @nn.compact
        def __call__(self, x, train=False, return_features=False):
            x = nn.relu(nn.Conv(4, (3, 3))(x)).mean(axis=(1, 2))
            feats = nn.relu(nn.Dense(6)(x))
            logits = nn.Dense(K, name='fc')(feats)
            return (logits, feats) if return_features else logits
    return Tiny()


def data():
    rng = np.random.default_rng(0)
    image = lambda n, shift=0.0: rng.normal(shift, 1, (n, H, H, 1)).astype(np.float32)  # noqa: E731
    label = lambda n: rng.integers(0, K, n).astype(np.int32)  # noqa: E731
    return {'id_test': (image(45), label(45)), 'fine': (image(27, 0.5), None), 'train': (image(50), label(50))}


def process_part(images, labels, process_id: int, num_processes: int):
    """Batches of this process's part, padded with masked batches to the count of the largest part."""
    from lmoe_jax.ood import sources
    parts = np.array_split(np.arange(len(images)), num_processes)
    num_batches = -(-max(len(p) for p in parts) // BATCH)
    idx = parts[process_id]
    source = sources.array_source(images[idx], None if labels is None else labels[idx], BATCH)
    empty = {'image': np.zeros((BATCH, H, H, 1), np.float32), 'label': np.zeros(BATCH, np.int32),
             'mask': np.zeros(BATCH, bool)}
    return lambda: iter((list(source()) + [empty] * num_batches)[:num_batches])


def variables():
    import jax
    return jax.device_get(tiny_model().init(jax.random.PRNGKey(0), np.zeros((1, H, H, 1), np.float32)))


def gathered_order(n: int, num_processes: int) -> np.ndarray:
    """The image indices in the order a run of ``num_processes`` scores them: global batch i is
    every process's batch i in process order (their real rows only)."""
    parts = [list(p) for p in np.array_split(np.arange(n), num_processes)]
    num_batches = -(-max(len(p) for p in parts) // BATCH)
    return np.array([j for i in range(num_batches) for p in parts for j in p[i * BATCH:(i + 1) * BATCH]])


def run(process_id: int, num_processes: int, workdir=None, mesh: bool = False):
    """evaluate() of this process's part; ``mesh``: spread each batch over all devices (one
    process; with several, evaluate() does so by default)."""
    import jax
    from jax.sharding import Mesh, NamedSharding, PartitionSpec
    from lmoe_jax import evaluate as ev
    from lmoe_jax.ood import sources
    model = tiny_model()
    sharding = NamedSharding(Mesh(np.asarray(jax.devices()), ('data',)), PartitionSpec('data')) \
        if mesh else None
    sets = {name: process_part(*arrays, process_id, num_processes) for name, arrays in data().items()}
    return ev.evaluate(apply_fn=model.apply, variables=variables(), batch_sharding=sharding,
                       eval_sets=[sources.EvalSet('id_test', 'id', sets['id_test']),
                                  sources.EvalSet('fine', 'fine_ood', sets['fine'])],
                       fit_sets={'train': sets['train']}, scores=SCORES, workdir=workdir, plots=False,
                       score_config=ev.ScoreConfig(vim_dim=2, odin_input_std='imagenet'))


if __name__ == '__main__':
    process_id, num_processes, port, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
    import jax
    jax.distributed.initialize(coordinator_address=f'127.0.0.1:{port}', num_processes=num_processes,
                               process_id=process_id)
    metrics = run(process_id, num_processes, workdir=str(epath.Path(out) / 'report'))
    (epath.Path(out) / f'metrics_{process_id}.json').write_text(json.dumps(metrics))
