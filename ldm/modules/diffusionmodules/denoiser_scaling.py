"""What the network predicts, under the names ``sgm`` configs use: ``EpsScaling`` (noise) or ``VScaling`` (v)."""
from __future__ import annotations


class EpsScaling:
    parameterization = "eps"


class VScaling:
    parameterization = "v"
