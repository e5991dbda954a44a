"""Networks: the 3D MinkUNet (rayseg.models.minkunet), the 2D ResNet (rayseg.models.resnet2d) and
the two-branch model with its projection heads (rayseg.models.twobranch)."""
