"""Figures of the quantization-error study, drawn from plain arrays and dicts so that notebooks can reuse them.

Every function returns a `matplotlib.figure.Figure` attached to an Agg canvas. None of them touches pyplot's
global state, so they work in scripts without a display and never change a notebook's backend.
"""

from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from numpy.typing import ArrayLike

FROBENIUS_LABEL = r"relative error $\|W - Q - AB\|_F \,/\, \|W\|_F$"
QLORA_COLOR = "tab:gray"
LOFTQ_COLOR = "tab:blue"


def new_figure(width: float, height: float) -> Figure:
    """Return an empty figure of `width` x `height` inches that renders with the Agg backend."""
    figure = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def save_figure(figure: Figure, path: str | Path, *, dpi: int = 120) -> Path:
    """Write `figure` as a PNG file and return its path."""
    path = Path(path)
    figure.savefig(path, dpi=dpi, format="png")
    return path


def _panel_grid(figure: Figure, count: int, *, max_columns: int = 4):
    columns = min(count, max_columns)
    rows = -(-count // columns)
    axes = figure.subplots(rows, columns, squeeze=False)
    for extra in axes.flat[count:]:
        extra.set_visible(False)
    return list(axes.flat[:count])


def _figure_legend(figure: Figure) -> None:
    """Put the first panel's legend under all panels, where it hides no data."""
    handles, labels = figure.axes[0].get_legend_handles_labels()
    figure.legend(handles, labels, loc="outside lower center", ncols=min(len(handles), 4), fontsize="small")


# ---------------------------------------------------------------------------------------------------
# Error against alternating steps T


def plot_error_vs_steps(
    frobenius_by_bits: Mapping[int, ArrayLike],
    spectral_by_bits: Mapping[int, ArrayLike] | None = None,
    *,
    codebook: str = "nf",
    rank: int = 16,
) -> Figure:
    """Plot the mean relative error against LoftQ's alternating steps T, one panel per bit width.

    Args:
      frobenius_by_bits: bits -> array (num_weights, max_steps + 1) of relative Frobenius errors, where
        column t is the error after t steps and column 0 is QLoRA.
      spectral_by_bits: the same in spectral norm, drawn dashed; None leaves it out.
      codebook: code book name for the title.
      rank: LoRA rank r for the title.

    Returns:
      The figure. A shaded band spans the lowest to the highest Frobenius error over the weights.
    """
    bits_list = sorted(frobenius_by_bits)
    figure = new_figure(3.6 * min(len(bits_list), 4), 3.4 * -(-len(bits_list) // 4))
    for axes, bits in zip(_panel_grid(figure, len(bits_list)), bits_list):
        errors_WxT = np.asarray(frobenius_by_bits[bits], dtype=np.float64)
        steps = np.arange(errors_WxT.shape[1])
        axes.fill_between(steps, errors_WxT.min(axis=0), errors_WxT.max(axis=0), color=LOFTQ_COLOR, alpha=0.2,
                          label="Frobenius, min to max over weights")
        axes.plot(steps, errors_WxT.mean(axis=0), "o-", color=LOFTQ_COLOR, markersize=3, label="Frobenius, mean")
        if spectral_by_bits is not None and bits in spectral_by_bits:
            spectral_WxT = np.asarray(spectral_by_bits[bits], dtype=np.float64)
            axes.plot(steps, spectral_WxT.mean(axis=0), "s--", color="tab:orange", markersize=3,
                      label="spectral, mean")
        axes.set_title(f"{bits}-bit {codebook}")
        axes.set_xlabel("alternating steps T (T = 0 is QLoRA)")
        axes.set_ylabel("relative error (mean over weights)")
        axes.set_xticks(steps)
        axes.grid(alpha=0.3)
    _figure_legend(figure)
    figure.suptitle(f"LoftQ error against steps T, rank {rank}; norm ‖W − Q − AB‖ / ‖W‖")
    return figure


# ---------------------------------------------------------------------------------------------------
# Per-weight QLoRA against LoftQ


def plot_per_weight(
    names: Sequence[str],
    qlora_by_bits: Mapping[int, ArrayLike],
    loftq_by_bits: Mapping[int, ArrayLike],
    *,
    steps: int,
    rank: int = 16,
    codebook: str = "nf",
) -> Figure:
    """Plot QLoRA's and LoftQ's relative Frobenius error for every weight, one panel per bit width.

    Args:
      names: weight labels, one per bar pair, in plotting order.
      qlora_by_bits: bits -> array (num_weights,) of QLoRA errors (T = 0).
      loftq_by_bits: bits -> array (num_weights,) of LoftQ errors after `steps` steps.
      steps: LoftQ's alternating steps T, for the legend.
      rank: LoRA rank r, for the title.
      codebook: code book name, for the title.
    """
    bits_list = sorted(qlora_by_bits)
    positions = np.arange(len(names))
    figure = new_figure(max(8.0, 0.28 * len(names) + 2.0), 2.6 * len(bits_list) + 1.2)
    panels = figure.subplots(len(bits_list), 1, squeeze=False, sharex=True)[:, 0]
    for axes, bits in zip(panels, bits_list):
        axes.bar(positions - 0.2, np.asarray(qlora_by_bits[bits]), width=0.4, color=QLORA_COLOR,
                 label="QLoRA (T = 0)")
        axes.bar(positions + 0.2, np.asarray(loftq_by_bits[bits]), width=0.4, color=LOFTQ_COLOR,
                 label=f"LoftQ (T = {steps})")
        axes.set_title(f"{bits}-bit {codebook}, rank {rank}")
        axes.set_ylabel("relative Frobenius error")
        axes.grid(axis="y", alpha=0.3)
    _figure_legend(figure)
    panels[-1].set_xticks(positions, names, rotation=90, fontsize="small")
    panels[-1].set_xlabel("weight")
    figure.suptitle(f"QLoRA against LoftQ per weight; {FROBENIUS_LABEL}")
    return figure


# ---------------------------------------------------------------------------------------------------
# Error against rank


def plot_error_vs_rank(
    ranks: Sequence[int],
    qlora_by_bits: Mapping[int, ArrayLike],
    loftq_by_bits: Mapping[int, ArrayLike],
    spectral_by_bits: Mapping[int, ArrayLike] | None = None,
    *,
    steps: int,
    codebook: str = "nf",
) -> Figure:
    """Plot LoftQ's mean relative error against the LoRA rank, one panel per bit width.

    Args:
      ranks: the ranks r on the x axis, ascending.
      qlora_by_bits: bits -> array (num_weights,) of QLoRA Frobenius errors; QLoRA's error does not
        depend on the rank because its adapters start at zero, so it is a horizontal line.
      loftq_by_bits: bits -> array (num_weights, len(ranks)) of LoftQ Frobenius errors after `steps` steps.
      spectral_by_bits: the same as `loftq_by_bits` in spectral norm, drawn dashed; None leaves it out.
      steps: LoftQ's alternating steps T, for the legend.
      codebook: code book name, for the titles.
    """
    bits_list = sorted(loftq_by_bits)
    figure = new_figure(4.2 * min(len(bits_list), 4), 3.6 * -(-len(bits_list) // 4))
    for axes, bits in zip(_panel_grid(figure, len(bits_list)), bits_list):
        errors_WxR = np.asarray(loftq_by_bits[bits], dtype=np.float64)
        axes.axhline(np.mean(qlora_by_bits[bits]), color=QLORA_COLOR, linestyle=":", label="QLoRA, Frobenius")
        axes.fill_between(ranks, errors_WxR.min(axis=0), errors_WxR.max(axis=0), color=LOFTQ_COLOR, alpha=0.2,
                          label="LoftQ, min to max over weights")
        axes.plot(ranks, errors_WxR.mean(axis=0), "o-", color=LOFTQ_COLOR, label=f"LoftQ T = {steps}, Frobenius")
        if spectral_by_bits is not None and bits in spectral_by_bits:
            spectral_WxR = np.asarray(spectral_by_bits[bits], dtype=np.float64)
            axes.plot(ranks, spectral_WxR.mean(axis=0), "s--", color="tab:orange",
                      label=f"LoftQ T = {steps}, spectral")
        axes.set_xscale("log", base=2)
        axes.set_xticks(list(ranks), [str(rank) for rank in ranks])
        axes.set_title(f"{bits}-bit {codebook}")
        axes.set_xlabel("LoRA rank r")
        axes.set_ylabel("relative error (mean over weights)")
        axes.grid(alpha=0.3)
    _figure_legend(figure)
    figure.suptitle("Error against rank; norm ‖W − Q − AB‖ / ‖W‖")
    return figure


# ---------------------------------------------------------------------------------------------------
# Code books


def plot_codebooks(
    codebooks: Sequence[str],
    qlora: Mapping[tuple[str, int], float],
    loftq: Mapping[tuple[str, int], float],
    *,
    steps: int,
    rank: int = 16,
) -> Figure:
    """Plot mean QLoRA and LoftQ errors of each code book, one panel per bit width.

    Args:
      codebooks: code book names in bar order, such as ("nf", "int", "uniform").
      qlora: (code book, bits) -> mean relative Frobenius error of QLoRA.
      loftq: (code book, bits) -> mean relative Frobenius error of LoftQ after `steps` steps.
      steps: LoftQ's alternating steps T, for the legend.
      rank: LoRA rank r, for the title.
    """
    bits_list = sorted({bits for _, bits in qlora})
    positions = np.arange(len(codebooks))
    figure = new_figure(3.4 * min(len(bits_list), 4), 3.4 * -(-len(bits_list) // 4))
    for axes, bits in zip(_panel_grid(figure, len(bits_list)), bits_list):
        qlora_values = [qlora[codebook, bits] for codebook in codebooks]
        loftq_values = [loftq[codebook, bits] for codebook in codebooks]
        qlora_bars = axes.bar(positions - 0.2, qlora_values, width=0.4, color=QLORA_COLOR, label="QLoRA (T = 0)")
        loftq_bars = axes.bar(positions + 0.2, loftq_values, width=0.4, color=LOFTQ_COLOR, label=f"LoftQ (T = {steps})")
        # Errors differ by orders of magnitude between code books at 8 bits, so the bars carry their values.
        for bars in (qlora_bars, loftq_bars):
            axes.bar_label(bars, fmt="%.3f", fontsize="x-small", rotation=90, padding=2)
        axes.margins(y=0.2)
        axes.set_xticks(positions, list(codebooks))
        axes.set_title(f"{bits} bits")
        axes.set_xlabel("code book")
        axes.set_ylabel("relative Frobenius error (mean)")
        axes.grid(axis="y", alpha=0.3)
    _figure_legend(figure)
    figure.suptitle(
        f"Code books at rank {rank}\nnf: normal float per block, int: absmax per block, uniform: affine per tensor",
        fontsize="medium",
    )
    return figure
