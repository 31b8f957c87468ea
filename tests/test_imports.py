"""No circular imports in the package or among the benchmark scripts.

Read statically from the source (``ast``), counting imports inside functions too: a cycle hidden
in a function still ties two modules together, and importing it lazily only moves the failure to
the first call. Python's own ``graphlib`` finds the cycle.
"""
import ast
import graphlib
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _module_names(folder: pathlib.Path, prefix: str) -> dict[str, pathlib.Path]:
    """Dotted module name -> file, for every .py under ``folder`` (a package's __init__ is the package)."""
    names = {}
    for path in sorted(folder.rglob('*.py')):
        parts = list(path.relative_to(folder).with_suffix('').parts)
        if parts[-1] == '__init__':
            parts = parts[:-1]
        names['.'.join([prefix, *parts] if prefix else parts)] = path
    return names


def _imported(tree: ast.AST, module: str, is_package: bool) -> set[str]:
    """Every dotted name ``module`` imports (``from a import b`` gives ``a`` and ``a.b``)."""
    package = module if is_package else module.rpartition('.')[0]
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ''
            if node.level:  # relative: climb level-1 packages from this one
                anchor = package.split('.')[:len(package.split('.')) - (node.level - 1)]
                base = '.'.join(anchor + ([base] if base else []))
            out.add(base)
            out.update(f'{base}.{alias.name}' for alias in node.names)
    return out


def import_graph(modules: dict[str, pathlib.Path]) -> dict[str, set[str]]:
    """module -> the modules of ``modules`` it imports, with the packages it passes through.

    Importing ``a.b.c`` runs ``a/__init__`` and ``a/b/__init__`` too, unless the importer is
    inside them already (then they are being imported, not imported anew).
    """
    graph = {}
    for name, path in modules.items():
        targets = set()
        for imported in _imported(ast.parse(path.read_text()), name, path.name == '__init__.py'):
            parts = imported.split('.')
            for i in range(1, len(parts) + 1):
                target = '.'.join(parts[:i])
                inside = name == target or name.startswith(target + '.')
                if target in modules and not inside:
                    targets.add(target)
        graph[name] = targets
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as ``[a, b, ..., a]``, or None."""
    try:
        graphlib.TopologicalSorter(graph).prepare()
    except graphlib.CycleError as e:
        return list(e.args[1])
    return None


def test_find_cycle_sees_a_cycle_through_a_function_level_import(tmp_path):
    """The checker itself: a two-module cycle (one side inside a function) and a clean tree."""
    (tmp_path / 'pkg').mkdir()
    (tmp_path / 'pkg' / '__init__.py').write_text('')
    (tmp_path / 'pkg' / 'a.py').write_text('from pkg import b\n')
    (tmp_path / 'pkg' / 'b.py').write_text('def f():\n    from . import a\n')
    (tmp_path / 'pkg' / 'c.py').write_text('import pkg.b\n')
    graph = import_graph(_module_names(tmp_path / 'pkg', 'pkg'))
    assert graph['pkg.b'] == {'pkg.a'} and graph['pkg.c'] == {'pkg.b'}
    assert set(find_cycle(graph)) == {'pkg.a', 'pkg.b'}
    (tmp_path / 'pkg' / 'b.py').write_text('import os\n')
    assert find_cycle(import_graph(_module_names(tmp_path / 'pkg', 'pkg'))) is None


@pytest.mark.parametrize('folder,prefix', [('lmoe_jax', 'lmoe_jax'), ('benchmarks', '')])
def test_no_import_cycles(folder, prefix):
    """The package's modules, and the benchmark scripts (which import each other by bare name)."""
    modules = _module_names(ROOT / folder, prefix)
    assert len(modules) > 5, modules
    cycle = find_cycle(import_graph(modules))
    assert cycle is None, f'import cycle: {" -> ".join(cycle)}'
