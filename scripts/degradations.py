"""Degradation physics: deterministic forward operators and the random MONAI transforms built on them.

Operators act on torch tensors whose last three dimensions are spatial ``(X, Y, Z)``; the linear ones
(thick slices, blur, k-space truncation) are differentiable, so data-consistency and posterior-sampling code
can use them as ``A`` in ``y = A x + n``. The transforms make training pairs on the fly: they read a
channel-first MetaTensor under their key, degrade it in place and append the parameters they drew to
``data["degradation"]``, so a pipeline ``CopyItemsd(image -> degraded)`` + degradations yields a pair.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Mapping, Sequence
from math import ceil

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import MapTransform, Randomizable, RandomizableTransform
from scripts.grid import (
    FWHM_TO_SIGMA,
    apply_along_axis,
    axis_positions,
    grid_affine,
    interpolation_matrix,
    profile_matrix,
    thick_axis,
)
from scripts.intensity import item_modality
from scripts.radon import fbp, radon
from scripts.volumes import spacing_of

MU_WATER_PER_MM = 0.0193  # linear attenuation of water at ~70 keV effective energy
# Incident photons per ray and view (360 views) of the input scan. With it, a quarter dose adds noise of about
# 41 HU standard deviation inside the body of the 0.57 x 0.57 x 5 mm lung1 chest CT (configs/baselines.json).
DEFAULT_PHOTONS = 5e5

# ----------------------------------------------------------------------------------------------------------
# Deterministic forward operators
# ----------------------------------------------------------------------------------------------------------


def _dim(x: torch.Tensor, axis: int) -> int:
    """Tensor dimension of spatial ``axis`` (0, 1, 2) for a tensor with three trailing spatial dims."""
    return x.ndim - 3 + axis


def thick_slice_matrix(n: int, factor: float, profile: str = "box") -> np.ndarray:
    """``(floor(n / factor), n)`` matrix that turns ``n`` thin slices into contiguous thick ones.

    Thick slice ``k`` is centred on thin index ``(k + 0.5) * factor - 0.5`` and its profile has the slice
    thickness (``factor`` thin slices) as width (box) or FWHM (Gaussian). For an integer factor and a box
    profile, row ``k`` is the mean of thin slices ``k*f ... k*f+f-1``.
    """
    n_out, scale, offset = thick_axis(n, factor)
    return profile_matrix(n, axis_positions(n_out, scale, offset), factor, profile)


def thick_slice(x: torch.Tensor, factor: float, axis: int = 2, profile: str = "box") -> torch.Tensor:
    """Simulate thick slices along spatial ``axis``: slice-profile averaging followed by sampling."""
    d = _dim(x, axis)
    return apply_along_axis(x, thick_slice_matrix(x.shape[d], factor, profile), d)


def thick_slice_affine(affine: np.ndarray, n: int, factor: float, axis: int = 2) -> np.ndarray:
    """Affine of the thick-slice grid made by ``thick_slice`` from a volume with ``n`` slices along ``axis``."""
    _, scale, offset = thick_axis(n, factor)
    scales, offsets = [1.0, 1.0, 1.0], [0.0, 0.0, 0.0]
    scales[axis], offsets[axis] = scale, offset
    return grid_affine(affine, scales, offsets)


def _kernel_taps(kind: str, size_vox: float) -> np.ndarray:
    """1D blur kernel integrated over each voxel: ``gaussian`` (``size_vox`` = sigma) or ``box`` (width)."""
    if size_vox <= 0:
        return np.ones(1)
    if kind == "gaussian":
        radius = max(1, ceil(4 * size_vox))
        fwhm = size_vox / FWHM_TO_SIGMA
        return profile_matrix(2 * radius + 1, np.array([float(radius)]), fwhm, "gaussian")[0]
    if kind == "box":
        radius = max(1, ceil(size_vox / 2))
        return profile_matrix(2 * radius + 1, np.array([float(radius)]), size_vox, "box")[0]
    raise ValueError(f"unknown blur kernel {kind!r}; use 'gaussian' or 'box'")


def _convolve_axis(x: torch.Tensor, taps: np.ndarray, dim: int) -> torch.Tensor:
    """Convolve along ``dim`` with replicated edges, as a weighted sum of shifted views (on a CPU, ``conv1d`` over
    millions of one-channel rows is slow); differentiable, for the adjoint of least squares."""
    if len(taps) == 1:
        return x
    r, n = len(taps) // 2, x.shape[dim]
    padded = x.index_select(dim, torch.arange(-r, n + r, device=x.device).clamp(0, n - 1))
    weights = [float(w) for w in taps[::-1]]
    out = weights[0] * padded.narrow(dim, 0, n)
    for k in range(1, len(weights)):
        out.add_(padded.narrow(dim, k, n), alpha=weights[k])
    return out


def blur(
    x: torch.Tensor, size_mm: float | Sequence[float], spacing: Sequence[float], kernel: str = "gaussian"
) -> torch.Tensor:
    """Blur with a separable kernel of known size in mm: Gaussian ``sigma`` or box ``width`` per axis.

    Edges are replicated. A scalar ``size_mm`` applies to all three axes; 0 leaves an axis alone.
    """
    sizes = [float(size_mm)] * 3 if np.isscalar(size_mm) else [float(s) for s in size_mm]
    for axis, (s, sp) in enumerate(zip(sizes, spacing)):
        x = _convolve_axis(x, _kernel_taps(kernel, s / float(sp)), _dim(x, axis))
    return x


def kspace_truncate(x: torch.Tensor, factor: float, axes: Sequence[int] = (0, 1)) -> torch.Tensor:
    """Keep the central ``1/factor`` of k-space along ``axes`` (zero-filled, same grid): MR low resolution."""
    dims = [_dim(x, a) for a in axes]
    spectrum = torch.fft.fftn(x, dim=dims)
    for d in dims:
        n = x.shape[d]
        freq = torch.fft.fftfreq(n, device=x.device).abs() * n  # integer frequency index
        keep = (freq <= (n / factor) / 2).to(spectrum.real.dtype)
        shape = [1] * x.ndim
        shape[d] = n
        spectrum = spectrum * keep.reshape(shape)
    return torch.fft.ifftn(spectrum, dim=dims).real.to(x.dtype)


def rician_noise(x: torch.Tensor, sigma: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Magnitude of the signal plus complex Gaussian noise of std ``sigma`` in each channel (MR)."""
    real = x + sigma * torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device)
    imag = sigma * torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device)
    return torch.sqrt(real**2 + imag**2)


def hu_to_mu(hu: torch.Tensor) -> torch.Tensor:
    """Linear attenuation (1/mm) from HU; air and the padding outside the scan field count as zero."""
    return MU_WATER_PER_MM * (1 + hu.clamp(min=-1000) / 1000)


def lowdose_sinogram_noise(
    sinogram: torch.Tensor, dose_fraction: float, photons: float, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Line-integral noise that brings a scan made with ``photons`` per ray down to ``dose_fraction`` of its dose.

    Low-dose counts are Poisson with mean ``dose_fraction * photons * exp(-p)``; their log has variance
    ``exp(p) / (dose_fraction * photons)``. The input already carries full-dose noise of variance
    ``exp(p) / photons``, so the fluctuation is scaled by ``sqrt(1 - dose_fraction)`` and the result has the
    missing variance ``(1 / dose_fraction - 1) * exp(p) / photons``.
    """
    if not 0 < dose_fraction <= 1:
        raise ValueError(f"dose_fraction must be in (0, 1], got {dose_fraction}")
    expected = dose_fraction * photons * torch.exp(-sinogram.double())
    counts = torch.poisson(expected, generator=generator).clamp(min=1)
    low = -torch.log(counts / (dose_fraction * photons))
    return ((low - sinogram.double()) * (1 - dose_fraction) ** 0.5).to(sinogram.dtype)


def lowdose_ct(
    hu: torch.Tensor,
    spacing: Sequence[float],
    dose_fraction: float = 0.25,
    photons: float = DEFAULT_PHOTONS,
    n_views: int = 360,
    window: str = "ramp",
    generator: torch.Generator | None = None,
    slice_chunk: int = 8,
) -> torch.Tensor:
    """Simulate a lower-dose scan of a CT volume in HU (axial slices along the last axis).

    Per slice: HU to attenuation, parallel-beam projection, Poisson counts at the lower dose, log, and filtered
    back projection of the *noise* only, which is added to the original so that no reconstruction error of
    the simplified geometry enters the image.
    """
    pixel_mm = float(np.sqrt(float(spacing[0]) * float(spacing[1])))
    *lead, h, w, nz = hu.shape
    slices = torch.movedim(hu.reshape(-1, h, w, nz), -1, 1).reshape(-1, h, w).float()
    noise = []
    for chunk in slices.split(slice_chunk):
        sino = radon(hu_to_mu(chunk), pixel_mm, n_views)
        delta = lowdose_sinogram_noise(sino, dose_fraction, photons, generator)
        noise.append(fbp(delta, pixel_mm, h, w, window) * (1000 / MU_WATER_PER_MM))
    noise_vol = torch.movedim(torch.cat(noise).reshape(-1, nz, h, w), 1, -1).reshape(hu.shape)
    return hu + noise_vol.to(hu.dtype)


# ----------------------------------------------------------------------------------------------------------
# Random dictionary transforms for training pairs
# ----------------------------------------------------------------------------------------------------------


class _RandDegradationd(RandomizableTransform, MapTransform):
    """Shared plumbing: draw parameters once per call, apply them to each key on a plain tensor, keep the
    MetaTensor's metadata, and record the parameters in ``data['degradation']``."""

    def __init__(self, keys: KeysCollection, prob: float = 1.0, allow_missing_keys: bool = False) -> None:
        MapTransform.__init__(self, keys, allow_missing_keys)
        RandomizableTransform.__init__(self, prob)

    def draw(self) -> dict:
        raise NotImplementedError

    def apply(self, img: torch.Tensor, spacing: np.ndarray, params: dict) -> torch.Tensor:
        raise NotImplementedError

    def new_affine(self, affine: np.ndarray, shape: Sequence[int], params: dict) -> np.ndarray:
        """Affine of the output grid; the degradations that keep the grid return it unchanged."""
        return affine

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict:
        d = dict(data)
        self.randomize(None)
        if not self._do_transform:
            return d
        params = self.draw()
        for key in self.key_iterator(d):
            img = d[key]
            if isinstance(img, MetaTensor):
                out = self.apply(img.as_tensor(), spacing_of(img.affine), params)
                meta = dict(img.meta)
                meta["affine"] = torch.as_tensor(self.new_affine(np.asarray(img.affine), img.shape[-3:], params))
                d[key] = MetaTensor(out, meta=meta)
            else:
                d[key] = self.apply(torch.as_tensor(img), np.ones(3), params)
        d["degradation"] = [*d.get("degradation", []), {"name": type(self).__name__, **params}]
        return d


class ByModalityd(Randomizable, MapTransform):
    """Apply the transform of each item's modality (``scripts.intensity.item_modality`` of the first key), so
    that CT and MR volumes in one datalist get their own degradations: low-dose CT noise only on CT, Rician
    noise and k-space truncation only on MR."""

    def __init__(
        self,
        keys: KeysCollection,
        transforms: Mapping[str, Callable],
        default_modality: str = "ct",
        allow_missing_keys: bool = False,
    ) -> None:
        MapTransform.__init__(self, keys, allow_missing_keys)
        self.transforms = {str(k).lower(): t for k, t in transforms.items()}
        self.default_modality = default_modality

    def set_random_state(self, seed: int | None = None, state: np.random.RandomState | None = None) -> ByModalityd:
        super().set_random_state(seed, state)
        for t in self.transforms.values():
            if isinstance(t, Randomizable):
                t.set_random_state(seed, state)
        return self

    def randomize(self, data: object = None) -> None:
        """The wrapped transforms draw their own parameters."""

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict:
        modality = item_modality(data, self.first_key(dict(data)), self.default_modality)
        if modality not in self.transforms:
            raise ValueError(f"no degradations for modality {modality!r}; have {sorted(self.transforms)}")
        return self.transforms[modality](dict(data))


def _uniform(rng: np.random.RandomState, value_range: Sequence[float]) -> float:
    lo, hi = (float(value_range[0]), float(value_range[-1]))
    return lo if hi <= lo else float(rng.uniform(lo, hi))


class RandThickSliced(_RandDegradationd):
    """Thick slices along ``axis`` with a factor drawn from ``factor_range`` and a profile from ``profiles``.

    With ``resample_back=True`` (the training condition) the thick volume is interpolated back onto the
    original grid with ``interp``, so image and condition share one grid; otherwise the output lives on the
    thick grid and its affine is updated.
    """

    def __init__(
        self,
        keys: KeysCollection,
        factor_range: Sequence[float] = (1.0, 6.0),
        axis: int = 2,
        profiles: Sequence[str] = ("box", "gaussian"),
        resample_back: bool = True,
        interp: str = "linear",
        prob: float = 1.0,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, prob, allow_missing_keys)
        self.factor_range, self.axis, self.profiles = factor_range, axis, list(profiles)
        self.resample_back, self.interp = resample_back, interp

    def draw(self) -> dict:
        return {"factor": _uniform(self.R, self.factor_range), "profile": str(self.R.choice(self.profiles))}

    def apply(self, img: torch.Tensor, spacing: np.ndarray, params: dict) -> torch.Tensor:
        d = _dim(img, self.axis)
        n = img.shape[d]
        thick = thick_slice(img, params["factor"], self.axis, params["profile"])
        if not self.resample_back:
            return thick
        n_out, scale, offset = thick_axis(n, params["factor"])
        positions = (np.arange(n) - offset) / scale  # thin voxel i sits at thick index (i - offset) / scale
        return apply_along_axis(thick, interpolation_matrix(n_out, positions, self.interp), d)

    def new_affine(self, affine: np.ndarray, shape: Sequence[int], params: dict) -> np.ndarray:
        if self.resample_back:
            return affine
        return thick_slice_affine(affine, int(shape[self.axis]), params["factor"], self.axis)


class RandLowDoseCTd(_RandDegradationd):
    """Low-dose CT noise made in the projection domain (``lowdose_ct``) at a dose fraction from ``dose_range``."""

    def __init__(
        self,
        keys: KeysCollection,
        dose_range: Sequence[float] = (0.1, 0.5),
        photons: float = DEFAULT_PHOTONS,
        n_views: int = 360,
        window: str = "ramp",
        prob: float = 1.0,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, prob, allow_missing_keys)
        self.dose_range, self.photons, self.n_views, self.window = dose_range, photons, n_views, window

    def draw(self) -> dict:
        return {"dose_fraction": _uniform(self.R, self.dose_range), "seed": int(self.R.randint(0, 2**31 - 1))}

    def apply(self, img: torch.Tensor, spacing: np.ndarray, params: dict) -> torch.Tensor:
        gen = torch.Generator().manual_seed(params["seed"])
        return lowdose_ct(img, spacing, params["dose_fraction"], self.photons, self.n_views, self.window, gen)


class RandRicianNoised(_RandDegradationd):
    """Rician noise with ``sigma`` from ``sigma_range``; ``relative=True`` scales it by the 99th percentile."""

    def __init__(
        self,
        keys: KeysCollection,
        sigma_range: Sequence[float] = (0.01, 0.08),
        relative: bool = True,
        prob: float = 1.0,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, prob, allow_missing_keys)
        self.sigma_range, self.relative = sigma_range, relative

    def draw(self) -> dict:
        return {"sigma": _uniform(self.R, self.sigma_range), "seed": int(self.R.randint(0, 2**31 - 1))}

    def apply(self, img: torch.Tensor, spacing: np.ndarray, params: dict) -> torch.Tensor:
        scale = float(torch.quantile(img.float().flatten()[::7], 0.99)) if self.relative else 1.0
        gen = torch.Generator().manual_seed(params["seed"])
        return rician_noise(img, params["sigma"] * scale, gen)


class RandKSpaceTruncated(_RandDegradationd):
    """In-plane low resolution by k-space truncation with a factor from ``factor_range``."""

    def __init__(
        self,
        keys: KeysCollection,
        factor_range: Sequence[float] = (1.0, 3.0),
        axes: Sequence[int] = (0, 1),
        prob: float = 1.0,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, prob, allow_missing_keys)
        self.factor_range, self.axes = factor_range, tuple(axes)

    def draw(self) -> dict:
        return {"factor": _uniform(self.R, self.factor_range)}

    def apply(self, img: torch.Tensor, spacing: np.ndarray, params: dict) -> torch.Tensor:
        return kspace_truncate(img, params["factor"], self.axes)


class RandBlurd(_RandDegradationd):
    """Isotropic blur of known size: Gaussian sigma or box width in mm, drawn from ``size_mm_range``."""

    def __init__(
        self,
        keys: KeysCollection,
        size_mm_range: Sequence[float] = (0.5, 2.0),
        kernels: Sequence[str] = ("gaussian", "box"),
        prob: float = 1.0,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, prob, allow_missing_keys)
        self.size_mm_range, self.kernels = size_mm_range, list(kernels)

    def draw(self) -> dict:
        return {"size_mm": _uniform(self.R, self.size_mm_range), "kernel": str(self.R.choice(self.kernels))}

    def apply(self, img: torch.Tensor, spacing: np.ndarray, params: dict) -> torch.Tensor:
        return blur(img, params["size_mm"], spacing, params["kernel"])
