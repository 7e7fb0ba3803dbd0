"""The package's layout: the library never imports the CLI, no two modules import each other in a cycle, and every
command documents its options and shows an example."""

from __future__ import annotations

import argparse
import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "snapfusion"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    """Every module of the package by dotted name (packages by their own name)."""
    return {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    """Modules of the package that ``name`` imports anywhere (module level or inside functions).

    ``import a.b.c`` and ``from a.b import c`` (``c`` a module) are edges to ``a.b.c``; ``from a.b import x`` (``x``
    a name) is an edge to ``a.b``. Relative imports are resolved against ``name``'s package."""
    is_package = path.name == "__init__.py"
    package = name if is_package else name.rpartition(".")[0]
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            for alias in node.names:
                sub = f"{source}.{alias.name}"
                out.add(sub if sub in known else source)
    return {m for m in out if m in known and m != name}


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(name, path, set(modules)) for name, path in modules.items()}


def _find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of the directed graph as [a, b, ..., a], or None (iterative depth-first search)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    for root in sorted(graph):
        if state.get(root):
            continue
        path, stack = [root], [iter(sorted(graph[root]))]
        state[root] = 1
        while stack:
            nxt = next(stack[-1], None)
            if nxt is None:
                state[path.pop()] = 2
                stack.pop()
            elif state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            elif not state.get(nxt):
                state[nxt] = 1
                path.append(nxt)
                stack.append(iter(sorted(graph[nxt])))
    return None


def _is_cli(module: str) -> bool:
    return module == "snapfusion.cli" or module.startswith("snapfusion.cli.")


def test_the_scan_sees_the_package_and_the_cli_importing_it():
    graph = _graph()
    assert len(graph) > 30
    cli_uses = set().union(*(deps for m, deps in graph.items() if _is_cli(m)))
    assert {"snapfusion.loading", "snapfusion.errors", "snapfusion.train.stages"} <= cli_uses
    assert "snapfusion.cli.options" in graph["snapfusion.cli.train"]  # a relative-free package-internal edge


def test_the_scan_resolves_relative_imports(tmp_path):
    pkg = tmp_path / "snapfusion" / "sub"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("from . import b\n")
    (pkg / "a.py").write_text("def f():\n    from ..top import x\n    from .b import y\n")
    known = {"snapfusion.top", "snapfusion.sub", "snapfusion.sub.a", "snapfusion.sub.b"}
    assert _imports("snapfusion.sub.a", pkg / "a.py", known) == {"snapfusion.top", "snapfusion.sub.b"}
    assert _imports("snapfusion.sub", pkg / "__init__.py", known) == {"snapfusion.sub.b"}


def test_the_cycle_finder_finds_cycles():
    assert _find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert _find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_the_library_never_imports_the_cli():
    offenders = {m: sorted(d for d in deps if _is_cli(d)) for m, deps in _graph().items() if not _is_cli(m)}
    assert {m: d for m, d in offenders.items() if d} == {}


def test_no_import_cycle():
    cycle = _find_cycle(_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def _commands() -> dict[str, argparse.ArgumentParser]:
    from snapfusion.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(sub.choices)


def test_every_command_has_help_for_every_option_and_an_example():
    commands = _commands()
    assert len(commands) >= 20 and {"generate", "train-unet", "evolve", "export", "distill-decoder"} <= set(commands)
    missing = {}
    for name, parser in commands.items():
        bad = [a.option_strings[0] if a.option_strings else a.dest for a in parser._actions
               if not isinstance(a, argparse._HelpAction) and not (a.help and a.help.strip())]
        if bad:
            missing[name] = bad
        if "example: snapfusion " + name not in (parser.epilog or ""):
            missing.setdefault(name, []).append("epilog example")
    assert missing == {}


def test_top_level_help_lists_the_commands_by_group():
    from snapfusion.cli import build_parser

    text = build_parser().format_help()
    groups = [text.index(g) for g in ("use:", "serve:", "train:", "compress:", "export:")]
    assert groups == sorted(groups)
    for name in _commands():
        assert f" {name} " in text or f" {name}\n" in text, name


MAX_MODULE_LINES = 500


def _long_modules(root: Path, limit: int = MAX_MODULE_LINES) -> dict[str, int]:
    """Python files under ``root`` with more than ``limit`` lines, by path relative to ``root``."""
    lengths = {str(p.relative_to(root)): len(p.read_text().splitlines()) for p in sorted(root.rglob("*.py"))}
    return {name: n for name, n in lengths.items() if n > limit}


def test_the_length_check_finds_long_modules(tmp_path):
    (tmp_path / "short.py").write_text("x = 1\n" * 500)
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "long.py").write_text("x = 1\n" * 501)
    assert _long_modules(tmp_path) == {"sub/long.py": 501}


def test_no_module_over_500_lines():
    offenders = _long_modules(PACKAGE)
    assert offenders == {}, "modules over 500 lines: " + ", ".join(f"{m} ({n})" for m, n in offenders.items())
