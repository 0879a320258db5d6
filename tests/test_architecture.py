"""The import contract (README "Architecture"), checked on every import statement of the tree — including the
ones inside functions, which an import-time check would miss:

* the core (``rooflab/``) imports neither Prefect, MLflow, typer, the Kubernetes client nor the app packages
  (``flows``, ``tasks``, ``tracking``, ``cli``, ``cluster``);
* the core's packages form layers, each importing only the layers below it (so no two import each other):
  base (errors, files, paths) < model < data < twin < replay < fit < collect < targeting < campaign < evaluation;
* the app layers: ``tracking`` imports no Prefect, ``flows``/``tasks``; ``tasks`` imports no ``flows`` or
  ``cli``; ``flows`` imports no ``cli``; ``cluster`` (services, the Kubernetes launcher) imports no Prefect, MLflow,
  ``flows``, ``tasks``, ``tracking`` or ``cli``;
* no module of the core is longer than ~500 lines without a written reason at its top.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LAYERS = ("base", "model", "data", "twin", "replay", "fit", "collect", "targeting", "campaign", "evaluation")
BASE_MODULES = {"errors", "files", "paths"}
APP = ("flows", "tasks", "tracking", "cli", "cluster")
CORE_FORBIDDEN = ("prefect", "mlflow", "typer", "kubernetes", "prefect_kubernetes", *APP)
MAX_LINES = 550  # "~500": a module over this needs its reason at the top
LONG_REASON = "Why this module is long:"


def _imports(path: Path) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import in the file, at any depth."""
    tree = ast.parse(path.read_text(), filename=str(path))
    pkg = ".".join(path.relative_to(ROOT).with_suffix("").parts[:-1])
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against the file's package
                base = pkg.split(".")[: len(pkg.split(".")) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            out.append((node.lineno, mod))
            # `from rooflab import fit` imports the subpackage rooflab.fit
            out += [(node.lineno, f"{mod}.{a.name}") for a in node.names if mod in ("rooflab",)]
    return out


def _layer(module: str) -> str | None:
    parts = module.split(".")
    if parts[0] != "rooflab" or len(parts) < 2:
        return None
    return "base" if parts[1] in BASE_MODULES else parts[1]


def _files(folder: str) -> list[Path]:
    return sorted(p for p in (ROOT / folder).rglob("*.py") if "__pycache__" not in p.parts)


def test_every_core_module_belongs_to_a_layer():
    for f in _files("rooflab"):
        rel = f.relative_to(ROOT / "rooflab")
        name = rel.parts[0].removesuffix(".py")
        assert name == "__init__" or _layer(f"rooflab.{name}") in LAYERS, \
            f"{f.relative_to(ROOT)}: not in a declared layer ({', '.join(LAYERS)})"


def test_the_core_imports_no_app_and_no_orchestration_library():
    bad = []
    for f in _files("rooflab"):
        for line, mod in _imports(f):
            if mod.split(".")[0] in CORE_FORBIDDEN:
                bad.append(f"{f.relative_to(ROOT)}:{line} imports {mod}")
    assert not bad, "the core must not import the app or Prefect/MLflow/typer:\n" + "\n".join(bad)


def test_core_layers_only_import_downwards():
    bad = []
    for f in _files("rooflab"):
        here = _layer(".".join(f.relative_to(ROOT).with_suffix("").parts))
        if here is None:  # rooflab/__init__.py
            continue
        for line, mod in _imports(f):
            there = _layer(mod)
            if there is None or there == here:
                continue
            if LAYERS.index(there) > LAYERS.index(here):
                bad.append(f"{f.relative_to(ROOT)}:{line} ({here}) imports {mod} ({there}, a higher layer)")
    assert not bad, "layer order " + " < ".join(LAYERS) + " broken:\n" + "\n".join(bad)


@pytest.mark.parametrize("folder,forbidden", [("tracking", ("prefect", "flows", "tasks", "cli")),
                                              ("tasks", ("flows", "cli")), ("flows", ("cli",)),
                                              ("cluster", ("prefect", "mlflow", "flows", "tasks", "tracking", "cli"))])
def test_app_layers(folder, forbidden):
    bad = [f"{f.relative_to(ROOT)}:{line} imports {mod}" for f in _files(folder) for line, mod in _imports(f)
           if mod.split(".")[0] in forbidden]
    assert not bad, "\n".join(bad)


def test_long_modules_say_why():
    long = []
    for folder in ("rooflab", *APP):
        for f in _files(folder):
            text = f.read_text()
            n = text.count("\n")
            if n > MAX_LINES and LONG_REASON not in text[:3000]:
                long.append(f"{f.relative_to(ROOT)}: {n} lines")
    assert not long, f"modules over {MAX_LINES} lines without '{LONG_REASON} …' at the top:\n" + "\n".join(long)


def test_the_contract_finds_a_violation(tmp_path):
    """The checks above can fail: a fake core module importing upwards and the app is caught."""
    fake = ROOT / "rooflab" / "model" / "_contract_probe.py"
    fake.write_text("def f():\n    from rooflab.fit import beta\n    import mlflow\n")
    try:
        mods = [m for _, m in _imports(fake)]
        assert "rooflab.fit" in mods and "mlflow" in mods
        assert LAYERS.index(_layer("rooflab.fit")) > LAYERS.index(_layer("rooflab.model._contract_probe"))
        with pytest.raises(AssertionError):
            test_the_core_imports_no_app_and_no_orchestration_library()
        with pytest.raises(AssertionError):
            test_core_layers_only_import_downwards()
    finally:
        fake.unlink()
