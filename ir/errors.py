"""The one error type ftc raises for problems a user can fix.

It lives in ftc.ir because every part (compiler, runtime) may raise it and ftc.ir depends on
nothing else of ours. The CLI prints `message` (and `hint`, what to do) without a traceback.
"""


class FtcError(Exception):
    def __init__(self, message: str, hint: str = ""):
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return f"{self.message}\n  fix: {self.hint}" if self.hint else self.message
