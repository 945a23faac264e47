"""Training: the loop, checkpoints, the data stream, the models of a run."""

from fastinpo.train.loop import train

__all__ = ["train"]
