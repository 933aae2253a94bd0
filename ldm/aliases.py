"""Published target names of other code bases that map onto this package's classes.

Stability's ``sgm`` YAMLs name ``sgm.*`` classes; the table lists each one we implement, so those
files build unchanged without trusting any other package. A name that is not here is refused.
"""
from __future__ import annotations

TARGET_ALIASES: dict[str, str] = {}
