"""Throughput and peak memory of the compiled train step, per method preset, JAX vs PyTorch.

Times ``lmoe_jax.parallel.jit_train_step`` (the production path: jit over a mesh, state donated)
on synthetic data already on the device, for each method preset, and the same MixOE / LMoE
step written the PyTorch way (``torch_reference.py``: torchvision ResNet, separate forwards,
``loss.backward()``, ``optimizer.step()``) on the same machine and batch shape, so the ratios
come from one run. Every (framework, case, method) runs in its own fresh process (the JAX worker
is ``jax_step.py``), so compile caches, allocators and memory high-water marks never leak from
one run into the next. JAX variants: ``default`` is the model as shipped (``model.matmul_convs=
'auto'``); on CPU ``plain`` forces lax convolutions, on accelerators ``fix`` forces the matrix
products (``xla_variants.py``). For the bf16 ResNet-50 GPU comparison with torch.compile and a
largest-batch search, see ``gpu.py``.

What is reported per run (median over the timed steps; warm-up and compilation excluded; every
step is waited for with ``block_until_ready`` / ``cuda.synchronize``):

* ``id_img_s``   ID images per second (the batch size B over the step time): the number that
                 compares methods fairly, since they all consume B ID images per step;
* ``fwd_img_s``  images forwarded per second (B x passes: 1 baseline, 2 OE/MixOE, 3 LMoE);
* ``peak_mib``   CPU: host RSS high-water mark over the warm-up and timed steps minus the RSS
                 just before the first step (state and batch already built, JAX step already
                 compiled; ``/proc/self/clear_refs`` resets the mark there): the memory the
                 step itself adds;
                 GPU: device peak bytes in use (JAX ``memory_stats``, torch ``max_memory_allocated``);
* ``xla_mib``    (JAX) XLA's own buffer plan of the compiled step: arguments + outputs + temporaries
                 - donated aliases.

    .venv/bin/python benchmarks/train_step.py --suite=cpu --out=benchmarks/results/cpu.json
    .venv/bin/python benchmarks/train_step.py --suite=gpu --out=benchmarks/results/gpu.json
    .venv/bin/python benchmarks/train_step.py --model=resnet50 --image_size=64 --batch_size=8 \\
        --methods=mixoe_mixup,lmoe --torch_methods=mixoe_mixup,lmoe --steps=5
    # an XLA flag variant beside the default (one run each):
    .venv/bin/python benchmarks/train_step.py --model=resnet50 --image_size=64 --batch_size=8 \\
        --methods=lmoe --torch_methods= --variants='default=;onednn=--xla_cpu_use_onednn=true'
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import common
import worker

METHODS = ('baseline', 'oe', 'mixoe_mixup', 'mixoe_cutmix', 'lmoe')
TORCH_METHODS = ('baseline', 'mixoe_mixup', 'lmoe')

# The shipped model (model.matmul_convs='auto': the matrix-product convolutions on CPU, plain
# convolutions elsewhere) beside the other convolution choice (see xla_variants.py).
CPU_VARIANTS = 'plain=patch:plain;default='
ACCELERATOR_VARIANTS = 'default=;fix=patch:smallmap_dot1x1'
# name -> list of cases; a case fixes the model, image size, batch and step counts (and may name
# its own JAX variants; --variants overrides them).
SUITES = {
    # 2 shared CPU cores: small batches and few timed steps keep the whole suite near 15 min.
    'cpu': [
        dict(model='small_cnn', image_size=28, channels=1, num_classes=10, batch_size=128,
             steps=10, warmup=2, torch=False),
        dict(model='resnet50', image_size=64, channels=3, num_classes=100, batch_size=8,
             steps=5, warmup=1, torch=True, variants=CPU_VARIANTS),
        dict(model='resnet50', image_size=224, channels=3, num_classes=100, batch_size=8,
             steps=3, warmup=1, torch=True, variants=CPU_VARIANTS),
    ],
    # One accelerator, bf16 compute, MixOE's batch (32 ID + 32 outliers) at 224 px; the CPU fix
    # runs beside the shipped model to show whether it is neutral there. See also gpu.py.
    'gpu': [
        dict(model='small_cnn', image_size=28, channels=1, num_classes=10, batch_size=256,
             steps=50, warmup=5, torch=False, dtype='bfloat16'),
        dict(model='resnet50', image_size=64, channels=3, num_classes=100, batch_size=64,
             steps=30, warmup=5, torch=True, dtype='bfloat16', variants=ACCELERATOR_VARIANTS),
        dict(model='resnet50', image_size=224, channels=3, num_classes=100, batch_size=32,
             steps=30, warmup=5, torch=True, dtype='bfloat16', variants=ACCELERATOR_VARIANTS),
    ],
}


def run_worker(spec: dict, timeout_s: float) -> dict:
    """One (framework, case, method, variant) in a fresh process (jax_step / torch_reference)."""
    extra = {'XLA_FLAGS': spec.get('xla_flags', '')}
    if spec.get('omp_wait_policy'):
        extra['OMP_WAIT_POLICY'] = spec['omp_wait_policy']
    return common.run_worker(__file__, spec, timeout_s, common.worker_env(extra))


def build_runs(args) -> list[dict]:
    if args.suite:
        cases = [dict(c) for c in SUITES[args.suite]]
    else:
        cases = [dict(model=args.model, image_size=args.image_size,
                      channels=args.channels or (1 if args.model == 'small_cnn' else 3),
                      num_classes=args.num_classes, batch_size=args.batch_size,
                      steps=args.steps, warmup=args.warmup, torch=True)]
        if args.width:
            cases[0]['width'] = args.width
    methods = [m for m in args.methods.split(',') if m]
    torch_methods = [m for m in args.torch_methods.split(',') if m]
    threads = args.threads or len(os.sched_getaffinity(0))
    runs = []
    for case in cases:
        with_torch = case.pop('torch')
        spec = args.variants or case.pop('variants', '')
        case.pop('variants', None)
        variants = [v.split('=', 1) for v in spec.split(';') if v] or [['default', '']]
        case.setdefault('dtype', args.dtype)
        case.update(threads=threads)
        for method in methods:
            for name, flags in variants:
                patch = ''
                if flags.startswith('patch:'):
                    patch, _, flags = flags[len('patch:'):].partition(' ')
                runs.append(dict(case, framework='jax', method=method, variant=name,
                                 xla_flags=flags.strip(), patch=patch))
        if with_torch:
            for method in torch_methods:
                runs.append(dict(case, framework='torch', method=method, variant=args.torch_variant,
                                 device=args.torch_device,
                                 omp_wait_policy=args.torch_omp_wait_policy))
    return runs


def _model(r: dict) -> str:
    """The model's name, with its width where one was given (small_cnn w8: the demo's)."""
    return f"{r['model']} w{r['width']}" if r.get('width') else r['model']


def table(results: list[dict]) -> str:
    """Markdown table, plus the JAX/PyTorch and LMoE/MixOE ratios of each case."""
    head = ('| framework | variant | model | px | B | method | passes | step s (median) | '
            'CPU s/step | ID img/s | fwd img/s | peak MiB | XLA plan MiB | compile s |')
    lines = [head, '|' + '---|' * (head.count('|') - 1)]
    for r in results:
        if 'error' in r:
            lines.append(f"| {r['framework']} | {r.get('variant', '')} | {_model(r)} | "
                         f"{r['image_size']} | {r['batch_size']} | {r['method']} | error: "
                         f"{r['error'][:80]} ||||||||")
            continue
        fmt = common.fmt
        lines.append(
            f"| {r['framework']} | {r.get('variant', '')} | {_model(r)} | {r['image_size']} | "
            f"{r['batch_size']} | {r['method']} | {r['passes']} | {r['step_s_median']:.3f} | "
            f"{r['cpu_s_median']:.3f} | {r['id_img_s']:.1f} | {r['fwd_img_s']:.1f} | {fmt(r.get('peak_mib'), '.0f')} | "
            f"{fmt(r.get('xla_mib'), '.0f')} | {fmt(r.get('compile_s'), '.1f')} |")
    lines.append('')
    lines.extend(ratios(results))
    return '\n'.join(lines)


def ratios(results: list[dict]) -> list[str]:
    ok = [r for r in results if 'error' not in r]
    key = lambda r: (_model(r), r['image_size'], r['batch_size'], r['dtype'])  # noqa: E731
    out = []
    for case in sorted({key(r) for r in ok}, key=str):
        rows = [r for r in ok if key(r) == case]
        pick = lambda fw, m, v=None: next(  # noqa: E731
            (r for r in rows if r['framework'] == fw and r['method'] == m
             and (v is None or r.get('variant') == v)), None)
        jax_variants = sorted({r['variant'] for r in rows if r['framework'] == 'jax'})
        label = f'{case[0]} {case[1]} px, B={case[2]}, {case[3]}'
        for v in jax_variants:
            lm, mx = pick('jax', 'lmoe', v), pick('jax', 'mixoe_mixup', v)
            if lm and mx:
                out.append(f'- {label}, jax[{v}]: LMoE / MixOE step time = '
                           f"{lm['step_s_median'] / mx['step_s_median']:.2f}x wall, "
                           f"{lm['cpu_s_median'] / mx['cpu_s_median']:.2f}x CPU (target <= 1.6)")
            for m in TORCH_METHODS:
                j, t = pick('jax', m, v), pick('torch', m)
                if j and t:
                    out.append(f'- {label}, {m}: JAX[{v}] speed / PyTorch speed = '
                               f"{t['step_s_median'] / j['step_s_median']:.2f} wall "
                               f"({j['step_s_median']:.3f} s vs {t['step_s_median']:.3f} s), "
                               f"{t['cpu_s_median'] / j['cpu_s_median']:.2f} CPU time")
        lm, mx = pick('torch', 'lmoe'), pick('torch', 'mixoe_mixup')
        if lm and mx:
            out.append(f'- {label}, torch: LMoE / MixOE step time = '
                       f"{lm['step_s_median'] / mx['step_s_median']:.2f}x wall, "
                       f"{lm['cpu_s_median'] / mx['cpu_s_median']:.2f}x CPU")
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--suite', choices=sorted(SUITES), default=None,
                        help='a predefined list of cases; overrides --model/--image_size/...')
    parser.add_argument('--model', default='resnet50')
    parser.add_argument('--width', type=int, default=None,
                        help="the model's base width (default: its own; small_cnn 16, the demo 8)")
    parser.add_argument('--image_size', type=int, default=64)
    parser.add_argument('--channels', type=int, default=None, help='default: 1 for small_cnn, else 3')
    parser.add_argument('--num_classes', type=int, default=100)
    parser.add_argument('--batch_size', type=int, default=8, help='ID images per step (B)')
    parser.add_argument('--dtype', default='float32', help='compute dtype (bfloat16 on GPU)')
    parser.add_argument('--steps', type=int, default=5, help='timed steps (median is reported)')
    parser.add_argument('--warmup', type=int, default=1,
                        help='untimed steps after compilation (at least 1 is run)')
    parser.add_argument('--methods', default=','.join(METHODS))
    parser.add_argument('--torch_methods', default=','.join(TORCH_METHODS),
                        help='methods of the PyTorch reference (empty: skip PyTorch)')
    parser.add_argument('--torch_variant', default='eager', choices=('eager', 'channels_last'))
    parser.add_argument('--torch_device', default='auto', help="'auto', 'cpu' or 'cuda'")
    parser.add_argument('--torch_omp_wait_policy', default='PASSIVE',
                        help="OMP_WAIT_POLICY of the PyTorch worker ('' keeps OpenMP's default); "
                             'PASSIVE because spinning OpenMP threads collapse on a shared host')
    parser.add_argument('--threads', type=int, default=0,
                        help='PyTorch intra-op threads (default: the CPUs XLA also uses)')
    parser.add_argument('--variants', default='',
                        help="JAX variants 'name=XLA_FLAGS;name2=...' (a value 'patch:NAME "
                             "FLAGS' also applies xla_variants.apply(NAME), e.g. patch:plain "
                             "for lax convolutions); default: the suite's "
                             "own, else one run without flags")
    parser.add_argument('--timeout', type=float, default=900, help='seconds per run')
    parser.add_argument('--out', default=None, help='write the raw results here (JSON)')
    parser.add_argument('--_worker', default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args._worker:
        worker.serve(args._worker)
        return

    runs = build_runs(args)
    started = time.time()
    info = {'machine': common.machine(),
            'command': ' '.join([os.path.relpath(sys.executable, common.ROOT)] + sys.argv),
            'started': time.strftime('%Y-%m-%d %H:%M:%S'), 'load_start': common.load_average()}
    results = []
    for i, spec in enumerate(runs):
        result = run_worker(spec, args.timeout)
        results.append(result)
        status = result.get('error') or (f"{result['step_s_median']:.3f} s/step, "
                                         f"{result['id_img_s']:.1f} ID img/s")
        print(f"[{i + 1}/{len(runs)}] {spec['framework']}[{spec['variant']}] {_model(spec)} "
              f"{spec['image_size']}px B={spec['batch_size']} {spec['method']}: {status} "
              f"(load {result.get('load_before')})", flush=True)
    info.update(load_end=common.load_average(), wall_s=time.time() - started)
    print()
    print(f"machine: {info['machine']}; load at start {info['load_start']}, end {info['load_end']}; "
          f"{info['wall_s']:.0f} s")
    print(table(results))
    if args.out:
        common.write_json(args.out, {'info': info, 'results': results, 'table': table(results)})


if __name__ == '__main__':
    main()
