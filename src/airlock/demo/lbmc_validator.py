"""The validator of the lbmc demo app: is `events.root` a plausible output of `lbmc.py`, and a fingerprint
of its physics content for the quorum.

The file comes from an untrusted host, so every failure of uproot on it (any exception type: a hostile
file can make the decoder fail in many ways) becomes an InvalidResult.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from typing import Any

import numpy as np
import numpy.typing as npt

from airlock.demo.lbmc import (
    BRANCHES,
    FLOAT_BRANCHES,
    GENERATOR_VERSION,
    INFO_BRANCHES,
    M_LB,
    M_MU,
    M_P,
)
from airlock.validator.apps import InvalidResult, Output

OUTPUT = "events.root"
# Reconstructed masses are smeared by the tracker resolution (< 1 %); anything past this is not smearing.
SMEARING_MARGIN = 0.05
# Relative slack for rounding in masses computed from float64 components.
ROUNDING = 1e-9

Columns = dict[str, npt.NDArray[Any]]


def _param_int(params: Mapping[str, Any], key: str) -> int:
    value = params.get(key)
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidResult(f"job parameter {key!r} must be an integer, got {value!r}")
    return value


def read_events(outputs: Mapping[str, Output], n_events: int) -> tuple[Columns, Columns]:
    """The "events" and "info" trees of the declared output as numpy columns; InvalidResult if the file is
    unreadable or its "events" tree does not hold `n_events` entries (checked before reading any basket)."""
    output = outputs.get(OUTPUT)
    if output is None:
        raise InvalidResult(f"declared output {OUTPUT} is missing")
    import uproot  # slow to import: only when a result is checked

    try:
        with uproot.open(output.path) as root:
            trees: list[Columns] = []
            for name, branches in (("events", BRANCHES), ("info", INFO_BRANCHES)):
                if name not in root:
                    raise InvalidResult(f"{OUTPUT} has no {name!r} tree")
                tree = root[name]
                missing = [b for b in branches if b not in tree.keys()]  # noqa: SIM118 (a TTree, not a dict)
                if missing:
                    raise InvalidResult(f"{OUTPUT}: tree {name!r} lacks branches {', '.join(missing)}")
                entries = int(tree.num_entries)
                expected = n_events if name == "events" else 1
                if entries != expected:
                    raise InvalidResult(
                        f"{OUTPUT}: the {name!r} tree has {entries} entries, expected {expected}"
                    )
                arrays = tree.arrays(list(branches), library="np")
                columns = {b: np.asarray(arrays[b]) for b in branches}
                odd = [b for b, c in columns.items() if c.dtype.kind not in "biuf" or c.shape != (expected,)]
                if odd:
                    raise InvalidResult(
                        f"{OUTPUT}: {name!r} branches {', '.join(odd)} are not numeric scalars"
                    )
                trees.append(columns)
            return trees[0], trees[1]
    except InvalidResult:
        raise
    except Exception as exc:  # anything uproot raises on a hostile or damaged file
        detail = " ".join(str(exc).split())[:300]
        raise InvalidResult(f"{OUTPUT} is not a readable ROOT file: {type(exc).__name__}: {detail}") from exc


def _check_info(params: Mapping[str, Any], info: Columns, n_events: int) -> None:
    seed, n_generated = int(info["seed"][0]), int(info["n_generated"][0])
    if "seed" in params and seed != _param_int(params, "seed"):
        raise InvalidResult(f"{OUTPUT} was generated with seed {seed}, the job asked for {params['seed']}")
    if n_generated != n_events:
        raise InvalidResult(f"{OUTPUT}: info says {n_generated} events generated, the job asked {n_events}")
    if int(info["version"][0]) != GENERATOR_VERSION:
        raise InvalidResult(f"{OUTPUT} comes from lbmc version {int(info['version'][0])}")


def _check_physics(events: Columns, info: Columns) -> None:
    for name in FLOAT_BRANCHES:
        if not np.all(np.isfinite(events[name])):
            raise InvalidResult(f"{OUTPUT}: branch {name} has non-finite values")
    if not np.array_equal(events["event"], np.arange(len(events["event"]))):
        raise InvalidResult(f"{OUTPUT}: event numbers are not 0..N-1 in order")
    accepted = events["accepted"]
    if not np.all((accepted == 0) | (accepted == 1)):
        raise InvalidResult(f"{OUTPUT}: 'accepted' is not a 0/1 flag")
    if int(np.sum(accepted)) != int(info["n_accepted"][0]):
        raise InvalidResult(f"{OUTPUT}: info's n_accepted does not match the accepted flags")
    for particle, mass in (("p", M_P), ("mu", M_MU), ("nu", 0.0)):
        e = events[f"{particle}_e"]
        p2 = events[f"{particle}_px"] ** 2 + events[f"{particle}_py"] ** 2 + events[f"{particle}_pz"] ** 2
        if np.any(e <= 0.0):
            raise InvalidResult(f"{OUTPUT}: {particle} has a non-positive energy")
        if np.any(np.abs(e**2 - p2 - mass**2) > ROUNDING * e**2 + 1e-6):
            raise InvalidResult(f"{OUTPUT}: {particle} four-momenta are off the mass shell")
    _check_range(events["m_pmu_true"], M_P + M_MU, M_LB, "m_pmu_true")
    _check_range(events["m_pmu"], M_P + M_MU, M_LB * (1.0 + SMEARING_MARGIN), "m_pmu")
    _check_range(events["q2"], 0.0, (M_LB - M_P) ** 2 / 1.0e6, "q2")
    if np.any(events["lb_pt"] < 0.0):
        raise InvalidResult(f"{OUTPUT}: negative Λb pT")


def _check_range(values: npt.NDArray[Any], low: float, high: float, name: str) -> None:
    slack = ROUNDING * max(abs(high), 1.0)
    bad = (values < low - slack) | (values > high + slack)
    if np.any(bad):
        first = float(values[np.argmax(bad)])
        raise InvalidResult(f"{OUTPUT}: {name} = {first:g} outside the physical range [{low:g}, {high:g}]")


def fingerprint_columns(events: Columns, info: Columns) -> str:
    """sha256 over the trees' contents in a fixed branch order. Floats are rounded to float32 first, so
    last-bit differences of transcendental functions between CPUs do not split a quorum."""
    h = hashlib.sha256()
    h.update(f"lbmc v{GENERATOR_VERSION} n={len(events['event'])}\n".encode())
    for name in INFO_BRANCHES:
        h.update(f"info.{name}={int(info[name][0])}\n".encode())
    for name in BRANCHES:
        column = events[name]
        h.update(f"events.{name}\n".encode())
        if name in FLOAT_BRANCHES:
            rounded = (np.asarray(column, dtype=np.float64) + 0.0).astype("<f4")  # + 0.0 turns -0.0 into 0.0
            h.update(rounded.tobytes())
        else:
            h.update(np.asarray(column, dtype="<i8").tobytes())
    return h.hexdigest()


class LbmcValidator:
    """AppValidator of the `lbmc` app; job params: {"seed": int, "events": int}."""

    name = "lbmc"

    def check(self, params: Mapping[str, Any], outputs: Mapping[str, Output]) -> None:
        n_events = _param_int(params, "events")
        events, info = read_events(outputs, n_events)
        _check_info(params, info, n_events)
        _check_physics(events, info)

    def fingerprint(self, params: Mapping[str, Any], outputs: Mapping[str, Output]) -> str:
        events, info = read_events(outputs, _param_int(params, "events"))
        return fingerprint_columns(events, info)
