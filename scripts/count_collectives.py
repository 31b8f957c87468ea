"""Count the cross-device collectives in the compiled jit train step of every preset.

    PYTHONPATH=$PWD python scripts/count_collectives.py [--devices 8] [--batch 64]

Lowers and compiles ``parallel.jit_train_step(method, mesh)`` on a 1-D mesh of forced CPU
devices for the demo CNN (configs/fashion_mnist.py: small_cnn, 28x28x1) and prints, per method,
how many all-to-all, collective-permute, all-gather, all-reduce and reduce-scatter ops the
optimised HLO holds, and how many of the all-reduces reduce a boolean (a loop's stop flag).
Data-parallel training should need float all-reduces only (gradients, BatchNorm statistics,
metrics).
"""
from __future__ import annotations

import argparse
import os
import re
import sys

OPS = ('all-to-all', 'collective-permute', 'all-gather', 'all-reduce', 'reduce-scatter')


def count_ops(hlo_text: str) -> dict[str, int]:
    """Instructions per collective (``op(`` or async ``op-start(``), plus the all-reduces of a
    boolean: a sharded loop's stop flag, not a gradient, statistic or metric."""
    found = re.findall(r'^\s*(?:ROOT )?%\S+ = (.*?) (' + '|'.join(OPS) + r')(?:-start)?\(',
                       hlo_text, flags=re.M)
    counts = {op: sum(name == op for _, name in found) for op in OPS}
    counts['all-reduce of pred'] = sum(name == 'all-reduce' and 'pred[' in shape
                                       for shape, name in found)
    return counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--devices', type=int, default=8)
    parser.add_argument('--batch', type=int, default=64, help='global batch size')
    args = parser.parse_args()
    os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '')
                               + f' --xla_force_host_platform_device_count={args.devices}')
    os.environ.setdefault('JAX_PLATFORMS', 'cpu')
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding, PartitionSpec as P

    from configs import fashion_mnist
    from lmoe_jax import losses, parallel, train
    from lmoe_jax.models import create_model

    config = fashion_mnist.get_config()
    model = create_model(config.model, config.data.num_id_classes)
    tx, lr_fn = train.make_optimizer(config, 1000)
    mesh = parallel.make_mesh()
    shape = (config.data.image_size, config.data.image_size, 1)
    state = jax.eval_shape(lambda r: train.create_train_state(r, model, tx, lr_fn, shape),
                           jax.random.key(0))
    data_sh = NamedSharding(mesh, P(parallel.DATA_AXIS))
    img = jax.ShapeDtypeStruct((args.batch, *shape), jnp.float32, sharding=data_sh)
    batch = {'image': img, 'ood_image': img,
             'label': jax.ShapeDtypeStruct((args.batch,), jnp.int32, sharding=data_sh)}
    rng = jax.eval_shape(lambda: jax.random.key(0))

    rows = []
    for name in losses.PRESETS:  # each preset; where lam is drawn, per-example and the other mix
        rows.append((name, {}))
        method = losses.get_method(name)
        if method.needs_lam:
            other = {'mix': 'mixup' if method.mix == 'cutmix' else 'cutmix'}
            rows += [(f'{name}[lam_per_example]', {'lam_per_example': True}),
                     (f'{name}[{other["mix"]}+lam_per_example]', {**other, 'lam_per_example': True})]
    print(f'{jax.device_count()} devices, global batch {args.batch}, model {config.model.name}')
    columns = OPS + ('all-reduce of pred',)
    print(f'{"method":36s}' + ''.join(f'{op:>20s}' for op in columns))
    for label, over in rows:
        method = losses.get_method(label.split('[')[0], over)
        hlo = parallel.jit_train_step(method, mesh).lower(state, batch, rng).compile().as_text()
        counts = count_ops(hlo)
        print(f'{label:36s}' + ''.join(f'{counts[op]:20d}' for op in columns))
    sys.stdout.flush()


if __name__ == '__main__':
    main()
