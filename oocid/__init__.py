"""oocid: out-of-core instance discrimination (NPID, Wu et al., CVPR 2018).

Modules, one job each:
    losses      NCE, exact softmax, sampled softmax (pure functions)
    bank        the momentum update and bank initialisation (pure functions)
    store       the on-disk bank: Zarr v3 or numpy memmap, crash-safe chunk commits
    shards      image folder / npz -> WebDataset tar shards + manifest
    stream      shards -> decoded, augmented batches
    models      backbones + 128-d L2-normalised head
    knn         weighted kNN scoring
    config      typed run configuration
    train       the training loop
    checkpoint  atomic, self-sufficient checkpoints
    cli         the `oocid` command
"""

__version__ = "0.1.0"
