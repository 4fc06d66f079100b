"""The package's shape: one import package, rooms that import only downward,
no import circle anywhere (imports inside functions count too)."""
import ast
import subprocess
import sys
from pathlib import Path

from conftest import REPO

# room -> the rooms it may import (stepfuzz.fuzz's __init__ says why)
ALLOWED = {
    "oracle": set(),
    "fuzz.inputs": {"oracle"},
    "fuzz.harness": {"oracle", "fuzz.inputs", "fuzz.findings"},
    "fuzz.findings": {"oracle", "fuzz.inputs"},
    "fuzz.campaign": {"oracle", "fuzz.inputs", "fuzz.harness", "fuzz.findings"},
    "fuzz.cli": {"oracle", "fuzz.inputs", "fuzz.harness", "fuzz.findings", "fuzz.campaign"},
}


def modules() -> dict[str, Path]:
    out = {}
    for top in ("oracle", "fuzz"):
        for p in sorted((REPO / top).rglob("*.py")):
            rel = p.relative_to(REPO).with_suffix("")
            parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
            out["stepfuzz." + ".".join(parts)] = p
    return out


def imports(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    """Every stepfuzz module `name` imports, wherever the import statement is."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                pkg = package.split(".")
                pkg = pkg[:len(pkg) - node.level + 1]
                base = ".".join(pkg + ([base] if base else []))
            targets = [base] + [f"{base}.{a.name}" for a in node.names]
        else:
            continue
        for t in targets:
            while t and t not in known:
                t = t.rpartition(".")[0]
            if t and t != name and t.startswith("stepfuzz."):
                found.add(t)
    return found


def graph() -> dict[str, set[str]]:
    known = modules()
    return {name: imports(name, path, known) for name, path in known.items()}


def room(module: str) -> str:
    parts = module.split(".")[1:]
    return "oracle" if parts[0] == "oracle" else ".".join(parts[:2])


def test_no_import_circle():
    g = graph()
    state: dict[str, int] = {}
    path: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        path.append(m)
        for n in sorted(g[m]):
            if state.get(n) == 1:
                raise AssertionError("import circle: " + " -> ".join(path[path.index(n):] + [n]))
            if n not in state:
                visit(n)
        path.pop()
        state[m] = 2

    for m in sorted(g):
        if m not in state:
            visit(m)


def test_rooms_import_only_what_their_docstring_allows():
    bad = []
    for m, deps in graph().items():
        r = room(m)
        if r == "fuzz":            # the package's own __init__
            continue
        for d in deps:
            rd = room(d)
            if rd != r and rd not in ALLOWED[r]:
                bad.append(f"{m} imports {d}")
    assert not bad, bad


def test_every_room_says_what_it_owns():
    for init in [REPO / "oracle" / "__init__.py", REPO / "fuzz" / "__init__.py",
                 *sorted((REPO / "fuzz").glob("*/__init__.py"))]:
        doc = ast.get_docstring(ast.parse(init.read_text()))
        assert doc and "import" in doc.lower(), f"{init} needs a docstring saying what it owns and may import"


def test_one_top_level_import_package(tmp_path):
    """Installed, stepfuzz is importable from anywhere; the folder names are not."""
    code = ("import importlib.util as u, sys\n"
            "print(u.find_spec('stepfuzz.oracle.case') is not None,"
            " u.find_spec('oracle') is None, u.find_spec('fuzz') is None)")
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["True", "True", "True"], out.stdout + out.stderr
