"""Network building blocks. ``GeneralConditioner`` is exported here, where ``sgm`` configs name it."""
from ldm.modules.encoders.conditioner import GeneralConditioner

__all__ = ["GeneralConditioner"]
