"""Several processes over one bank, launched by torchrun (docs/distributed.md).

`world` reads torchrun's environment and wraps the few collectives the trainer needs;
`partition` deals the shards (and with them the bank's chunks) to ranks; `rank_store` is one
rank's view of the bank and the two-phase commit of a step's parts; `merge` joins per-rank
kNN candidates. A world of one (plain `oocid train`) uses none of it.
"""
