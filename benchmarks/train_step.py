"""Throughput and peak memory of the compiled train step, per method preset, JAX vs PyTorch.

Times ``lmoe_jax.parallel.jit_train_step`` (the production path: jit over a mesh, state donated)
on synthetic data already on the device, for each method preset, and the same MixOE / LMoE
step written the PyTorch way (``torch_reference.py``: torchvision ResNet, separate forwards,
``loss.backward()``, ``optimizer.step()``) on the same machine and batch shape, so the ratios
come from one run. Every (framework, case, method) runs in its own fresh process, so compile
caches, allocators and memory high-water marks never leak from one run into the next.

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
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), '..')
METHODS = ('baseline', 'oe', 'mixoe_mixup', 'mixoe_cutmix', 'lmoe')
TORCH_METHODS = ('baseline', 'mixoe_mixup', 'lmoe')
# Forward passes per step (images forwarded = passes * B); must match the train step's choice.
PASSES = {'baseline': 1, 'oe': 2, 'energy_oe': 2, 'mixoe_mixup': 2, 'mixoe_cutmix': 2, 'lmoe': 3}

# The model-side fix measured beside the shipped model (see xla_variants.py and docs/benchmarks.md).
CPU_VARIANTS = 'default=;fix=patch:smallmap_dot1x1'
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
    # runs beside the shipped model to show whether it is neutral there.
    'gpu': [
        dict(model='small_cnn', image_size=28, channels=1, num_classes=10, batch_size=256,
             steps=50, warmup=5, torch=False, dtype='bfloat16'),
        dict(model='resnet50', image_size=64, channels=3, num_classes=100, batch_size=64,
             steps=30, warmup=5, torch=True, dtype='bfloat16', variants=CPU_VARIANTS),
        dict(model='resnet50', image_size=224, channels=3, num_classes=100, batch_size=32,
             steps=30, warmup=5, torch=True, dtype='bfloat16', variants=CPU_VARIANTS),
    ],
}


# --------------------------------------------------------------------------------------------------
# Memory helpers (Linux /proc; shared by both workers)
# --------------------------------------------------------------------------------------------------

def _proc_status_kib(field: str) -> int | None:
    try:
        with open('/proc/self/status') as f:
            match = re.search(rf'^{field}:\s+(\d+) kB', f.read(), re.M)
        return int(match.group(1)) if match else None
    except OSError:
        return None


def reset_rss_peak() -> bool:
    """Reset the kernel's RSS high-water mark (VmHWM) of this process; False where unsupported."""
    try:
        with open('/proc/self/clear_refs', 'w') as f:
            f.write('5')
        return True
    except OSError:
        return False


def rss_mib() -> float | None:
    kib = _proc_status_kib('VmRSS')
    return None if kib is None else kib / 1024


def rss_peak_mib() -> float | None:
    kib = _proc_status_kib('VmHWM')
    return None if kib is None else kib / 1024


def load_average() -> list[float]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


def summarize(times: list[float], batch_size: int, passes: int, cpu_times: list[float]) -> dict:
    """Step statistics; ``cpu_s_median`` (process CPU time per step) is steadier on a loaded host."""
    median = statistics.median(times)
    return {
        'cpu_s_median': statistics.median(cpu_times), 'cpu_s_all': cpu_times,
        'step_s_median': median, 'step_s_min': min(times), 'step_s_max': max(times),
        'step_s_all': times, 'id_img_s': batch_size / median,
        'fwd_img_s': batch_size * passes / median, 'passes': passes,
    }


# --------------------------------------------------------------------------------------------------
# JAX worker (runs in its own process)
# --------------------------------------------------------------------------------------------------

def run_jax(spec: dict) -> dict:
    """Time the production step: parallel.jit_train_step over a mesh, state donated."""
    import jax
    import ml_collections
    import numpy as np

    sys.path.insert(0, ROOT)
    from lmoe_jax import losses, parallel, train
    from lmoe_jax.models import create_model

    if spec.get('patch'):
        import xla_variants
        xla_variants.apply(spec['patch'])
    method = losses.get_method(spec['method'])
    n, b, c, k = spec['image_size'], spec['batch_size'], spec['channels'], spec['num_classes']
    model = create_model(ml_collections.ConfigDict(dict(name=spec['model'], dtype=spec['dtype'])), k)
    opt = ml_collections.ConfigDict(dict(
        optimizer='sgd', learning_rate=1e-3, end_learning_rate=1e-6, warmup_steps=0,
        momentum=0.9, nesterov=True, weight_decay=1e-5, grad_clip_norm=0.0))
    tx, lr_fn = train.make_optimizer(opt, 10_000)
    devices = jax.devices()
    mesh = parallel.make_mesh(devices)
    parallel.check_batch_size(b, len(devices))
    state = parallel.init_state(jax.random.key(0), model, tx, lr_fn, (n, n, c), mesh)
    rng = np.random.default_rng(0)
    host_batch = {
        'image': rng.normal(size=(b, n, n, c)).astype(np.float32),
        'label': rng.integers(0, k, b).astype(np.int32),
        'ood_image': rng.normal(size=(b, n, n, c)).astype(np.float32),
    }
    batch = parallel.global_batch(host_batch, mesh)
    key = parallel.replicate(jax.random.key(1), mesh)
    step = parallel.jit_train_step(method, mesh)

    t0 = time.perf_counter()
    compiled = step.lower(state, batch, key).compile()
    compile_s = time.perf_counter() - t0
    xla_mib = None
    try:
        mem = compiled.memory_analysis()
        xla_mib = (mem.argument_size_in_bytes + mem.output_size_in_bytes
                   + mem.temp_size_in_bytes - mem.alias_size_in_bytes) / 2**20
    except Exception:  # noqa: BLE001 - not every backend reports it
        pass

    reset_rss_peak()  # the mark now covers warm-up and timed steps, not compilation
    rss_before = rss_mib()
    for _ in range(max(1, spec['warmup'])):  # >= 1: the first run allocates
        state, metrics = compiled(state, batch, key)
        jax.block_until_ready((state, metrics))
    if not np.isfinite(float(metrics['loss/total'])):
        raise RuntimeError(f'non-finite loss in {spec}')
    times, cpu_times = [], []
    for _ in range(spec['steps']):
        t0, c0 = time.perf_counter(), time.process_time()
        state, metrics = compiled(state, batch, key)
        jax.block_until_ready((state, metrics))
        times.append(time.perf_counter() - t0)
        cpu_times.append(time.process_time() - c0)
    peak = rss_peak_mib()
    out = summarize(times, b, PASSES[spec['method']], cpu_times)
    out.update(compile_s=compile_s, xla_mib=xla_mib, device=str(devices[0].device_kind),
               num_devices=len(devices), backend=jax.default_backend(), jax=jax.__version__)
    stats = devices[0].memory_stats() if devices[0].platform != 'cpu' else None
    if stats and 'peak_bytes_in_use' in stats:
        out['peak_mib'] = stats['peak_bytes_in_use'] / 2**20
        out['peak_kind'] = 'device peak_bytes_in_use (whole process)'
    elif peak is not None and rss_before is not None:
        out['peak_mib'] = peak - rss_before
        out['peak_kind'] = 'host RSS high-water delta over the steps'
    return out


# --------------------------------------------------------------------------------------------------
# Parent: one subprocess per run, then the table
# --------------------------------------------------------------------------------------------------

def run_worker(spec: dict, timeout_s: float) -> dict:
    env = dict(os.environ)
    env['XLA_FLAGS'] = spec.get('xla_flags', '')
    if spec.get('omp_wait_policy'):
        env['OMP_WAIT_POLICY'] = spec['omp_wait_policy']
    env.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
    env['PYTHONPATH'] = os.pathsep.join([ROOT, os.path.dirname(os.path.abspath(__file__)),
                                         env.get('PYTHONPATH', '')])
    cmd = [sys.executable, os.path.abspath(__file__), '--_worker', json.dumps(spec)]
    load_before = load_average()
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return {**spec, 'error': f'timed out after {timeout_s:.0f} s', 'load_before': load_before}
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith('RESULT ')]
    if proc.returncode or not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
        return {**spec, 'error': ' | '.join(tail), 'load_before': load_before}
    result = json.loads(lines[-1][len('RESULT '):])
    return {**spec, **result, 'load_before': load_before, 'load_after': load_average()}


def build_runs(args) -> list[dict]:
    if args.suite:
        cases = [dict(c) for c in SUITES[args.suite]]
    else:
        cases = [dict(model=args.model, image_size=args.image_size,
                      channels=args.channels or (1 if args.model == 'small_cnn' else 3),
                      num_classes=args.num_classes, batch_size=args.batch_size,
                      steps=args.steps, warmup=args.warmup, torch=True)]
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


def table(results: list[dict]) -> str:
    """Markdown table, plus the JAX/PyTorch and LMoE/MixOE ratios of each case."""
    head = ('| framework | variant | model | px | B | method | passes | step s (median) | '
            'CPU s/step | ID img/s | fwd img/s | peak MiB | XLA plan MiB | compile s |')
    lines = [head, '|' + '---|' * (head.count('|') - 1)]
    for r in results:
        if 'error' in r:
            lines.append(f"| {r['framework']} | {r.get('variant', '')} | {r['model']} | "
                         f"{r['image_size']} | {r['batch_size']} | {r['method']} | error: "
                         f"{r['error'][:80]} ||||||||")
            continue
        fmt = lambda v, f: '' if v is None else format(v, f)  # noqa: E731
        lines.append(
            f"| {r['framework']} | {r.get('variant', '')} | {r['model']} | {r['image_size']} | "
            f"{r['batch_size']} | {r['method']} | {r['passes']} | {r['step_s_median']:.3f} | "
            f"{r['cpu_s_median']:.3f} | {r['id_img_s']:.1f} | {r['fwd_img_s']:.1f} | {fmt(r.get('peak_mib'), '.0f')} | "
            f"{fmt(r.get('xla_mib'), '.0f')} | {fmt(r.get('compile_s'), '.1f')} |")
    lines.append('')
    lines.extend(ratios(results))
    return '\n'.join(lines)


def ratios(results: list[dict]) -> list[str]:
    ok = [r for r in results if 'error' not in r]
    key = lambda r: (r['model'], r['image_size'], r['batch_size'], r['dtype'])  # noqa: E731
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


def machine() -> dict:
    info = {'platform': platform.platform(), 'python': platform.python_version(),
            'cpus_available': len(os.sched_getaffinity(0))}
    try:
        lscpu = subprocess.run(['lscpu'], capture_output=True, text=True).stdout
        info['cpu_model'] = re.search(r'Model name:\s+(.*)', lscpu).group(1).strip()
    except (OSError, AttributeError):
        pass
    return info


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--suite', choices=sorted(SUITES), default=None,
                        help='a predefined list of cases; overrides --model/--image_size/...')
    parser.add_argument('--model', default='resnet50')
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
                             "FLAGS' also applies xla_variants.apply(NAME)); default: the suite's "
                             "own, else one run without flags")
    parser.add_argument('--timeout', type=float, default=900, help='seconds per run')
    parser.add_argument('--out', default=None, help='write the raw results here (JSON)')
    parser.add_argument('--_worker', default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args._worker:
        spec = json.loads(args._worker)
        if spec['framework'] == 'jax':
            result = run_jax(spec)
        else:
            import torch_reference
            result = torch_reference.run(spec)
        print('RESULT ' + json.dumps(result), flush=True)
        return

    runs = build_runs(args)
    started = time.time()
    info = {'machine': machine(), 'command': ' '.join([os.path.relpath(sys.executable, ROOT)]
                                                      + sys.argv),
            'started': time.strftime('%Y-%m-%d %H:%M:%S'), 'load_start': load_average()}
    results = []
    for i, spec in enumerate(runs):
        result = run_worker(spec, args.timeout)
        results.append(result)
        status = result.get('error') or (f"{result['step_s_median']:.3f} s/step, "
                                         f"{result['id_img_s']:.1f} ID img/s")
        print(f"[{i + 1}/{len(runs)}] {spec['framework']}[{spec['variant']}] {spec['model']} "
              f"{spec['image_size']}px B={spec['batch_size']} {spec['method']}: {status} "
              f"(load {result.get('load_before')})", flush=True)
    info.update(load_end=load_average(), wall_s=time.time() - started)
    print()
    print(f"machine: {info['machine']}; load at start {info['load_start']}, end {info['load_end']}; "
          f"{info['wall_s']:.0f} s")
    print(table(results))
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, 'w') as f:
            json.dump({'info': info, 'results': results, 'table': table(results)}, f, indent=1)


if __name__ == '__main__':
    main()
