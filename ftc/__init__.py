"""ftc: a pipeline-parallel compiler for PyTorch.

The compiler lives in this package (frontends, profiling, passes, backend, cli); the IR and the
runtime install beside it as ftc.ir and ftc.runtime.
"""

__version__ = "0.1.0"
