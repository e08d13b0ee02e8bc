"""Training: the loop, its checkpoints' pairing with the bank, and optional TensorBoard logs."""

from oocid.train.loop import train

__all__ = ["train"]
