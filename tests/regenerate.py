"""Rewrite the committed example pipelines under generated/ (`make regenerate`).

tests/test_generated.py compiles the same examples with the same settings and fails on any
byte difference, so the committed outputs always show what the current compiler writes.
"""

from __future__ import annotations

from pathlib import Path

from ftc.compiler import CompileOptions, compile_model

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ("gpt", "mlp", "resnet", "unet", "two_tower")
# The settings `make demo` uses, so the demo rewrites its example byte for byte.
STAGES = 4


def regenerate(root: Path = ROOT, names: tuple[str, ...] = EXAMPLES) -> list[Path]:
    """Compile each example in root/examples into root/generated; return the folders."""
    options = CompileOptions(stages=STAGES, force=True)
    return [compile_model(root / "examples" / f"{name}.py", root / "generated", options).folder for name in names]


if __name__ == "__main__":
    for folder in regenerate():
        print(f"wrote {folder.relative_to(ROOT)}")
