"""Quality figures of the embedded demo, computed from the demo corpus's known ground truth.

- :mod:`~mdm_dist.eval.classifier`: a pixel-statistics classifier of a demo image's colour and
  shape (background from the border, foreground colour by nearest palette colour, shape by the
  nearest rendered silhouette), used to score text-to-image samples.
- :mod:`~mdm_dist.eval.captions`: does a caption name a scene's colour and shape (word match),
  used to score image-to-text samples.
- :mod:`~mdm_dist.eval.heldout`: the demo's evaluation (t2i and i2t on the held-out set, grids).
- :mod:`~mdm_dist.eval.conditioning`: how much a model relies on its conditions (its training
  loss with true vs shuffled conditions; any MDS data).
"""

from mdm_dist.eval.captions import caption_names, named_attributes
from mdm_dist.eval.classifier import Prediction, classify, classify_batch

__all__ = ["Prediction", "caption_names", "classify", "classify_batch", "named_attributes"]
