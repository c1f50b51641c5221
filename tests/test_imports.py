"""The house's floors: the two entry points, train.py and generate.py, import nothing from each other, and no
other file of the project imports either of them: every import points down or sideways, never up."""
import ast
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ENTRY_POINTS = {"train", "generate"}


def imported(path):
    """The top-level names a file imports (absolute imports only: weights/' own are relative)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    return {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import)
            for alias in node.names} | {node.module.split(".")[0] for node in ast.walk(tree)
                                        if isinstance(node, ast.ImportFrom) and node.module and not node.level}


def test_importing_an_entry_point_loads_not_the_other():
    for entry in sorted(ENTRY_POINTS):
        run = subprocess.run([sys.executable, "-c", f"import sys, {entry}; print(sorted(set(sys.modules) & "
                                                    f"{ENTRY_POINTS - {entry}!r}))"],
                             cwd=REPO, capture_output=True, text=True, timeout=300)
        assert run.returncode == 0 and run.stdout.strip() == "[]", (entry, run.stdout, run.stderr[-2000:])


def test_no_file_imports_an_entry_point():
    for path in [*REPO.glob("*.py"), *REPO.glob("weights/*.py")]:
        assert not imported(path) & ENTRY_POINTS - {path.stem}, f"{path.name} imports an entry point"
