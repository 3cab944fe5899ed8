"""The requirements files: requirements.txt holds what inference imports and nothing
more (a CPU machine that only fuses stacks installs no training or evaluation
packages); the -train, -eval and -test files cover what the other scripts import."""
import ast
import functools
import importlib.metadata
import re
import sys
from pathlib import Path

from conftest import REPO

INFERENCE = ("predict_one_stack.py", "predict_datasets.py", "predict_pair_datasets.py", "batch_inference.py",
             "Registration.py")
# a module inside one package that another distribution provides
PROVIDED_BY = {"torch.utils.tensorboard": "tensorboard"}


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def requirement_names(file_name: str) -> set:
    """Distribution names a requirements file asks for, following its -r lines."""
    names = set()
    for line in (REPO / file_name).read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line.startswith("-r"):
            names |= requirement_names(line[2:].strip())
        elif line:
            names.add(canonical(re.match(r"[A-Za-z0-9_.-]+", line).group()))
    return names


@functools.lru_cache(maxsize=None)
def _distributions() -> dict:
    return importlib.metadata.packages_distributions()


def _optional(tree) -> set:
    """Import nodes inside a try whose handler catches ImportError: optional by design."""
    nodes = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Try) and any(
                isinstance(h.type, ast.Name) and h.type.id in ("ImportError", "ModuleNotFoundError")
                for h in node.handlers):
            nodes |= {id(n) for statement in node.body for n in ast.walk(statement)}
    return nodes


def _is_local(top: str, folder: Path) -> bool:
    return any((root / f"{top}.py").is_file() or (root / top).is_dir() for root in (folder, REPO))


def _local_file(name: str, folder: Path):
    """The project file a module name refers to from a script in ``folder``, else None."""
    for root in (folder, REPO):
        path = root.joinpath(*name.split("."))
        for candidate in (path.with_suffix(".py"), path / "__init__.py"):
            if candidate.is_file():
                return candidate
    return None


def imported_distributions(scripts, optional_too=False) -> set:
    """Distributions the scripts import, directly or through the project's own modules:
    every import at the top or inside a function counts; one inside a try that catches
    ImportError (a feature that says what to install) counts only with ``optional_too``."""
    distributions = _distributions()
    todo, seen, found = [REPO / s for s in scripts], set(), set()
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        tree = ast.parse(path.read_text(), str(path))
        optional = _optional(tree)
        for node in ast.walk(tree):
            if id(node) in optional and not optional_too:
                continue
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                if _is_local(top, path.parent):
                    local = _local_file(name, path.parent)
                    todo += [local] if local else []
                elif name in PROVIDED_BY:
                    found.add(PROVIDED_BY[name])
                elif top not in sys.stdlib_module_names:
                    found.update(distributions.get(top, [top]))
    return {canonical(d) for d in found}


def scripts_in(folder: str):
    return [str(p.relative_to(REPO)) for p in sorted((REPO / folder).glob("*.py"))]


def test_requirements_txt_is_exactly_what_inference_imports():
    required, listed = imported_distributions(INFERENCE), requirement_names("requirements.txt")
    assert required <= listed, f"inference imports {required - listed}, which requirements.txt lacks"
    extra = listed - imported_distributions(INFERENCE, optional_too=True)
    assert not extra, f"requirements.txt asks for {extra}, which inference never imports"


def test_train_eval_and_test_files_cover_their_scripts():
    train = imported_distributions(["train.py", "dataset.py", *scripts_in("make_datasets")])
    assert train <= requirement_names("requirements-train.txt"), train - requirement_names("requirements-train.txt")
    evaluation = imported_distributions(["evaluate.py", "metrics.py", *scripts_in("bench")])
    assert evaluation <= requirement_names("requirements-eval.txt"), \
        evaluation - requirement_names("requirements-eval.txt")
    tests = imported_distributions(scripts_in("tests"))
    assert tests <= requirement_names("requirements-test.txt"), tests - requirement_names("requirements-test.txt")
    # the tests run every script, so their file holds everything
    assert requirement_names("requirements-train.txt") | requirement_names("requirements-eval.txt") <= \
        requirement_names("requirements-test.txt")
