"""The losses under their original import path (`oocid.losses.nce_loss`, `oocid.losses.softmax_loss`).

The code lives in `oocid.method`: the plain forms in `oocid.method.npid`, the fast ones beside it.
"""

from oocid.method.npid import infonce_loss, nce_loss, softmax_loss

__all__ = ["infonce_loss", "nce_loss", "softmax_loss"]
