from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
MODELS = ROOT / "tests" / "models"


@pytest.fixture
def compile_to(tmp_path):
    """compile_to(model_path, stages, **options) -> the generated folder, in a fresh tmp dir."""
    from ftc.compiler import CompileOptions, compile_model

    def run(model_path, stages, **options):
        return compile_model(model_path, tmp_path / "out", CompileOptions(stages=stages, **options)).folder

    return run


def stdlib_modules() -> set[str]:
    return set(sys.stdlib_module_names)
