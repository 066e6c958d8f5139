"""No pickle anywhere: no Python file of the project imports a pickling module or calls a loader that
unpickles (weights are msgpack or safetensors; `model.checkpoint` refuses pickle-only folders)."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PICKLING_MODULES = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "joblib", "shelve", "marshal"}
UNPICKLING_CALLS = {"torch.load", "read_pickle", "load_state_dict_from_url"}


def _project_files():
    skipped = {".venv", "runs", ".git", "test-outputs", "node_modules"}
    return [path for path in ROOT.rglob("*.py") if not skipped & set(path.relative_to(ROOT).parts)]


def _dotted(node) -> str:
    if isinstance(node, ast.Attribute):
        return f"{_dotted(node.value)}.{node.attr}"
    return node.id if isinstance(node, ast.Name) else ""


def pickle_uses(source: str) -> list[str]:
    """Imports of pickling modules, unpickling calls and allow_pickle=True in one file's source."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [f"import {a.name}" for a in node.names if a.name.split(".")[0] in PICKLING_MODULES]
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in PICKLING_MODULES:
            found.append(f"from {node.module} import ...")
        elif isinstance(node, ast.Call):
            name = _dotted(node.func)
            if name in UNPICKLING_CALLS or name.rsplit(".", 1)[-1] in UNPICKLING_CALLS - {"torch.load"}:
                found.append(f"{name}(...) at line {node.lineno}")
            for keyword in node.keywords:
                if keyword.arg == "allow_pickle" and not (isinstance(keyword.value, ast.Constant)
                                                          and keyword.value.value is False):
                    found.append(f"allow_pickle at line {node.lineno}")
    return found


def test_the_checker_finds_pickle():
    assert pickle_uses("import pickle\nfrom joblib import load\nnp.load(f, allow_pickle=True)\ntorch.load(f)") == [
        "import pickle", "from joblib import ...", "allow_pickle at line 3", "torch.load(...) at line 4"]
    assert pickle_uses("np.load(f, allow_pickle=False)\nimport json") == []


@pytest.mark.parametrize("path", _project_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_no_project_file_uses_pickle(path):
    assert pickle_uses(path.read_text()) == []
