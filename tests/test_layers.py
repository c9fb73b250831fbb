"""The package's layers: every module imports only from layers below its own (or its own package).

    errors -> spec, fsutil, runtime -> config, kernels, gguf, charts, run_dir      (foundations)
           -> models | losses | data                                            (peers: never each other)
           -> teachers -> eval | hybrid -> train -> report -> demo -> study -> cli

Function-level imports count as much as top-level ones: a lazy import does not make a cycle go
away. docs/architecture.md draws the same picture.
"""

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "distil"
RANK = {
    "errors": 0,
    "spec": 1, "fsutil": 1, "runtime": 1,
    "config": 2, "kernels": 2, "gguf": 2, "charts": 2, "run_dir": 2,
    "models": 10, "losses": 10, "data": 10,
    "teachers": 20,
    "eval": 30, "hybrid": 30,
    "train": 31,
    "report": 40,
    "demo": 41,
    "demo_real": 42,
    "study": 42,
    "cli": 50,
    "__main__": 51,
    "__init__": 99,  # the package's own __init__: re-exports only
}


def _unit(module: str) -> str:
    """'distil.train.loop' -> 'train'; 'distil' -> '__init__'."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _imports():
    for path in sorted(SRC.rglob("*.py")):
        rel = path.relative_to(SRC.parent).with_suffix("")
        module = ".".join(rel.parts).removesuffix(".__init__")
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                if node.module == "distil" and [a.name for a in node.names] == ["__version__"]:
                    continue  # the version string, a constant of the package root
                names = [node.module]
            elif isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            else:
                continue
            for name in names:
                if name == "distil" or name.startswith("distil."):
                    yield module, name, f"{path.relative_to(SRC.parent)}:{node.lineno}"


def test_every_unit_has_a_rank():
    units = {_unit(".".join(p.relative_to(SRC.parent).with_suffix("").parts)) for p in SRC.rglob("*.py")}
    assert units <= set(RANK), f"give these a layer in RANK (and docs/architecture.md): {sorted(units - set(RANK))}"


def test_imports_point_down_the_layers():
    upward = []
    for importer, imported, where in _imports():
        mine, theirs = _unit(importer), _unit(imported)
        if mine == theirs:
            continue
        if RANK[theirs] >= RANK[mine]:
            upward.append(f"{where}: {importer} (layer {RANK[mine]}) imports {imported} (layer {RANK[theirs]})")
    assert not upward, "imports against the layer order:\n" + "\n".join(upward)


def test_the_check_sees_lazy_imports(tmp_path):
    """The walk finds imports inside functions (a lazy import is still an import)."""
    found = [(a, b) for a, b, _ in _imports() if a == "distil.cli"]
    assert any(b.startswith("distil.train") for _, b in found)
