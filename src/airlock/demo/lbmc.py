#!/usr/bin/env python3
"""lbmc: a toy Monte Carlo of semileptonic Λb⁰ → p μ⁻ anti-nu decays, the CMS@home workflow of Fig. 6.

The demo's payload: copied to volunteers as a job input and run as

    python3 lbmc.py --seed S --events N --out events.root

Needs only the standard library, numpy and uproot. Steps, all vectorised over events:
  1. produce Λb⁰ with a falling pT spectrum (Γ(2) shape), flat η in ±ETA_MAX and flat φ;
  2. decay each one by three-body phase space: (m²(pμ), m²(μnu)) uniform inside the Dalitz region
     (accept/reject on the enclosing rectangle; phase space is flat there), random orientation;
  3. boost the daughters to the lab;
  4. smear the proton and muon momenta with a tracker resolution sigma(p)/p = a ⊕ b·pT;
  5. flag the events whose p and μ pass the acceptance cuts (|η|, pT).

Every generated event is written, with an `accepted` flag, so the "events" tree has exactly --events
entries. Units: MeV for energies and momenta, GeV² for q2. Only uniform draws of numpy's PCG64 are used
(its bit stream is stable across numpy versions), so a seed gives the same physics everywhere.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

GENERATOR_VERSION = 1

M_LB = 5619.6  # Λb⁰ mass, MeV
M_P = 938.27  # proton
M_MU = 105.66  # muon
M_NU = 0.0  # neutrino

PT_SCALE = 3000.0  # MeV; pT ~ Γ(2, PT_SCALE): mean 6 GeV
ETA_MAX = 3.0  # Λb produced flat in |η| < ETA_MAX
RES_CONST = 0.005  # sigma(p)/p constant term
RES_PT = 1.0e-7  # sigma(p)/p term per MeV of pT (0.01 % per GeV)
CUT_ETA = 2.4  # tracker acceptance
CUT_PT_P = 1000.0  # MeV
CUT_PT_MU = 3000.0  # MeV, a muon trigger threshold

# The "events" tree, in this order. The validator reads the same list.
FLOAT_BRANCHES: tuple[str, ...] = (
    "lb_pt",
    "lb_eta",
    "lb_phi",
    "p_px",
    "p_py",
    "p_pz",
    "p_e",
    "mu_px",
    "mu_py",
    "mu_pz",
    "mu_e",
    "nu_px",
    "nu_py",
    "nu_pz",
    "nu_e",
    "m_pmu",
    "m_pmu_true",
    "q2",
)
INT_BRANCHES: tuple[str, ...] = ("event", "accepted")
BRANCHES: tuple[str, ...] = INT_BRANCHES + FLOAT_BRANCHES
INFO_BRANCHES: tuple[str, ...] = ("seed", "n_generated", "n_accepted", "version")

FloatArray = npt.NDArray[np.float64]
Vec = tuple[FloatArray, FloatArray, FloatArray]


def gaussian(rng: np.random.Generator, n: int) -> FloatArray:
    """Standard normal numbers by Box-Muller from uniform draws only."""
    u1 = 1.0 - rng.random(n)  # (0, 1]
    u2 = rng.random(n)
    return np.sqrt(-2.0 * np.log(u1)) * np.cos(2.0 * np.pi * u2)


def produce(rng: np.random.Generator, n: int) -> tuple[FloatArray, FloatArray, FloatArray]:
    """pT, η, φ of n Λb⁰: pT is the sum of two exponentials, i.e. Γ(2, PT_SCALE)."""
    u = 1.0 - rng.random((2, n))
    pt = -PT_SCALE * np.log(u[0] * u[1])
    eta = ETA_MAX * (2.0 * rng.random(n) - 1.0)
    phi = 2.0 * np.pi * rng.random(n) - np.pi
    return pt, eta, phi


def dalitz_sample(rng: np.random.Generator, n: int) -> tuple[FloatArray, FloatArray]:
    """n points (m12², m23²) uniform in the Dalitz region of M → 1 2 3 (1 = p, 2 = μ, 3 = nu)."""
    lo12, hi12 = (M_P + M_MU) ** 2, (M_LB - M_NU) ** 2
    lo23, hi23 = (M_MU + M_NU) ** 2, (M_LB - M_P) ** 2
    got12: list[FloatArray] = []
    got23: list[FloatArray] = []
    have = 0
    while have < n:
        batch = max(2 * (n - have), 64)
        s12 = lo12 + (hi12 - lo12) * rng.random(batch)
        s23 = lo23 + (hi23 - lo23) * rng.random(batch)
        inside = _inside_dalitz(s12, s23)
        got12.append(s12[inside])
        got23.append(s23[inside])
        have += int(inside.sum())
    return np.concatenate(got12)[:n], np.concatenate(got23)[:n]


def _inside_dalitz(s12: FloatArray, s23: FloatArray) -> npt.NDArray[np.bool_]:
    """The PDG kinematic limits of m23² at a given m12² (energies in the 12 rest frame)."""
    m12 = np.sqrt(s12)
    e2 = (s12 - M_P**2 + M_MU**2) / (2.0 * m12)
    e3 = (M_LB**2 - s12 - M_NU**2) / (2.0 * m12)
    p2 = np.sqrt(np.maximum(e2**2 - M_MU**2, 0.0))
    p3 = np.sqrt(np.maximum(e3**2 - M_NU**2, 0.0))
    s_min = (e2 + e3) ** 2 - (p2 + p3) ** 2
    s_max = (e2 + e3) ** 2 - (p2 - p3) ** 2
    return np.asarray((s23 >= s_min) & (s23 <= s_max), dtype=np.bool_)


def decay_at_rest(rng: np.random.Generator, s12: FloatArray, s23: FloatArray) -> tuple[Vec, Vec, Vec]:
    """Momenta of p, μ, nu in the Λb rest frame for the given Dalitz point, randomly oriented."""
    e1 = (M_LB**2 + M_P**2 - s23) / (2.0 * M_LB)
    e3 = (M_LB**2 + M_NU**2 - s12) / (2.0 * M_LB)
    e2 = M_LB - e1 - e3
    k1 = np.sqrt(np.maximum(e1**2 - M_P**2, 0.0))
    k2 = np.sqrt(np.maximum(e2**2 - M_MU**2, 0.0))
    k3 = np.sqrt(np.maximum(e3**2 - M_NU**2, 0.0))
    cos13 = np.clip((k2**2 - k1**2 - k3**2) / np.maximum(2.0 * k1 * k3, 1e-300), -1.0, 1.0)
    sin13 = np.sqrt(1.0 - cos13**2)
    n = s12.size
    # an orthonormal frame (u, v, w) uniformly oriented: u uniform on the sphere, ψ uniform about it
    cos_t = 2.0 * rng.random(n) - 1.0
    sin_t = np.sqrt(1.0 - cos_t**2)
    phi = 2.0 * np.pi * rng.random(n)
    psi = 2.0 * np.pi * rng.random(n)
    u = (sin_t * np.cos(phi), sin_t * np.sin(phi), cos_t)
    v = (cos_t * np.cos(phi), cos_t * np.sin(phi), -sin_t)
    w = (-np.sin(phi), np.cos(phi), np.zeros(n))
    p1 = (k1 * u[0], k1 * u[1], k1 * u[2])
    p3 = tuple(k3 * (cos13 * u[i] + sin13 * (np.cos(psi) * v[i] + np.sin(psi) * w[i])) for i in range(3))
    p3v: Vec = (p3[0], p3[1], p3[2])
    p2: Vec = (-p1[0] - p3v[0], -p1[1] - p3v[1], -p1[2] - p3v[2])
    return p1, p2, p3v


def boost(p: Vec, mass: float, beta: Vec) -> tuple[Vec, FloatArray]:
    """Lorentz-boost momenta p (of a particle of this mass) by velocity beta; returns (p', E')."""
    e = np.sqrt(p[0] ** 2 + p[1] ** 2 + p[2] ** 2 + mass**2)
    b2 = beta[0] ** 2 + beta[1] ** 2 + beta[2] ** 2
    gamma = 1.0 / np.sqrt(1.0 - b2)
    bp = beta[0] * p[0] + beta[1] * p[1] + beta[2] * p[2]
    coef = np.where(b2 > 0.0, (gamma - 1.0) * bp / np.where(b2 > 0.0, b2, 1.0), 0.0) + gamma * e
    out: Vec = (p[0] + coef * beta[0], p[1] + coef * beta[1], p[2] + coef * beta[2])
    return out, gamma * (e + bp)


def smear(rng: np.random.Generator, p: Vec, mass: float) -> tuple[Vec, FloatArray]:
    """Scale |p| by a Gaussian resolution, keep the direction; the energy uses the mass hypothesis."""
    pt = np.hypot(p[0], p[1])
    sigma = np.hypot(RES_CONST, RES_PT * pt)
    scale = np.maximum(1.0 + sigma * gaussian(rng, pt.size), 0.05)
    q: Vec = (p[0] * scale, p[1] * scale, p[2] * scale)
    return q, np.sqrt(q[0] ** 2 + q[1] ** 2 + q[2] ** 2 + mass**2)


def pseudorapidity(p: Vec) -> FloatArray:
    pt = np.hypot(p[0], p[1])
    return np.asarray(np.arcsinh(p[2] / np.maximum(pt, 1e-300)), dtype=np.float64)


def pair_mass(a: Vec, ea: FloatArray, b: Vec, eb: FloatArray) -> FloatArray:
    e = ea + eb
    m2 = e**2 - (a[0] + b[0]) ** 2 - (a[1] + b[1]) ** 2 - (a[2] + b[2]) ** 2
    return np.sqrt(np.maximum(m2, 0.0))


def generate(seed: int, n: int) -> dict[str, npt.NDArray[np.generic]]:
    """The columns of the "events" tree for n generated decays."""
    rng = np.random.Generator(np.random.PCG64(seed))
    pt, eta, phi = produce(rng, n)
    pz = pt * np.sinh(eta)
    e_lb = np.sqrt(pt**2 + pz**2 + M_LB**2)
    beta: Vec = (pt * np.cos(phi) / e_lb, pt * np.sin(phi) / e_lb, pz / e_lb)
    s12, s23 = dalitz_sample(rng, n)
    r1, r2, r3 = decay_at_rest(rng, s12, s23)
    (p_true, _), (mu_true, _), (nu, e_nu) = boost(r1, M_P, beta), boost(r2, M_MU, beta), boost(r3, M_NU, beta)
    p, e_p = smear(rng, p_true, M_P)
    mu, e_mu = smear(rng, mu_true, M_MU)
    accepted = (
        (np.abs(pseudorapidity(p)) < CUT_ETA)
        & (np.abs(pseudorapidity(mu)) < CUT_ETA)
        & (np.hypot(p[0], p[1]) > CUT_PT_P)
        & (np.hypot(mu[0], mu[1]) > CUT_PT_MU)
    )
    return {
        "event": np.arange(n, dtype=np.int64),
        "accepted": accepted.astype(np.int32),
        "lb_pt": pt,
        "lb_eta": eta,
        "lb_phi": phi,
        "p_px": p[0],
        "p_py": p[1],
        "p_pz": p[2],
        "p_e": e_p,
        "mu_px": mu[0],
        "mu_py": mu[1],
        "mu_pz": mu[2],
        "mu_e": e_mu,
        "nu_px": nu[0],
        "nu_py": nu[1],
        "nu_pz": nu[2],
        "nu_e": e_nu,
        "m_pmu": pair_mass(p, e_p, mu, e_mu),
        "m_pmu_true": np.sqrt(s12),
        "q2": s23 / 1.0e6,
    }


def write(path: str, seed: int, columns: dict[str, npt.NDArray[np.generic]]) -> None:
    import uproot  # imported here so that `generate` can be used (and timed) without it

    n = len(columns["event"])
    info = {
        "seed": np.array([seed], dtype=np.int64),
        "n_generated": np.array([n], dtype=np.int64),
        "n_accepted": np.array([int(np.sum(columns["accepted"]))], dtype=np.int64),
        "version": np.array([GENERATOR_VERSION], dtype=np.int32),
    }
    with uproot.recreate(path) as out:
        out["events"] = {name: columns[name] for name in BRANCHES}
        out["info"] = info


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Toy Monte Carlo of Λb⁰ → p μ⁻ anti-nu decays")
    parser.add_argument("--seed", type=int, required=True, help="random seed (non-negative)")
    parser.add_argument("--events", type=int, required=True, help="number of decays to generate")
    parser.add_argument("--out", default="events.root", help="output ROOT file")
    args = parser.parse_args(argv)
    if args.seed < 0 or args.events < 1:
        parser.error("--seed must be >= 0 and --events >= 1")
    columns = generate(args.seed, args.events)
    write(args.out, args.seed, columns)
    accepted = int(np.sum(columns["accepted"]))
    print(f"lbmc: seed {args.seed}: {args.events} decays generated, {accepted} accepted -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
