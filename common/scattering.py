"""Wavelet scattering of gray faces: fixed, multi-scale, oriented edge energies.

The scattering transform (Mallat; Bruna and Mallat 2013) convolves an image with Morlet wavelets of
``J`` scales and :data:`ANGLES` orientations, takes the modulus, repeats once on the result, and
low-passes everything to a ``2**J`` times coarser grid. Nothing in it is learned, so it costs no
privacy and needs no public training data. Tramèr and Boneh ("Differentially Private Learning Needs
Better Features (or Much More Data)", ICLR 2021) showed that a small network on these features learns
more under DP-SGD than one trained end to end. facefed's emotion head reads them beside dlib's trunk
map (``emotion-scatter``; BENCHMARKS.md, "Wavelet scattering beside the trunk (twelfth session)").

The transform is kymatio's (BSD-3-Clause). Its 2-D front end is imported directly: ``kymatio.torch``
also loads the 3-D transform, which imports ``scipy.special.sph_harm``, gone from current SciPy.
"""

from __future__ import annotations

import functools

import torch

from common.errors import ConfigError

ANGLES = 8
LOG_FLOOR = 1e-3  # log(|S| + floor): coefficients span decades, and a blank face scatters to 0


def scatter_channels(scales: int) -> int:
    """Coefficients per position: 1 low-pass, ``J * L`` first-order, ``L^2 J (J-1) / 2`` second."""
    return 1 + scales * ANGLES + ANGLES * ANGLES * scales * (scales - 1) // 2


@functools.lru_cache(maxsize=4)
def _transform(scales: int, height: int, width: int) -> torch.nn.Module:
    try:
        from kymatio.scattering2d.frontend.torch_frontend import ScatteringTorch2D
    except ImportError:
        raise ConfigError(
            "emotion-scatter needs kymatio (pip install 'kymatio>=0.3,<0.4'), which is not installed"
        ) from None

    return ScatteringTorch2D(J=scales, shape=(height, width), L=ANGLES)


@torch.no_grad()
def log_scattering(x: torch.Tensor, scales: int, batch: int = 512) -> torch.Tensor:
    """``(N, 1, H, W)`` gray faces -> ``(N, scatter_channels(J), H / 2^J, W / 2^J)`` log coefficients."""
    if x.ndim != 4 or x.shape[1] != 1:
        raise ValueError(f"expected gray faces (N, 1, H, W), got {tuple(x.shape)}")
    if len(x) == 0:
        return x.new_zeros(
            0, scatter_channels(scales), x.shape[-2] >> scales, x.shape[-1] >> scales
        )
    net = _transform(scales, x.shape[-2], x.shape[-1])
    coefficients = torch.cat([net(b.float().contiguous())[:, 0] for b in x.split(batch)])
    return torch.log(coefficients.abs() + LOG_FLOOR)
