"""CTransPath (Wang et al., Medical Image Analysis 2022): Swin-T with a convolutional patch stem.

CTransPath is timm's ``swin_tiny_patch4_window7_224`` whose 4x4 patchify convolution is
replaced by ``ConvStem`` (two stride-2 3x3 conv-BN-ReLU layers and a 1x1 projection), as in the
authors' TransPath repository. Their checkpoint was saved from a patched timm 0.5.4, so two
things are adapted here for current timm:

* timm >= 0.9 Swin expects the patch embed to return NHWC (B, H/4, W/4, C), not (B, N, C);
* old Swin checkpoints downsample at the end of a stage, current timm at the start of the next;
  timm's own ``swin_transformer.checkpoint_filter_fn`` renames those keys and drops the
  non-persistent ``relative_position_index`` / ``attn_mask`` buffers.
"""

from __future__ import annotations

from typing import Any

import timm
import torch
from timm.layers import to_2tuple
from timm.models import swin_transformer
from torch import nn

__all__ = ["ConvStem", "create_ctranspath", "convert_ctranspath_state_dict"]


class ConvStem(nn.Module):
    """Patch embedding by a small conv stem; (B, 3, H, W) -> (B, H/4, W/4, embed_dim) NHWC."""

    def __init__(
        self,
        img_size: int | tuple[int, int] = 224,
        patch_size: int | tuple[int, int] = 4,
        in_chans: int = 3,
        embed_dim: int = 96,
        norm_layer: Any = None,
        strict_img_size: bool = True,
        output_fmt: str = "NHWC",
        device: Any = None,
        dtype: Any = None,
        **_: Any,
    ) -> None:
        super().__init__()
        if to_2tuple(patch_size) != (4, 4) or embed_dim % 8 != 0:
            raise ValueError(f"ConvStem needs patch_size 4 and embed_dim divisible by 8, got {patch_size}, {embed_dim}")
        if output_fmt != "NHWC":
            raise ValueError(f"ConvStem produces NHWC for timm's Swin, got output_fmt={output_fmt!r}")
        self.img_size = to_2tuple(img_size)
        self.patch_size = to_2tuple(patch_size)
        self.grid_size = (self.img_size[0] // 4, self.img_size[1] // 4)
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.strict_img_size = strict_img_size
        factory = {"device": device, "dtype": dtype}
        layers: list[nn.Module] = []
        in_dim, out_dim = in_chans, embed_dim // 8
        for _ in range(2):  # two stride-2 convs: the same 4x reduction as the 4x4 patchify
            layers += [
                nn.Conv2d(in_dim, out_dim, kernel_size=3, stride=2, padding=1, bias=False, **factory),
                nn.BatchNorm2d(out_dim, **factory),
                nn.ReLU(inplace=True),
            ]
            in_dim, out_dim = out_dim, out_dim * 2
        layers.append(nn.Conv2d(in_dim, embed_dim, kernel_size=1, **factory))
        self.proj = nn.Sequential(*layers)
        self.norm = norm_layer(embed_dim, **factory) if norm_layer else nn.Identity()

    def set_input_size(self, img_size: Any = None, patch_size: Any = None) -> None:
        """Called by timm's Swin ``set_input_size``; the stem itself is size-agnostic."""
        if img_size is not None:
            self.img_size = to_2tuple(img_size)
            self.grid_size = (self.img_size[0] // 4, self.img_size[1] // 4)
            self.num_patches = self.grid_size[0] * self.grid_size[1]

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        if self.strict_img_size and tuple(pixels.shape[-2:]) != self.img_size:
            raise ValueError(f"input size {tuple(pixels.shape[-2:])} does not match model {self.img_size}")
        return self.norm(self.proj(pixels).permute(0, 2, 3, 1))


def create_ctranspath(**model_kwargs: Any) -> nn.Module:
    """A randomly initialised CTransPath (no download); ``num_classes=0`` gives 768-d features."""
    return timm.create_model(
        "swin_tiny_patch4_window7_224", pretrained=False, embed_layer=ConvStem, **model_kwargs
    )


def convert_ctranspath_state_dict(state_dict: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """Authors' (timm 0.5.4) key layout -> current timm Swin; a no-op for current-layout dicts."""
    return swin_transformer.checkpoint_filter_fn(state_dict, model)
