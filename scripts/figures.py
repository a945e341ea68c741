"""PNG figures: montages (axial and coronal views of several volumes side by side, in radiological orientation)
and training curves from the TensorBoard logs of the training runs.

``python -m scripts.figures curves outputs/study/curves.png --runs "{'autoencoder': 'outputs/study/autoencoder'}"``
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import nibabel as nib  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from scripts.volumes import spacing_of  # noqa: E402


def to_lps(volume: np.ndarray | torch.Tensor, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Reorder and flip array axes so that indices run towards patient Left, Posterior, Superior.

    An axial slice ``v[:, :, k].T`` shown with the origin at the top is then in radiological convention.
    Also returns the spacing in that order.
    """
    v = np.asarray(volume.detach().cpu() if isinstance(volume, torch.Tensor) else volume, dtype=np.float32)
    v = v.reshape(v.shape[-3:])
    ornt = nib.orientations.io_orientation(np.asarray(affine, dtype=np.float64))
    target = nib.orientations.axcodes2ornt(("L", "P", "S"))
    transform = nib.orientations.ornt_transform(ornt, target)
    spacing = spacing_of(affine)[np.argsort(transform[:, 0])]
    return nib.orientations.apply_orientation(v, transform), spacing


def montage(
    panels: Mapping[str, np.ndarray | torch.Tensor],
    affine: np.ndarray,
    path: str | os.PathLike,
    window: Sequence[float],
    difference: tuple[str, str] | None = None,
    title: str = "",
) -> str:
    """Axial (top) and coronal (bottom) middle slices of each volume, all on the grid of ``affine``.

    ``difference=(a, b)`` adds a panel ``a - b`` on a symmetric colour scale of half the window width.
    """
    views = {name: to_lps(v, affine) for name, v in panels.items()}
    if difference is not None:
        a, b = difference
        views[f"{a} - {b}"] = (views[a][0] - views[b][0], views[a][1])
    n = len(views)
    fig, axes = plt.subplots(2, n, figsize=(3.2 * n, 6.4), squeeze=False)
    lo, hi = float(window[0]), float(window[1])
    half = (hi - lo) / 4
    for col, (name, (v, sp)) in enumerate(views.items()):
        is_diff = difference is not None and col == n - 1
        kw = {"cmap": "coolwarm", "vmin": -half, "vmax": half} if is_diff else {"cmap": "gray", "vmin": lo, "vmax": hi}
        axial = v[:, :, v.shape[2] // 2].T
        coronal = np.flipud(v[:, v.shape[1] // 2, :].T)
        axes[0, col].imshow(axial, aspect=sp[1] / sp[0], interpolation="nearest", **kw)
        axes[1, col].imshow(coronal, aspect=sp[2] / sp[0], interpolation="nearest", **kw)
        axes[0, col].set_title(name, fontsize=10)
        for ax in axes[:, col]:
            ax.set_axis_off()
    if title:
        fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return str(path)


def training_curves(runs: Mapping[str, str | os.PathLike], path: str | os.PathLike) -> str:
    """One row per training run (a TensorBoard log folder): the training loss per iteration (with a 25-point
    running mean) and each validation metric per epoch."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    rows = []
    for name, folder in runs.items():
        acc = EventAccumulator(str(folder))
        acc.Reload()
        tags = acc.Tags()["scalars"]
        train = "train_loss" if "train_loss" in tags else "loss"
        if train not in tags:
            raise ValueError(f"{folder}: no training loss in the TensorBoard logs (scalars: {tags})")
        rows.append(
            (
                name,
                {
                    t: [(e.step, e.value) for e in acc.Scalars(t)]
                    for t in [train, *sorted(t for t in tags if t.startswith("val_"))]
                },
            )
        )
    ncol = max(len(series) for _, series in rows)
    fig, axes = plt.subplots(len(rows), ncol, figsize=(4.0 * ncol, 2.8 * len(rows)), squeeze=False)
    for r, (name, series) in enumerate(rows):
        for c, (tag, points) in enumerate(series.items()):
            steps, values = np.array(points).T
            ax = axes[r, c]
            if c == 0:
                ax.plot(steps, values, lw=0.5, alpha=0.4, color="C0")
                k = min(25, len(values))
                ax.plot(steps[k - 1 :], np.convolve(values, np.ones(k) / k, mode="valid"), color="C0")
                ax.set_xlabel("iteration")
                ax.set_yscale("log")
            else:
                ax.plot(steps, values, "o-", color="C1")
                ax.set_xlabel("epoch")
            ax.set_title(f"{name}: {tag}", fontsize=10)
        for c in range(len(series), ncol):
            axes[r, c].set_axis_off()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return str(path)


if __name__ == "__main__":
    import fire

    fire.Fire({"curves": lambda output, runs: training_curves(runs, output)})
