"""TrainState, the optimiser, and the pure train step of the OE family.

``train_step(state, batch, rng, *, method)`` is the one place where models and losses meet:
it samples lam, builds the mixed batch, runs ONE forward pass over all the images the method
needs (``[x]``, ``[x, x_ood]``, ``[x, x_mix]`` or ``[x, x_ood, x_mix]``, chosen statically from the
weights; interleaved per example so a sharded batch stays on its devices), splits the logits,
calls ``oe_family_loss``, and applies one optimiser update and one BatchNorm-statistics update.
On a mesh its only collectives are all-reduces (gradients, BatchNorm statistics, metrics). The
training loop lives in ``trainer.py``.
"""
from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from flax import struct
from jax.sharding import Mesh

from lmoe_jax import losses, mixing

Array = jax.Array
PyTree = Any


class TrainState(struct.PyTreeNode):
    """Everything that changes during training; ``apply_fn``, ``tx`` and ``lr_fn`` are static."""
    step: Array
    params: PyTree
    batch_stats: PyTree
    opt_state: PyTree
    apply_fn: Callable = struct.field(pytree_node=False)
    tx: optax.GradientTransformation = struct.field(pytree_node=False)
    lr_fn: Callable = struct.field(pytree_node=False)

    @property
    def variables(self) -> dict:
        return {'params': self.params, 'batch_stats': self.batch_stats}


# --------------------------------------------------------------------------------------------------
# Optimiser
# --------------------------------------------------------------------------------------------------

OPTIMIZERS = ('sgd', 'adam', 'adamw')


def learning_rate_schedule(config, total_steps: int) -> optax.Schedule:
    """Cosine decay per step from ``learning_rate`` to ``end_learning_rate``, optional linear warmup."""
    peak, end = float(config.learning_rate), float(config.end_learning_rate)
    warmup = int(config.get('warmup_steps', 0))
    if total_steps <= 0:
        raise ValueError(f'total number of train steps must be > 0; got {total_steps}')
    if warmup >= total_steps:
        raise ValueError(f'warmup_steps ({warmup}) must be smaller than the number of train steps '
                         f'({total_steps})')
    if warmup > 0:
        return optax.warmup_cosine_decay_schedule(0.0, peak, warmup, total_steps, end_value=end)
    return optax.cosine_decay_schedule(peak, total_steps, alpha=end / peak if peak else 0.0)


def make_optimizer(config, total_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """SGD (Nesterov) with coupled L2 weight decay as in MixOE/PyTorch, or Adam / AdamW."""
    name = config.optimizer
    if name not in OPTIMIZERS:
        raise ValueError(f'unknown optimizer {name!r}; valid: {", ".join(OPTIMIZERS)}')
    schedule = learning_rate_schedule(config, total_steps)
    wd = float(config.weight_decay)
    chain = []
    if float(config.get('grad_clip_norm', 0.0)) > 0:
        chain.append(optax.clip_by_global_norm(float(config.grad_clip_norm)))
    if name == 'sgd':
        if wd:
            chain.append(optax.add_decayed_weights(wd))  # torch.optim.SGD's weight_decay
        chain.append(optax.sgd(schedule, momentum=float(config.momentum) or None,
                               nesterov=bool(config.nesterov)))
    elif name == 'adam':
        if wd:
            chain.append(optax.add_decayed_weights(wd))
        chain.append(optax.adam(schedule))
    else:
        chain.append(optax.adamw(schedule, weight_decay=wd))
    return optax.chain(*chain), schedule


def create_train_state(rng: Array, model, tx: optax.GradientTransformation,
                       lr_fn: optax.Schedule, image_shape: tuple[int, ...]) -> TrainState:
    """Initialise the model on a dummy batch and the optimiser on its params (pure; jit it)."""
    variables = model.init(rng, jnp.zeros((1, *image_shape), jnp.float32), train=False)
    params = variables['params']
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      batch_stats=variables.get('batch_stats', {}), opt_state=tx.init(params),
                      apply_fn=model.apply, tx=tx, lr_fn=lr_fn)


# --------------------------------------------------------------------------------------------------
# The step
# --------------------------------------------------------------------------------------------------

def interleave(parts: list[Array]) -> Array:
    """``P`` batches of ``B`` -> one batch of ``B*P``, row ``b*P + p`` = ``parts[p][b]``.

    Row-major: the rows of example ``b`` stay next to each other, so a batch sharded along its
    leading axis keeps every image on the device that holds it. (``concatenate`` along axis 0
    would put ``parts[1]`` behind ``parts[0]`` and make XLA move shards between devices.)
    """
    if len(parts) == 1:
        return parts[0]
    return jnp.stack(parts, axis=1).reshape(-1, *parts[0].shape[1:])


def deinterleave(y: Array, num_parts: int) -> list[Array]:
    """Inverse of ``interleave`` on the outputs: ``[B*P, ...]`` -> ``P`` arrays of ``[B, ...]``."""
    if num_parts == 1:
        return [y]
    y = y.reshape(-1, num_parts, *y.shape[1:])
    return [y[:, p] for p in range(num_parts)]


def train_step(state: TrainState, batch: dict[str, Array], rng: Array, *, method: losses.Method,
               axis_name: str | None = None,
               mesh: Mesh | None = None) -> tuple[TrainState, dict[str, Array]]:
    """One optimiser step of ``method``; pure.

    ``axis_name``: the pmap axis to average over. ``mesh``: the mesh a jit step runs on (the
    batch sharded along it); only used to keep the lam draw on every device (``mixing.mix_batch``).
    """
    rng = jax.random.fold_in(rng, state.step)
    x, labels = batch['image'], batch['label']
    x_ood = batch.get('ood_image')
    if method.needs_outliers and x_ood is None:
        raise ValueError(f"method {method.name!r} needs batch['ood_image']")
    lam = jnp.ones((), jnp.float32)
    x_mix = None
    if method.needs_lam:
        x_mix, lam = mixing.mix_batch(rng, x, x_ood, kind=method.mix if method.needs_mix else None,
                                      alpha=method.alpha, per_example=method.lam_per_example,
                                      axis_name=axis_name, mesh=mesh)
    parts = [x] + ([x_ood] if method.needs_ood else []) + ([x_mix] if method.needs_mix else [])
    images = interleave(parts)

    def loss_fn(params):
        logits, updates = state.apply_fn({'params': params, 'batch_stats': state.batch_stats},
                                         images, train=True, mutable=['batch_stats'])
        chunks = iter(deinterleave(logits.astype(jnp.float32), len(parts)))
        logits_id = next(chunks)
        logits_ood = next(chunks) if method.needs_ood else None
        logits_mix = next(chunks) if method.needs_mix else None
        total, terms = losses.oe_family_loss(
            logits_id=logits_id, logits_ood=logits_ood, logits_mix=logits_mix, labels=labels,
            lam=lam, weights=method.weights)
        return total, (total, terms, updates['batch_stats'], logits_id)

    grads, (total, terms, batch_stats, logits_id) = jax.grad(loss_fn, has_aux=True)(state.params)
    accuracy = jnp.mean((jnp.argmax(logits_id, -1) == labels).astype(jnp.float32))
    mean_lam = jnp.mean(lam)
    if axis_name:
        grads = jax.lax.pmean(grads, axis_name)
        total, terms, accuracy, mean_lam = jax.lax.pmean((total, terms, accuracy, mean_lam),
                                                         axis_name)
        # BatchNorm already averaged its batch statistics over the axis (bn_axis_name); the
        # running averages are therefore identical on every device.
    updates, opt_state = state.tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    if not method.needs_lam:  # no lam was drawn: logit_mix at lam=1 is just the ID CE again
        terms = {k: v for k, v in terms.items() if k != 'logit_mix'}
    metrics = {f'loss/{k}': v for k, v in terms.items()}
    metrics.update({
        'loss/total': total, 'accuracy': accuracy, 'lam': mean_lam,
        'grad_norm': optax.tree.norm(grads), 'learning_rate': state.lr_fn(state.step),
    })
    new_state = state.replace(step=state.step + 1, params=params, batch_stats=batch_stats,
                              opt_state=opt_state)
    return new_state, metrics
