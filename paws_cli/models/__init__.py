"""Models of the PAWS toolkit: extra timm backbones, the projection/prediction heads and the encoder.

Importing this package registers with timm the SimCLR-style wide ResNet-50s (``resnet50x1``, ``resnet50x2``,
``resnet50x4``) and the small-image backbones (``wrn28_2``, ``cnn_w16``, ``cnn_w32``), so that
``timm.create_model(name, num_classes=0)`` builds them.
"""

from paws_cli.models import small, wide_resnet  # noqa: F401  (imported for their @register_model side effect)
from paws_cli.models.encoder import PAWS_BACKBONES, PAWSEncoder, create_encoder
from paws_cli.models.heads import PredictionHead, ProjectionHead

__all__ = ["PAWS_BACKBONES", "PAWSEncoder", "PredictionHead", "ProjectionHead", "create_encoder"]
