"""The one walk over Python frames that the tracing watchers share (frontends/common.py: callers)."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from ftc.frontends.common import FTC_FILES, TORCH_FILES, callers


def test_a_package_beside_torch_is_not_taken_for_torch():
    """torch's folder is a prefix of its siblings' (site-packages/torch of site-packages/
    torchvision): a frame running a sibling's file is a library's code, which the watchers name,
    not torch's, which they pass over, as a frame in torch's own folder is."""
    torch_dir = Path(torch.__file__).parent
    made_in = {}
    for where in (torch_dir.with_name(torch_dir.name + "vision") / "models.py", torch_dir / "nn" / "made_up.py"):
        code = compile("frame = sys._getframe()\nfound = next(callers(frame, TORCH_FILES + FTC_FILES), None)",
                       str(where), "exec")  # fmt: skip
        scope = {"sys": sys, "callers": callers, "TORCH_FILES": TORCH_FILES, "FTC_FILES": FTC_FILES}
        exec(code, scope)
        made_in[where.parent.name] = scope["found"] is scope["frame"]
    assert made_in == {"torchvision": True, "nn": False}, made_in
