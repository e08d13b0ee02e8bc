"""The memory bank: on disk (`store`, crash-safe commits), cached on the device (`cache`), or held
whole (`incore`), with one trainer per bank (`lock`)."""

from oocid.method.npid import momentum_update

__all__ = ["momentum_update"]
