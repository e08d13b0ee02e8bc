"""The end-of-epoch kNN check of a run's `--val` shards against its bank (`Evaluator`)."""

from __future__ import annotations

import torch

from oocid.data.batch import image_channels
from oocid.data.eval_data import eval_batches
from oocid.distributed.merge import topk_across
from oocid.distributed.partition import global_rows
from oocid.eval.classes import class_map, training_labels
from oocid.eval.embed import iter_features
from oocid.eval.evaluate import knn_streamed, num_classes_of, read_labels, tensor_chunks
from oocid.train.state import RunState


class Evaluator:
    """The end-of-epoch weighted kNN of the validation shards against the bank, streamed: each
    evaluation reads the shards again batch by batch (`eval_batches`), embeds each batch and
    scores it in blocks against the bank (`knn_streamed`), so device memory holds a batch, a
    block of queries with its top-k and a block of bank rows, never the validation set; with
    several processes, the same with each block's top-k merged across them (`topk_across`)."""

    def __init__(self, run: RunState) -> None:
        assert run.val_manifest is not None
        self.run, self.val = run, run.val_manifest
        labels = read_labels(run.manifest)
        self.num_classes = num_classes_of(run.manifest, labels)
        # this process's rows of the bank (all of them with one process)
        self.train_labels = torch.from_numpy(labels[global_rows(run.local or run.manifest)])
        # the validation labels as training labels: classes matched by name (oocid.eval.classes)
        self.classes = class_map(run.manifest, self.val, self.val.root)

    def __call__(self) -> dict[str, float]:
        run, cfg, bank = self.run, self.run.cfg, self.run.bank
        batches = eval_batches(self.val, cfg.data, run.device,
                               channels=image_channels(run.manifest))
        # No flush: the bank on disk stays paired with the last checkpoint, so a kill during the
        # scan loses nothing (docs/design.md, "Checkpoints and resume").
        chunks = (lambda: tensor_chunks(bank.all_rows())) if bank.full else bank.rows_now
        c = self.num_classes
        world, k = run.world, cfg.train.knn_k
        # several processes: rank 0's features for all (each process's BatchNorm statistics
        # are its own; rank 0's model is the one the checkpoint keeps), each scores its part
        # of the bank and k candidates per query are merged
        queries = ((world.broadcast_tensor(f), training_labels(y, self.classes, self.val.root))
                   for _, f, y in iter_features(run.model, batches, cfg.model.channels_last))
        topk = (lambda q, rows: topk_across(world, q, rows, self.train_labels, k)) \
            if world.distributed else None
        acc = knn_streamed(queries, chunks, self.train_labels, k, cfg.train.knn_temperature, c,
                           topk=topk)
        # With 5 classes or fewer every query's class is within the top 5: not worth a column.
        return {"knn_top1": acc["top1"], **({"knn_top5": acc["top5"]} if c > 5 else {})}
