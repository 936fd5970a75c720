"""The lbmc demo payload (run as volunteers run it) and its validator."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import uproot

from airlock.demo import lbmc
from airlock.demo.lbmc_validator import LbmcValidator
from airlock.validator.apps import InvalidResult, Output, validator_for

SCRIPT = Path(lbmc.__file__)
EVENTS = 500


def run_payload(workdir: Path, seed: int, events: int = EVENTS) -> Path:
    workdir.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        [sys.executable, str(SCRIPT), "--seed", str(seed), "--events", str(events), "--out", "events.root"],
        cwd=workdir,
        check=True,
        capture_output=True,
        timeout=60,
    )
    return workdir / "events.root"


def outputs(path: Path) -> dict[str, Output]:
    return {"events.root": Output("events.root", path, path.stat().st_size, "0" * 64)}


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("lbmc")
    return {
        "a": run_payload(base / "a", seed=11),
        "b": run_payload(base / "b", seed=11),
        "other": run_payload(base / "other", seed=12),
    }


PARAMS = {"seed": 11, "events": EVENTS}
validator = LbmcValidator()


def refused(params: dict[str, int], path: Path) -> str:
    with pytest.raises(InvalidResult) as info:
        validator.check(params, outputs(path))
    return str(info.value)


def tampered(tmp_path: Path, source: Path, change: dict[str, tuple[int, float]]) -> Path:
    """A well-formed lbmc file whose columns are those of `source` with single values replaced."""
    with uproot.open(source) as root:
        columns = {
            k: np.array(v) for k, v in root["events"].arrays(list(lbmc.BRANCHES), library="np").items()
        }
        seed = int(root["info"]["seed"].array(library="np")[0])
    for branch, (row, value) in change.items():
        columns[branch][row] = value
    out = tmp_path / "events.root"
    lbmc.write(str(out), seed, columns)
    return out


def test_the_payload_writes_every_generated_event_and_the_run_info(runs: dict[str, Path]) -> None:
    with uproot.open(runs["a"]) as root:
        assert root["events"].num_entries == EVENTS
        info = root["info"].arrays(library="np")
        accepted = root["events"]["accepted"].array(library="np")
    assert int(info["seed"][0]) == 11
    assert int(info["n_generated"][0]) == EVENTS
    assert int(info["n_accepted"][0]) == int(accepted.sum())
    assert 0.05 * EVENTS < accepted.sum() < 0.5 * EVENTS  # acceptance of |η| < 2.4 and the pT cuts


def test_same_seed_same_fingerprint_different_seed_differs(runs: dict[str, Path]) -> None:
    for name in ("a", "b"):
        validator.check(PARAMS, outputs(runs[name]))
    validator.check({"seed": 12, "events": EVENTS}, outputs(runs["other"]))
    fa = validator.fingerprint(PARAMS, outputs(runs["a"]))
    assert fa == validator.fingerprint(PARAMS, outputs(runs["b"]))
    assert fa != validator.fingerprint({"seed": 12, "events": EVENTS}, outputs(runs["other"]))
    assert len(fa) == 64


def test_the_lbmc_app_is_registered() -> None:
    assert isinstance(validator_for("lbmc"), LbmcValidator)


def test_refuses_a_truncated_file(runs: dict[str, Path], tmp_path: Path) -> None:
    data = runs["a"].read_bytes()
    for cut in (len(data) // 2, len(data) - 100, 300):
        bad = tmp_path / f"cut{cut}.root"
        bad.write_bytes(data[:cut])
        assert "events.root" in refused(PARAMS, bad)


def test_refuses_a_text_file_and_garbage(tmp_path: Path) -> None:
    text = tmp_path / "events.root"
    text.write_text("this is not a ROOT file\n")
    assert "not a readable ROOT file" in refused(PARAMS, text)
    junk = tmp_path / "junk.root"
    junk.write_bytes(b"root\x00" + bytes(range(256)) * 40)
    assert "not a readable ROOT file" in refused(PARAMS, junk)


def test_refuses_a_wrong_entry_count_a_wrong_seed_and_a_missing_output(runs: dict[str, Path]) -> None:
    assert "500 entries, expected 499" in refused({"seed": 11, "events": 499}, runs["a"])
    assert "seed 11" in refused({"seed": 12, "events": EVENTS}, runs["a"])
    with pytest.raises(InvalidResult, match="missing"):
        validator.check(PARAMS, {})
    with pytest.raises(InvalidResult, match="'events' must be an integer"):
        validator.check({"seed": 11}, outputs(runs["a"]))


def test_a_tampered_but_valid_file_gets_a_different_fingerprint(
    runs: dict[str, Path], tmp_path: Path
) -> None:
    with uproot.open(runs["a"]) as root:
        original = root["events"].arrays(["m_pmu"], library="np")["m_pmu"]
    forged = tampered(tmp_path, runs["a"], {"m_pmu": (7, float(original[7]) + 50.0)})
    validator.check(PARAMS, outputs(forged))  # still plausible physics...
    honest = validator.fingerprint(PARAMS, outputs(runs["a"]))
    assert validator.fingerprint(PARAMS, outputs(forged)) != honest  # ...but it does not agree


def test_a_rewrite_of_the_same_values_keeps_the_fingerprint(runs: dict[str, Path], tmp_path: Path) -> None:
    rewritten = tampered(tmp_path, runs["a"], {})
    assert rewritten.read_bytes() != runs["a"].read_bytes()  # uproot writes fresh UUIDs
    assert validator.fingerprint(PARAMS, outputs(rewritten)) == validator.fingerprint(
        PARAMS, outputs(runs["a"])
    )


@pytest.mark.parametrize(
    ("branch", "value", "message"),
    [
        ("m_pmu_true", lbmc.M_LB + 1.0, "m_pmu_true"),
        ("m_pmu", 2 * lbmc.M_LB, "m_pmu"),
        ("p_e", -5.0, "non-positive energy"),
        ("mu_px", float("nan"), "non-finite"),
        ("q2", -1.0, "q2"),
        ("accepted", 3, "0/1"),
    ],
)
def test_refuses_unphysical_values(
    runs: dict[str, Path], tmp_path: Path, branch: str, value: float, message: str
) -> None:
    assert message in refused(PARAMS, tampered(tmp_path, runs["a"], {branch: (3, value)}))


def test_kinematics_conserve_four_momentum() -> None:
    rng = np.random.Generator(np.random.PCG64(5))
    s12, s23 = lbmc.dalitz_sample(rng, 3000)
    assert np.all(lbmc._inside_dalitz(s12, s23))
    p1, p2, p3 = lbmc.decay_at_rest(rng, s12, s23)
    for i in range(3):
        assert np.allclose(p1[i] + p2[i] + p3[i], 0.0, atol=1e-6)
    beta = (np.full(3000, 0.3), np.full(3000, -0.2), np.full(3000, 0.9))
    (b1, e1), (b2, e2), (b3, e3) = (
        lbmc.boost(p, m, beta) for p, m in ((p1, lbmc.M_P), (p2, lbmc.M_MU), (p3, 0.0))
    )
    m_total = np.sqrt((e1 + e2 + e3) ** 2 - sum((b1[i] + b2[i] + b3[i]) ** 2 for i in range(3)))
    assert np.allclose(m_total, lbmc.M_LB, rtol=1e-9)
    assert np.allclose(lbmc.pair_mass(b1, e1, b2, e2), np.sqrt(s12), rtol=1e-8)  # m(pμ) is boost-invariant
    assert np.allclose(lbmc.pair_mass(b2, e2, b3, e3) ** 2, s23, rtol=1e-6)


def test_generation_is_deterministic_and_fast() -> None:
    start = time.perf_counter()
    first = lbmc.generate(3, 2000)
    elapsed = time.perf_counter() - start
    again = lbmc.generate(3, 2000)
    assert all(np.array_equal(first[k], again[k]) for k in lbmc.BRANCHES)
    assert not np.array_equal(first["p_px"], lbmc.generate(4, 2000)["p_px"])
    assert elapsed < 0.2
    m = first["m_pmu_true"]
    assert m.min() >= lbmc.M_P + lbmc.M_MU and m.max() <= lbmc.M_LB


def test_refuses_a_jagged_branch(runs: dict[str, Path], tmp_path: Path) -> None:
    import awkward as ak

    with uproot.open(runs["a"]) as root:
        columns = root["events"].arrays(list(lbmc.BRANCHES), library="np")
    forged = {k: np.asarray(v) for k, v in columns.items()}
    jagged = ak.Array([[float(x), 1.0] for x in forged["p_px"]])
    out = tmp_path / "events.root"
    with uproot.recreate(out) as f:
        f["events"] = {**{k: v for k, v in forged.items() if k != "p_px"}, "p_px": jagged}
        f["info"] = {
            "seed": np.array([11]),
            "n_generated": np.array([EVENTS]),
            "n_accepted": np.array([int(forged["accepted"].sum())]),
            "version": np.array([lbmc.GENERATOR_VERSION], dtype=np.int32),
        }
    assert "branches p_px are not numeric scalars" in refused(PARAMS, out)
