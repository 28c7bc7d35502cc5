"""ftc.runtime: load a generated pipeline and run it. Never imports the compiler."""

from .local import LocalExecutor
from .model_file import ModelFile, load_model_file
from .pipeline import Pipeline, StageSpec, load_pipeline

__all__ = ["LocalExecutor", "ModelFile", "Pipeline", "StageSpec", "load_model_file", "load_pipeline"]
