"""The runtime never imports the compiler (DESIGN.md): a training process, and each rank of
mode dist, loads the runtime alone. Every module of runtime/ is imported, so that a module split
off another (as train.py's were) keeps to it too."""

import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_the_runtime_modules_import_nothing_of_the_compiler():
    modules = sorted(path.stem for path in (ROOT / "runtime").glob("*.py") if path.stem != "__init__")
    assert {"train", "preflight", "results", "resume", "reference"} <= set(modules)
    probe = textwrap.dedent(f"""
        import importlib
        import sys
        for module in {modules!r}:
            importlib.import_module("ftc.runtime." + module)
        print(sorted(m for m in sys.modules if m.startswith("ftc.") and m.split(".")[1] not in ("ir", "runtime")))
    """)
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]", done.stdout
