"""Weighted kNN under its original import path (`oocid.knn.weighted_knn`); the code lives in
`oocid.method.knn`."""

from oocid.method.knn import weighted_knn

__all__ = ["weighted_knn"]
