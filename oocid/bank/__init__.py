"""The memory bank: on disk (`store`; its rows in `rows`, metadata in `meta`, crash-safe commits
through `journal`; made by `create`, checked by `verify`), cached on the device (`cache` over
`slots`, sized by `sizing`, disk I/O in `io_thread`), or held whole (`incore`), with one trainer
per bank (`lock`)."""

from oocid.method.npid import momentum_update

__all__ = ["momentum_update"]
