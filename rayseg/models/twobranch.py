"""The two-branch model the training stages drive: 3D MinkUNet, 2D ResNet, projection heads.

The branches are independent modules: 3D inference (pseudo-labels, segmentation) calls only
`forward_3d` and never needs images. Cross-modal guidance pairs point features with the 2D
features at the pixels the points project to (`sample_2d`) and compares them through the
projection heads (METHOD.md: proj3d D3d -> D2d, proj2d D2d -> D3d, outputs L2-normalised).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from rayseg.config import ModelConfig
from rayseg.models.minkunet import build_minkunet, load_minkunet_state
from rayseg.models.resnet2d import ResNet2D

__all__ = ["TwoBranchModel", "sample_2d"]


def sample_2d(feat_map: torch.Tensor, view_index: torch.Tensor, pixel_flat: torch.Tensor,
              image_hw: tuple[int, int]) -> torch.Tensor:
    """(K, D) features at full-resolution pixels, bilinear from a lower-resolution feature map.

    feat_map (B, D, h, w) covers images of size image_hw = (H, W); view_index (K,) picks the
    view, pixel_flat (K,) = row * W + col the pixel. As in the reference, pixel (row, col) is
    read at normalised position (2 col / W - 1, 2 row / H - 1) with align_corners=True, i.e. at
    feature-map position (col (w - 1) / W, row (h - 1) / H).
    """
    height, width = int(image_hw[0]), int(image_hw[1])
    num_views = feat_map.shape[0]
    view_index, pixel_flat = view_index.long(), pixel_flat.long()
    if view_index.shape != pixel_flat.shape or view_index.ndim != 1:
        raise ValueError(f"view_index and pixel_flat must be (K,) of equal length, got "
                         f"{tuple(view_index.shape)} and {tuple(pixel_flat.shape)}")
    if len(view_index) and (int(view_index.min()) < 0 or int(view_index.max()) >= num_views):
        raise ValueError(f"view_index out of range [0, {num_views}): {int(view_index.min())}..{int(view_index.max())}")
    if len(pixel_flat) and (int(pixel_flat.min()) < 0 or int(pixel_flat.max()) >= height * width):
        raise ValueError(f"pixel_flat out of range for {height}x{width} images: "
                         f"{int(pixel_flat.min())}..{int(pixel_flat.max())}")
    col = (pixel_flat % width).to(feat_map.dtype)
    row = torch.div(pixel_flat, width, rounding_mode="floor").to(feat_map.dtype)
    grid = torch.stack([col * (2.0 / width) - 1.0, row * (2.0 / height) - 1.0], dim=1)
    order = torch.argsort(view_index, stable=True)  # group the samples of each view
    counts = torch.bincount(view_index, minlength=num_views).tolist()
    pieces = []
    for view, rows in enumerate(order.split(counts)):
        if len(rows):
            g = grid[rows].view(1, 1, -1, 2)
            sampled = F.grid_sample(feat_map[view:view + 1], g, mode="bilinear", padding_mode="border",
                                    align_corners=True)  # (1, D, 1, n)
            pieces.append(sampled[0, :, 0].T)
    if not pieces:
        return feat_map.new_zeros(0, feat_map.shape[1])
    grouped = torch.cat(pieces)
    rank = torch.empty_like(order)
    rank[order] = torch.arange(len(order), device=order.device)
    return grouped[rank]


class TwoBranchModel(nn.Module):
    """net3d (MinkUNet), net2d (ResNet2D), proj3d (Linear D3d -> D2d), proj2d (Linear D2d -> D3d)."""

    def __init__(self, model_cfg: ModelConfig, num_classes: int):
        super().__init__()
        self.net3d = build_minkunet(model_cfg.backbone_3d, model_cfg.in_channels, num_classes,
                                    backend=model_cfg.backend)
        if model_cfg.init_3d:
            load_minkunet_state(self.net3d, model_cfg.init_3d)
        self.net2d = ResNet2D(model_cfg.backbone_2d, num_classes, init=model_cfg.init_2d,
                              init_classifier=model_cfg.init_2d_classifier, freeze=model_cfg.freeze_2d,
                              signed=model_cfg.signed_2d_features, autocast=model_cfg.autocast_2d)
        d3, d2 = self.net3d.feature_dim, self.net2d.feature_dim
        self.proj3d = nn.Linear(d3, d2)
        self.proj2d = nn.Linear(d2, d3)

    def forward_3d(self, coord: torch.Tensor, feat: torch.Tensor) -> dict[str, torch.Tensor]:
        """Voxel features (M, D3d) and logits (M, C); rows follow `coord`."""
        f, logits = self.net3d(coord, feat)
        return {"feat": f, "logits": logits}

    def forward_2d(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Stride-8 feature maps (B, D2d, h, w) and full-resolution logits (B, C, H, W)."""
        f, logits = self.net2d(images)
        return {"feat": f, "logits": logits}

    def project_3d(self, f: torch.Tensor) -> torch.Tensor:
        """3D features (K, D3d) -> L2-normalised (K, D2d), compared with 2D features."""
        return F.normalize(self.proj3d(f), dim=-1)

    def project_2d(self, f: torch.Tensor) -> torch.Tensor:
        """2D features (K, D2d) -> L2-normalised (K, D3d), compared with 3D features."""
        return F.normalize(self.proj2d(f), dim=-1)

    @staticmethod
    def sample_2d(feat_map: torch.Tensor, view_index: torch.Tensor, pixel_flat: torch.Tensor,
                  image_hw: tuple[int, int]) -> torch.Tensor:
        return sample_2d(feat_map, view_index, pixel_flat, image_hw)
