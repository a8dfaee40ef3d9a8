"""The package's layout is its architecture: imports flow downward, and no module reaches into another.

    main, flags            the command line (only they touch FLAGS; only main touches absl.app)
    training               the run: modes, phases, run directory, checkpoints, strategies
    reporting, serving     evaluation, images and TensorBoard; export and predict (which decode images
                           as data/ does)
    data, model            where examples come from; backbones and the classifier
    config                 the validated settings (it reads the backbone registry, plain data)
    errors, files          the one user-facing error, the one atomic writer
"""

import ast
import os
import shutil

from helpers import REPO

PACKAGE = "tl_keras"
# What each part may import, besides itself. Everything else is a violation.
ALLOWED = {
    PACKAGE: set(),  # __init__.py: the version only.
    "errors": set(),
    "files": set(),
    "config": {"errors", "model.registry"},
    "data": {"errors", "files", "config"},
    "model": {"errors", "files"},
    "reporting": {"errors", "files", "config", "data", "model"},
    "serving": {"errors", "files", "config", "data", "model"},
    "training": {"errors", "files", "config", "data", "model", "reporting", "serving"},
    "flags": {"errors", "config", "model.registry"},
    "main": {"errors", "flags", "training"},
}
FLAGS_USERS = {"main", "flags"}


def _part(module: str) -> str:
    """'tl_keras.model.classifier' -> 'model'; 'tl_keras.config' -> 'config'."""
    return module.split(".")[1] if module.count(".") else module


def _allows(part: str, target: str) -> bool:
    target_part = _part(target)
    if target_part == part:
        return True
    allowed = ALLOWED[part]
    return target_part in allowed or ".".join(target.split(".")[1:3]) in allowed


def _module_name(root: str, path: str) -> str:
    relative = os.path.relpath(path, os.path.dirname(root))[: -len(".py")]
    parts = relative.split(os.sep)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def find_violations(root: str) -> list:
    """Every broken layout rule under the package directory `root`, as 'file:line: what' lines."""
    problems = []
    for directory, _, names in os.walk(root):
        for name in sorted(names):
            if not name.endswith(".py"):
                continue
            path = os.path.join(directory, name)
            module = _module_name(root, path)
            part = _part(module)
            where = os.path.relpath(path, os.path.dirname(root))
            if part not in ALLOWED:
                problems.append(f"{where}: {part} is not a known part of the layout; add it to ALLOWED")
                continue
            with open(path, encoding="utf-8") as f:
                tree = ast.parse(f.read(), path)
            imported_modules = {}  # local name -> tl_keras module it is bound to
            for node in ast.walk(tree):
                targets = []
                if isinstance(node, ast.Import):
                    targets = [(alias.name, alias.asname or alias.name, None) for alias in node.names]
                elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                    targets = [(f"{node.module}.{alias.name}", alias.asname or alias.name, alias.name)
                               for alias in node.names]
                    if node.module == "absl" and any(a.name == "app" for a in node.names) and part != "main":
                        problems.append(f"{where}:{node.lineno}: imports absl.app; only main may")
                for target, local, name in targets:
                    if not target.startswith(PACKAGE + "."):
                        continue
                    imported_modules[local] = target
                    if name and name.startswith("_"):
                        problems.append(f"{where}:{node.lineno}: imports the private name {target}")
                    if not _allows(part, target):
                        problems.append(
                            f"{where}:{node.lineno}: imports {target}, but {part} may import only "
                            f"{', '.join(sorted(ALLOWED[part])) or 'nothing of tl_keras'} "
                            "(imports flow downward)")
            for node in ast.walk(tree):
                if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
                        and node.value.id in imported_modules):
                    if node.attr.startswith("_") and not node.attr.startswith("__"):
                        problems.append(f"{where}:{node.lineno}: uses the private name "
                                        f"{imported_modules[node.value.id]}.{node.attr}")
                if isinstance(node, ast.Name) and node.id == "FLAGS" and part not in FLAGS_USERS:
                    problems.append(f"{where}:{node.lineno}: reads FLAGS; the library gets a Config")
    return problems


def test_imports_flow_downward():
    problems = find_violations(os.path.join(REPO, PACKAGE))
    assert not problems, "\n".join(problems)


def test_a_broken_rule_is_reported(tmp_path):
    """The check itself can fail: an upward import, a private name and FLAGS in the library."""
    root = tmp_path / PACKAGE
    shutil.copytree(os.path.join(REPO, PACKAGE), root, ignore=shutil.ignore_patterns("__pycache__"))
    with open(root / "model" / "classifier.py", "a", encoding="utf-8") as f:
        f.write("\nfrom tl_keras.training import run_dir  # noqa\n")
    with open(root / "serving" / "predict.py", "a", encoding="utf-8") as f:
        f.write("\nfrom tl_keras.serving.export import _private  # noqa\nFLAGS = None\n")
    problems = find_violations(str(root))
    print("\n".join(problems))
    assert len(problems) == 3, problems
    assert any("model/classifier.py" in p and "imports tl_keras.training.run_dir, but model may import "
               "only errors, files (imports flow downward)" in p for p in problems)
    assert any("serving/predict.py" in p and "private name tl_keras.serving.export._private" in p
               for p in problems)
    assert any("serving/predict.py" in p and "reads FLAGS" in p for p in problems)
