"""The on-disk cache of measured profiles: one JSON file per profile (measurement.Measurement.to_json:
node name -> costs, the stage call's and the loss's).

Measuring takes real time on real tensors, so a compile that changes only the stage count or
the partitioner reads the profile back. A profile is filed under the sha256 of its key, a JSON
object naming everything its times depend on (profile_key.profile_key), and the file repeats the
key, so a hash collision or a stale format reads as a miss.

The folder is $FTC_CACHE_DIR, else ~/.cache/ftc/profiles. Files are written to a temporary
name and renamed, so a reader never sees half a file; an unreadable file counts as a miss and
is overwritten.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

FORMAT = "ftc-profile/2"  # 2: the stage call and the loss beside the nodes


def default_cache_dir() -> Path:
    return Path(os.environ.get("FTC_CACHE_DIR") or Path.home() / ".cache" / "ftc" / "profiles")


class ProfileCache:
    def __init__(self, directory: str | Path | None = None):
        self.directory = Path(directory) if directory is not None else default_cache_dir()

    def path(self, key: dict) -> Path:
        digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()
        return self.directory / f"{digest}.json"

    def load(self, key: dict) -> dict | None:
        """The cached profile for `key`, or None when there is none or the file is unreadable."""
        try:
            data = json.loads(self.path(key).read_text())
        except (OSError, ValueError):
            return None
        if not isinstance(data, dict) or data.get("format") != FORMAT or data.get("key") != key:
            return None
        profile = data.get("profile")
        return profile if isinstance(profile, dict) else None

    def store(self, key: dict, profile: dict) -> Path:
        path = self.path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        data = {"format": FORMAT, "key": key, "profile": profile}
        handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(handle, "w") as file:
                json.dump(data, file, indent=1)
            os.replace(temporary, path)
        except BaseException:
            Path(temporary).unlink(missing_ok=True)
            raise
        return path
