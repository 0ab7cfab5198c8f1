"""dlib's face-recognition ResNet (``dlib_face_recognition_resnet_model_v1``) as a torch module.

The network (dlib's ``dnn_face_recognition_ex.cpp``), with dlib's ``affine_`` layers (batch norms
already folded at dlib's export) folded into the preceding convolutions' biases:

* input: a 150x150 RGB face chip, ``(pixel - CHIP_MEAN) / 256`` per channel (:func:`chip_tensor`);
* stem: 7x7 stride-2 conv to 32 channels (no padding), ReLU, 3x3 stride-2 max pool (no padding): 35x35;
* 14 residual blocks (:class:`ResBlock`): 3 x 32; a 64 down block + 3 x 64 (17x17); a 128 down block
  + 2 x 128 (8x8); a 256 down block + 2 x 256 (4x4); a 256 down block (2x2);
* head: global average pool, then a 256 -> 128 linear layer without bias.

The output of :meth:`DlibResNet.forward` is dlib's raw descriptor (norm about 1.2-1.7; dlib compares
descriptors by Euclidean distance with threshold 0.6). facefed compares L2-normalised embeddings by
cosine similarity instead, like its other face models.

For federated fine-tuning the network splits in two (:meth:`DlibResNet.split`): a frozen
:class:`Trunk` (the public pretrained layers, computed once per site) and a trainable :class:`FaceTail`
(the last blocks and the embedding layer), whose weights are what sites train under DP-SGD.
"""

from __future__ import annotations

import copy

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

CHIP_SIZE = 150
CHIP_MEAN = (
    122.782,
    117.001,
    104.298,
)  # dlib's input_rgb_image_sized: avg_red, avg_green, avg_blue
CHIP_SCALE = 256.0
DESCRIPTOR_DIM = 128
# (output channels, down-sampling) of the 14 residual blocks, input side first
BLOCKS: tuple[tuple[int, bool], ...] = (
    ((32, False),) * 3
    + ((64, True),)
    + ((64, False),) * 3
    + ((128, True),)
    + ((128, False),) * 2
    + ((256, True),)
    + ((256, False),) * 2
    + ((256, True),)
)


def add_zero_padded(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """dlib's ``add_prev``: the sum of two ``(N, C, H, W)`` tensors of possibly different C, H, W.

    The smaller is zero-padded: extra channels, and extra rows and columns at the bottom and right.
    """
    c, h, w = (max(a.shape[i], b.shape[i]) for i in (1, 2, 3))

    def pad(t: torch.Tensor) -> torch.Tensor:
        return F.pad(t, (0, w - t.shape[3], 0, h - t.shape[2], 0, c - t.shape[1]))

    return pad(a) + pad(b)


class ResBlock(nn.Module):
    """conv3x3 -> ReLU -> conv3x3, added to the shortcut, then ReLU (both convs carry a bias).

    A down block's first conv has stride 2 and no padding, and its shortcut is a 2x2 average pool.
    """

    def __init__(self, c_in: int, c_out: int, down: bool) -> None:
        super().__init__()
        self.down = down
        stride, padding = (2, 0) if down else (1, 1)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=padding)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv2(F.relu(self.conv1(x)))
        shortcut = F.avg_pool2d(x, 2, 2) if self.down else x
        return F.relu(add_zero_padded(h, shortcut))


def _blocks() -> nn.ModuleList:
    blocks = []
    c_in = 32
    for c_out, down in BLOCKS:
        blocks.append(ResBlock(c_in, c_out, down))
        c_in = c_out
    return nn.ModuleList(blocks)


class DlibResNet(nn.Module):
    """``(N, 3, 150, 150)`` chip tensors (:func:`chip_tensor`) -> ``(N, 128)`` raw dlib descriptors."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 32, 7, stride=2)
        self.blocks = _blocks()
        self.fc = nn.Linear(256, DESCRIPTOR_DIM, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.max_pool2d(F.relu(self.stem(x)), 3, 2)
        for block in self.blocks:
            h = block(h)
        return self.fc(h.mean(dim=(2, 3)))

    def split(self, tail_blocks: int) -> tuple[Trunk, FaceTail]:
        """Copies of the frozen trunk and the trainable tail with its last ``tail_blocks`` blocks."""
        if not 0 <= tail_blocks <= len(BLOCKS):
            raise ValueError(f"tail_blocks must be in 0..{len(BLOCKS)}, got {tail_blocks}")
        cut = len(BLOCKS) - tail_blocks
        trunk = Trunk(cut)
        trunk.stem.load_state_dict(self.stem.state_dict())
        for mine, theirs in zip(trunk.blocks, self.blocks[:cut], strict=True):
            mine.load_state_dict(theirs.state_dict())
        tail = FaceTail(tail_blocks)
        for mine, theirs in zip(tail.blocks, self.blocks[cut:], strict=True):
            mine.load_state_dict(theirs.state_dict())
        tail.fc.load_state_dict(self.fc.state_dict())
        return trunk.eval().requires_grad_(False), tail


class Trunk(nn.Module):
    """The stem and the first ``num_blocks`` residual blocks: chips -> feature maps."""

    def __init__(self, num_blocks: int) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 32, 7, stride=2)
        self.blocks = _blocks()[:num_blocks]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.max_pool2d(F.relu(self.stem(x)), 3, 2)
        for block in self.blocks:
            h = block(h)
        return h


class FaceTail(nn.Module):
    """The last ``num_blocks`` residual blocks and the embedding layer: trunk features -> unit vectors.

    With ``num_blocks = 0`` its input is the trunk's pooled 256-d feature vector ``(N, 256)``; otherwise
    the ``(N, C, H, W)`` feature map in front of its first block.
    """

    def __init__(self, num_blocks: int) -> None:
        super().__init__()
        self.blocks = copy.deepcopy(_blocks()[len(BLOCKS) - num_blocks :])
        self.fc = nn.Linear(256, DESCRIPTOR_DIM, bias=False)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            h = block(h)
        if h.dim() == 4:
            h = h.mean(dim=(2, 3))
        return F.normalize(self.fc(h), dim=1)


def chip_tensor(chips: np.ndarray) -> torch.Tensor:
    """``(N, 150, 150, 3)`` uint8 RGB chips -> the network's ``(N, 3, 150, 150)`` float32 input."""
    if chips.ndim != 4 or chips.shape[1:] != (CHIP_SIZE, CHIP_SIZE, 3):
        raise ValueError(f"expected (N, {CHIP_SIZE}, {CHIP_SIZE}, 3) RGB chips, got {chips.shape}")
    mean = np.asarray(CHIP_MEAN, dtype=np.float32)
    x = (chips.astype(np.float32) - mean) / CHIP_SCALE
    return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))


class ChipEmbedder(nn.Module):
    """The whole face model on device: ``(N, 3, 150, 150)`` chip tensors -> ``(N, 128)`` unit vectors.

    The frozen trunk and a (fine-tuned) tail; the on-device pipeline aligns faces onto dlib's chip
    template (``common.facenet.chips``) and feeds them through :func:`chip_tensor`.
    """

    def __init__(self, trunk: Trunk, tail: FaceTail) -> None:
        super().__init__()
        self.trunk = trunk
        self.tail = tail

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.tail(self.trunk(x))
