"""Training: one loop (:func:`train`, in ``loop.py``) over an engine (``engine.py``: the interface;
``engine_plain.py``: one process; ``engine_deepspeed.py``: DeepSpeed ZeRO), atomic checkpoints, the data stream,
the models of a run, validation grids."""

from fastinpo.train.loop import train

__all__ = ["train"]
