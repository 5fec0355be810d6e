"""No import cycles among shrinkflow's modules, counting imports inside functions too.

A function-level import hides a cycle from Python's import machinery but not from a reader:
two modules that import each other are one module split in two. grimp builds the graph from
every ``import`` / ``from ... import`` statement of the package's source, wherever it stands.
"""

import sys

import grimp


def import_cycles(package: str) -> list[list[str]]:
    """Every cycle of ``package``'s import graph, each once: a shortest chain back to a module
    from each module it imports, rotated to start at its smallest name."""
    graph = grimp.build_graph(package, cache_dir=None)
    cycles = set()
    for module in graph.modules:
        for imported in graph.find_modules_directly_imported_by(module):
            chain = graph.find_shortest_chain(importer=imported, imported=module)
            if chain:
                cycle = [module, *chain[:-1]]
                start = cycle.index(min(cycle))
                cycles.add(tuple(cycle[start:] + cycle[:start]))
    return [list(c) for c in sorted(cycles)]


def test_shrinkflow_has_no_import_cycle():
    cycles = import_cycles("shrinkflow")
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join([*c, c[0]]) for c in cycles)


def test_a_cycle_through_a_function_level_import_is_found(tmp_path, monkeypatch):
    package = tmp_path / "cyclic"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "a.py").write_text("from cyclic import b\n")
    (package / "b.py").write_text("def f():\n    from cyclic.c import g\n")
    (package / "c.py").write_text("import cyclic.a\n")
    (package / "d.py").write_text("import cyclic.a\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert import_cycles("cyclic") == [["cyclic.a", "cyclic.b", "cyclic.c"]]
    sys.modules.pop("cyclic", None)
