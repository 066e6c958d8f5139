"""The code's shape: imports go one way (no cycles; the library imports no front end, tests and
benchmarks share code only through support/), and every library file stays readable alone."""

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PACKAGES = ("model", "tests", "benchmarks", "support")
MAX_LINES = 420  # "a few hundred lines": a file one reads in one sitting


def _module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _project_files() -> dict[str, Path]:
    files = {_module_name(p): p for package in PACKAGES for p in (REPO / package).rglob("*.py")}
    files.update({name: REPO / f"{name}.py" for name in ("app", "space")})
    return files


def _imports(path: Path, known: set[str]) -> set[str]:
    """The project modules `path` imports, at any depth (function-level imports count too)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        names = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        found.update(name for name in names if name in known)
    return found


def _graph() -> dict[str, set[str]]:
    files = _project_files()
    return {name: _imports(path, set(files)) - {name} for name, path in files.items()}


def _top(name: str) -> str:
    return name.split(".")[0]


def test_imports_go_one_way():
    graph = _graph()
    wrong = []
    for module, imported in graph.items():
        for target in imported:
            rule = {
                "model": {"model"},
                "support": {"model", "support", "app", "space"},
                "tests": {"model", "support", "tests", "app", "space"},
                "benchmarks": {"model", "support", "benchmarks"},
                "space": {"model"},
                "app": {"model", "space"},
            }[_top(module)]
            if _top(target) not in rule:
                wrong.append(f"{module} -> {target}")
    assert not wrong, wrong


def test_library_modules_import_no_cycle():
    # Package __init__ files that re-export lazily are left out: `model` names its public parts.
    graph = {m: {t for t in targets if t != "model"} for m, targets in _graph().items() if m != "model"}
    state = {}

    def visit(module, path):
        state[module] = "open"
        for target in graph.get(module, ()):
            if state.get(target) == "open":
                raise AssertionError(" -> ".join(path + [module, target]))
            if target not in state:
                visit(target, path + [module])
        state[module] = "done"

    for module in graph:
        if module not in state:
            visit(module, [])


def test_library_files_are_readable_alone():
    files = [p for p in (REPO / "model").rglob("*.py")] + [REPO / "app.py", REPO / "space.py"]
    long = {str(p.relative_to(REPO)): n for p in files if (n := len(p.read_text(encoding="utf-8").splitlines())) > MAX_LINES}
    assert not long, long


def test_the_space_installs_the_cpu_set_plus_jax_for_cuda_at_the_same_version():
    space = (REPO / "requirements.txt").read_text().splitlines()
    cpu = (REPO / "requirements-cpu.txt").read_text().splitlines()
    lines = [line for line in space if line and not line.startswith("#")]
    jax_pin = next(line for line in cpu if line.startswith("jax=="))
    assert lines == ["-r requirements-cpu.txt", jax_pin.replace("jax==", "jax[cuda12]==")]
    assert "-r requirements-cpu.txt" in (REPO / "requirements-dev.txt").read_text()  # tests stay CPU-only
