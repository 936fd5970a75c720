"""PNG plots for the HTML report: the return-time curve (CMS paper Fig. 2) and the p+μ invariant mass of
the lbmc events (its Fig. 6). matplotlib is driven through `Figure` objects (Agg canvas, no pyplot state).
"""

from __future__ import annotations

import io
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from airlock.reporter.model import ReturnTimes
from airlock.storage.base import Storage

M_BS_GEV = (
    5.36692  # B_s mass: the p+μ mass of Lambda_b -> p mu nu overlaps it (the reason for the CMS request)
)
M_LB_GEV = 5.6196


@dataclass(frozen=True)
class MassSample:
    masses_mev: npt.NDArray[np.float64]  # m_pmu of the accepted events
    files_read: int
    events: int  # generated, accepted or not
    unreadable: list[str]  # keys that could not be read


def _png(fig: Any) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    return buf.getvalue()


def return_time_png(curves: Iterable[ReturnTimes]) -> bytes | None:
    """Fraction of each batch's jobs returned vs time since the batch was created (in hours, as in the CMS
    paper's Fig. 2, or minutes or seconds for short runs); None if nothing came."""
    from matplotlib.figure import Figure

    curves = [c for c in curves if c.times_s]
    if not curves:
        return None
    longest = max(max(c.times_s) for c in curves)
    unit, scale = ("h", 3600.0) if longest >= 7200 else ("min", 60.0) if longest >= 120 else ("s", 1.0)
    fig = Figure(figsize=(7, 4))
    ax = fig.add_subplot()
    for c in curves:
        elapsed = np.concatenate([[0.0], np.asarray(c.times_s) / scale])
        fraction = np.arange(len(elapsed)) / c.jobs
        ax.step(elapsed, fraction, where="post", label=f"batch {c.batch_id}: {c.batch_name}"[:60])
    for level in (0.5, 0.9, 1.0):
        ax.axhline(level, color="grey", linewidth=0.6, linestyle=":")
    ax.set_xlabel(f"time since batch submission [{unit}]")
    ax.set_ylabel("fraction of results returned")
    ax.set_ylim(0.0, 1.05)
    ax.set_xlim(left=0.0)
    ax.legend(loc="lower right", fontsize="small")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return _png(fig)


def read_masses(trusted: Storage, keys: Iterable[str]) -> MassSample:
    """m_pmu of the accepted events of lbmc outputs in trusted storage; unreadable files are listed."""
    import uproot

    chunks: list[npt.NDArray[np.float64]] = []
    unreadable: list[str] = []
    events = files_read = 0
    for key in keys:
        try:
            path = trusted.local_path(key)
            if path is None:  # a remote store: read the file into memory
                with trusted.open_read(key) as fh:
                    source: Any = io.BytesIO(fh.read())
            else:
                source = path
            with uproot.open(source) as root:
                arrays = root["events"].arrays(["m_pmu", "accepted"], library="np")
            accepted = np.asarray(arrays["accepted"]) != 0
            chunks.append(np.asarray(arrays["m_pmu"], dtype=np.float64)[accepted])
            events += len(accepted)
            files_read += 1
        except Exception:  # a report is not the place to fail on one bad file: list it instead
            unreadable.append(key)
    masses = np.concatenate(chunks) if chunks else np.zeros(0, dtype=np.float64)
    return MassSample(masses, files_read, events, unreadable)


def mass_png(sample: MassSample) -> bytes | None:
    """Histogram of the reconstructed p+μ mass, with the B_s and Λb masses marked; None without events."""
    from matplotlib.figure import Figure

    if sample.masses_mev.size == 0:
        return None
    fig = Figure(figsize=(7, 4))
    ax = fig.add_subplot()
    ax.hist(sample.masses_mev / 1000.0, bins=60, range=(1.0, 6.0), histtype="stepfilled", alpha=0.7)
    ax.axvline(M_BS_GEV, color="tab:red", linestyle="--", label=f"$B_s$ mass {M_BS_GEV:.2f} GeV")
    ax.axvline(M_LB_GEV, color="black", linestyle=":", label=rf"$\Lambda_b$ mass {M_LB_GEV:.2f} GeV")
    ax.set_xlabel(r"reconstructed $m(p\mu)$ [GeV/$c^2$]")
    ax.set_ylabel("events / 83 MeV")
    ax.set_title(
        rf"$\Lambda_b \to p\mu\nu$: {sample.masses_mev.size} accepted events from {sample.files_read} files"
    )
    ax.legend(loc="upper left", fontsize="small")
    fig.tight_layout()
    return _png(fig)
