"""Verification threshold calibrated on LFW folds at a stated false-accept rate (FAR).

The operating threshold is the one :func:`common.metrics.tar_at_far` picks on all LFW pairs at the
target FAR: at most ``floor(FAR * #impostor pairs)`` impostor pairs score above it. To show how well
that choice generalises, each fold is also held out in turn: the threshold is picked on the other
folds and TAR and FAR are measured on the held-out fold (the LFW protocol, LFW_README.txt 2c). A
pair is a match when its cosine score is strictly greater than the threshold, as in
:mod:`common.metrics`.

:func:`calibrate` refuses targets that allow less than one impostor pair. A model trained on some LFW
people sets must be calibrated on the others only (``lfw_sets``): facefed's default runs train on
sets 1-3. The pairs are by default every pair of images within each people set (``protocol="all"``:
~1.4M impostor pairs in sets 4-5, so FARs down to 1e-4 and below are measured on hundreds of
impostors); the pairs file's View 2 pairs (``protocol="view2"``) hold only 600 impostor pairs in
sets 4-5, too few for any FAR below ~1.7e-3.

**Gray probes.** A colour network sees less of a face in a gray photo (a scanner, an infrared or
studio camera), and different people look more alike: on dlib's network the colour threshold at FAR
1e-4 lets through more gray LFW impostor pairs than that (BENCHMARKS.md, "The `site` CLI at FAR 1e-4").
So a colour network is also calibrated on the same pairs turned gray (:attr:`Calibration.gray`), and a
gray probe is decided by that threshold (:meth:`Calibration.for_probe`), keeping the stated FAR for it.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from common.errors import ConfigError

if TYPE_CHECKING:
    from common.data.lfw import LfwData

logger = logging.getLogger(__name__)

DEFAULT_FAR = 1e-3
Protocol = Literal["all", "view2"]
PROTOCOLS: tuple[Protocol, ...] = ("all", "view2")


@dataclass(frozen=True, kw_only=True)
class Calibration:
    """A threshold and the operating point it was chosen for."""

    threshold: float
    far: float | None  # target false-accept rate (None: threshold set by hand, FAR unknown)
    tar: float | None  # true-accept rate on all pairs at the threshold
    heldout_tar: float | None  # mean over folds, threshold chosen on the other folds
    heldout_far: float | None  # mean measured FAR on held-out folds
    n_genuine: int
    n_impostor: int
    n_folds: int
    model_tag: str
    source: str = "LFW View 2 folds"
    # the same pairs in gray, for gray probes (colour networks only)
    gray: Calibration | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe form (stored in the template store's metadata)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Calibration:
        """Inverse of :meth:`to_dict`; ``TypeError`` for anything else."""
        if not isinstance(data, dict) or not isinstance(data.get("gray"), dict | None):
            raise TypeError("a calibration is a JSON object, and its gray calibration one or null")
        gray = data.get("gray")
        return cls(**{**data, "gray": None if gray is None else cls.from_dict(gray)})

    def for_probe(self, gray: bool) -> Calibration:
        """The calibration a probe is decided by: the gray one for a gray probe, where there is one."""
        return self.gray if gray and self.gray is not None else self

    @classmethod
    def manual(cls, threshold: float, model_tag: str) -> Calibration:
        """A threshold set by hand: no operating point is claimed."""
        return cls(
            threshold=threshold,
            far=None,
            tar=None,
            heldout_tar=None,
            heldout_far=None,
            n_genuine=0,
            n_impostor=0,
            n_folds=0,
            model_tag=model_tag,
            source="--threshold",
        )

    def describe(self) -> str:
        """One line: threshold, FAR and TAR."""
        if self.far is None or self.tar is None:
            return f"threshold {self.threshold:.4f} (set with {self.source}; FAR not measured)"
        return (
            f"threshold {self.threshold:.4f} at FAR {self.far:g} "
            f"({self.source}: TAR {self.tar:.3f}, "
            f"held-out TAR {self.heldout_tar or 0:.3f} / FAR {self.heldout_far or 0:.4f})"
        )


def calibrate(
    scores: np.ndarray, same: np.ndarray, folds: np.ndarray, *, far: float, model_tag: str
) -> Calibration:
    """Pick the threshold at ``far`` on all pairs and measure it fold by fold."""
    from common.metrics import tar_at_far

    scores, same, folds = np.asarray(scores, float), np.asarray(same, bool), np.asarray(folds)
    n_impostor = int((~same).sum())
    if not 0 < far < 1 or far * n_impostor < 1:
        raise ConfigError(
            f"cannot calibrate at FAR {far:g} with {n_impostor} impostor pairs; choose a FAR of at "
            f"least {1 / max(n_impostor, 1):.1e}"
        )
    tar, threshold = tar_at_far(scores, same, far)
    tars, fars = [], []
    fold_ids = np.unique(folds)
    for fold in fold_ids:
        test = folds == fold
        _, t = tar_at_far(scores[~test], same[~test], far)
        tars.append(float(np.mean(scores[test & same] > t)))
        fars.append(float(np.mean(scores[test & ~same] > t)))
    return Calibration(
        threshold=float(threshold),
        far=float(far),
        tar=float(tar),
        heldout_tar=float(np.mean(tars)),
        heldout_far=float(np.mean(fars)),
        n_genuine=int(same.sum()),
        n_impostor=n_impostor,
        n_folds=len(fold_ids),
        model_tag=model_tag,
    )


def calibrate_on_lfw(
    embed_faces: Any,
    *,
    model_tag: str,
    far: float = DEFAULT_FAR,
    data_dir: Path | None = None,
    lfw_sets: Sequence[int] | None = None,
    protocol: Protocol = "all",
    chips: bool = False,
) -> Calibration:
    """Embed LFW images with ``embed_faces`` (the pipeline's) and calibrate.

    LFW images ship as 112x112 crops in the training geometry of facefed's scratch networks, so they
    go straight to such an embedder. With ``chips``, the embedder takes dlib's 150x150 chips instead,
    and the images are aligned onto them first (``common.data.chips``, YuNet's 5 landmarks: the
    pipeline's own alignment).

    Two sets of pairs (``protocol``):

    - ``"all"`` (default): every pair of images within each people set, same person or not, in the
      spirit of the BLUFR protocol (Liao et al. 2014, "A benchmark study of large-scale unconstrained
      face recognition"): people sets 4-5 give ~33k genuine and ~1.4M impostor pairs, enough to
      state a FAR of 1e-4. Each people set is a fold.
    - ``"view2"``: the 300 + 300 pairs per set of LFW's pairs file (View 2), the classic protocol;
      its 600 impostor pairs in sets 4-5 cannot state a FAR below ~1.7e-3.

    Args:
        embed_faces: aligned ``(N, 112, 112, 3)`` uint8 faces (``(N, 150, 150, 3)`` chips with
            ``chips``) -> ``(N, D)`` unit embeddings.
        model_tag: the fingerprint of the model the threshold is for.
        far: the target false-accept rate.
        data_dir: folder holding the LFW archive (default: :func:`common.paths.data_dir`).
        lfw_sets: the 1-based people sets to use (default: all). Pass the sets the model never
            trained on (``4, 5`` for facefed's default runs): pairs of trained-on identities score
            too well and would understate the FAR.
        protocol: ``"all"`` or ``"view2"``, as above.

    Raises:
        ConfigError: if ``lfw_sets`` names a set that has no pairs, or ``far`` cannot be measured.
    """
    from common.data.lfw import load_lfw

    if protocol not in PROTOCOLS:
        raise ConfigError(f"unknown pairs protocol {protocol!r}; use one of {', '.join(PROTOCOLS)}")
    lfw = load_lfw(data_dir)
    if not chips:  # facefed's 112x112 networks turn every face gray themselves
        return _calibrate_pairs(embed_faces, lfw, model_tag, far, lfw_sets, protocol)
    from common.data.chips import dataset_chips

    lfw = dataclasses.replace(lfw, images=dataset_chips("lfw", data_dir).chips)
    colour = _calibrate_pairs(embed_faces, lfw, model_tag, far, lfw_sets, protocol)
    in_gray = _calibrate_pairs(
        lambda faces: embed_faces(as_gray_rgb(faces)), lfw, model_tag, far, lfw_sets, protocol
    )
    return dataclasses.replace(
        colour, gray=dataclasses.replace(in_gray, source=f"{in_gray.source}, in gray")
    )


def as_gray_rgb(images: np.ndarray) -> np.ndarray:
    """``(N, H, W, 3)`` RGB uint8 -> the same images in gray, as 3 equal channels."""
    from common.data.preprocess import to_gray

    return np.repeat(to_gray(images)[..., None], 3, axis=-1)


# Below this mean residual (grey levels) a face is monochrome. Colour LFW chips: 1st percentile 2.2,
# median 4.2; gray, tinted and sepia faces: 0 (BENCHMARKS.md, "Gray probes").
GRAY_TOLERANCE = 1.5


def is_gray(face: np.ndarray) -> bool:
    """Whether an ``(H, W, 3)`` RGB face is monochrome: gray, or gray under a tint or a cast.

    Each channel is fit as an affine function of the pixel's brightness; a face whose colour that
    explains (a gray photo, a warm scan, sepia, a camera's cast) carries no colour a network could use,
    so it is gray here. Decided on the middle of the aligned face (a coloured frame or background is
    left out) and on a mean over its pixels (a few coloured pixels do not count), because gray is the
    stricter threshold: a face wrongly called colour would get the laxer one. The FAR stated is for
    zero-effort impostors (ISO/IEC 19795-1); an attacker who edits the face's pixels is out of its
    scope.
    """
    h, w = face.shape[:2]
    middle = np.asarray(face[h // 5 : h - h // 5, w // 5 : w - w // 5], np.float64).reshape(-1, 3)
    brightness = middle.mean(axis=1)
    basis = np.stack([np.ones_like(brightness), brightness], axis=1)
    fit, *_ = np.linalg.lstsq(basis, middle, rcond=None)
    return float(np.abs(middle - basis @ fit).mean()) < GRAY_TOLERANCE


def _calibrate_pairs(
    embed_faces: Any,
    lfw: LfwData,
    model_tag: str,
    far: float,
    lfw_sets: Sequence[int] | None,
    protocol: Protocol,
) -> Calibration:
    if protocol == "all":
        return _calibrate_all_pairs(embed_faces, lfw, model_tag, far, lfw_sets)
    row1, row2, same, fold = lfw.pair_arrays()
    source = "LFW View 2 folds"
    if lfw_sets is not None:
        wanted = sorted({int(s) for s in lfw_sets})
        missing = [s for s in wanted if not np.any(fold == s - 1)]
        if not wanted or missing:
            raise ConfigError(
                f"LFW people sets {missing or wanted} have no pairs in the pairs file; choose "
                f"among {', '.join(str(f + 1) for f in np.unique(fold))}"
            )
        keep = np.isin(fold, [s - 1 for s in wanted])
        row1, row2, same, fold = row1[keep], row2[keep], same[keep], fold[keep]
        source = f"LFW View 2 folds of people sets {','.join(map(str, wanted))}"
    rows = np.unique(np.concatenate([row1, row2]))
    logger.info("calibrating on %d LFW pairs (%d images)", len(same), len(rows))
    emb = np.asarray(embed_faces(lfw.images[rows]))
    where = np.searchsorted(rows, np.arange(len(lfw.images)))
    scores = np.sum(emb[where[row1]] * emb[where[row2]], axis=1)
    return dataclasses.replace(
        calibrate(scores, same, fold, far=far, model_tag=model_tag), source=source
    )


def _calibrate_all_pairs(
    embed_faces: Any, lfw: LfwData, model_tag: str, far: float, lfw_sets: Sequence[int] | None
) -> Calibration:
    """Every within-set pair of the chosen people sets; each set is a fold."""
    available = [k + 1 for k, names in enumerate(lfw.people_sets) if names]
    wanted = sorted({int(s) for s in lfw_sets}) if lfw_sets is not None else available
    missing = [s for s in wanted if s not in available]
    if not wanted or missing:
        raise ConfigError(
            f"LFW people sets {missing or wanted} are not in the people file; choose among "
            f"{', '.join(map(str, available))}"
        )
    scores, same, folds = [], [], []
    for s in wanted:
        names = set(lfw.people_sets[s - 1])
        person = np.array([lfw.names[i] in names for i in range(len(lfw.names))])
        rows = np.flatnonzero(person[lfw.identity])
        emb = np.asarray(embed_faces(lfw.images[rows]), dtype=np.float32)
        upper = np.triu_indices(len(rows), k=1)
        ids = lfw.identity[rows]
        scores.append((emb @ emb.T)[upper])
        same.append(ids[upper[0]] == ids[upper[1]])
        folds.append(np.full(len(upper[0]), s - 1))
        logger.info("people set %d: %d images, %d pairs", s, len(rows), len(upper[0]))
    source = f"LFW all pairs within people sets {','.join(map(str, wanted))}"
    return dataclasses.replace(
        calibrate(
            np.concatenate(scores),
            np.concatenate(same),
            np.concatenate(folds),
            far=far,
            model_tag=model_tag,
        ),
        source=source,
    )
