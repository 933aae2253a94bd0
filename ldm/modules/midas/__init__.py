"""MiDaS v3 DPT-Hybrid relative depth, as SD 2's depth-to-image model embeds it (``depth_model``).

``api.MiDaSInference`` is the depth stage configs name; ``dpt`` / ``backbone`` build the network with the
key names of MiDaS' ``dpt_hybrid-midas-501f0c75.pt``. Nothing here downloads or reads a file on its own.
"""
