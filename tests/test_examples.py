"""examples/quickstart.ipynb runs top to bottom in a fresh kernel, so it can never rot.

The kernel is this interpreter (a kernelspec written for sys.executable), started in examples/
as Jupyter would, with one CPU device (the suite's 8 forced devices are not passed on). After the
notebook's own cells, one extra cell (only in memory) recomputes the MSP AUROC with sklearn from
the trained model's logits, an independent check of the printed numbers.
"""
import json
import os
import re
import sys

import nbformat
import pytest
from jupyter_client.kernelspec import KernelSpecManager
from jupyter_client.manager import KernelManager
from nbclient import NotebookClient

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(ROOT, 'examples', 'quickstart.ipynb')
KERNEL = 'lmoe_test_python'

pytestmark = pytest.mark.slow

CHECK_CELL = r'''
import json as _json
import sys as _sys
from sklearn.metrics import roc_auc_score as _roc_auc_score
_msp = lambda images: np.asarray(jax.nn.softmax(predict(images), axis=-1).max(axis=-1), np.float64)
_id = _msp(x_test)
_check = {'executable': _sys.executable, 'devices': jax.device_count()}
for _row, _images in (('fine', x_fine), ('coarse', x_coarse)):
    _ood = _msp(_images)
    _is_ood = np.r_[np.zeros(len(_id)), np.ones(len(_ood))]
    _check[_row] = _roc_auc_score(_is_ood, -np.r_[_id, _ood])
    _check[_row + '_reported'] = metrics['scores']['msp'][_row]['openood_auroc']
print('CHECK ' + _json.dumps(_check))
'''


def test_notebook_is_stored_without_outputs():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == 'code']
    assert code and all(not c.outputs and c.execution_count is None for c in code)
    source = '\n'.join(c.source for c in code)
    assert 'XLA_FLAGS' not in source  # the notebook leaves the device setup to the user


def _kernel_manager(tmp_path) -> KernelManager:
    """A kernelspec that runs this very interpreter, so the kernel sees .venv's packages."""
    spec_dir = tmp_path / 'kernels' / KERNEL
    spec_dir.mkdir(parents=True)
    (spec_dir / 'kernel.json').write_text(json.dumps({
        'argv': [sys.executable, '-m', 'ipykernel_launcher', '-f', '{connection_file}'],
        'display_name': 'lmoe_jax test kernel', 'language': 'python'}))
    specs = KernelSpecManager(kernel_dirs=[str(tmp_path / 'kernels')])
    return KernelManager(kernel_name=KERNEL, kernel_spec_manager=specs)


@pytest.fixture(scope='module')
def executed(tmp_path_factory):
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nb.cells.append(nbformat.v4.new_code_cell(CHECK_CELL))
    env = {k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'}  # one device, as a user has
    env['PYTHONPATH'] = os.pathsep.join(p for p in (ROOT, env.get('PYTHONPATH')) if p)
    examples_dir = os.path.dirname(NOTEBOOK)
    km = _kernel_manager(tmp_path_factory.mktemp('kernelspec'))
    client = NotebookClient(nb, km=km, timeout=300, resources={'metadata': {'path': examples_dir}})
    try:
        client.execute(env=env)  # raises CellExecutionError with the traceback if a cell fails
    finally:
        if km.has_kernel:  # a kernel manager we pass in is not shut down by nbclient
            km.shutdown_kernel(now=True)
    return nb


def _stdout(cell) -> str:
    return ''.join(o.get('text', '') for o in cell.outputs if o.output_type == 'stream')


def test_notebook_runs_in_this_interpreter_on_one_device(executed):
    check = json.loads(_stdout(executed.cells[-1]).split('CHECK ', 1)[1])
    assert os.path.realpath(check['executable']) == os.path.realpath(sys.executable)
    assert check['devices'] == 1


def test_notebook_prints_sane_metrics(executed):
    text = '\n'.join(_stdout(c) for c in executed.cells[:-1] if c.cell_type == 'code')
    match = re.search(r'ID accuracy: ([\d.]+)%', text)
    assert match, f'no ID accuracy line in the notebook output:\n{text[-3000:]}'
    accuracy = float(match.group(1))
    assert 60.0 < accuracy <= 100.0  # chance is 1/6
    found = dict((row, (float(auroc), float(fpr))) for row, auroc, fpr in re.findall(
        r'(\w+) OOD \(MSP\): AUROC ([\d.]+)  FPR@95 ([\d.]+)', text))
    assert set(found) == {'fine', 'coarse'}
    for auroc, fpr in found.values():
        assert 0.0 <= auroc <= 100.0 and 0.0 <= fpr <= 100.0
    assert found['coarse'][0] > 65.0  # digits are far from garments after outlier exposure
    assert 'lmoe: step' in text and 'baseline: step' in text


def test_notebook_auroc_matches_sklearn(executed):
    check = json.loads(_stdout(executed.cells[-1]).split('CHECK ', 1)[1])
    # The check cell runs the model in one batch, ood_metrics in batches of 500: last-bit logit
    # differences can reorder near-tied MSP values, hence 1e-3. A flipped convention (ID as the
    # positive class) would give 1 - AUROC, far outside it.
    for row in ('fine', 'coarse'):
        assert check[row + '_reported'] == pytest.approx(check[row], abs=1e-3)
