"""Crystallography: reciprocal lattice, reflection lists and rings, symmetry operators.

This module owns everything MIDAS's ``GetHKLListNF`` and ``MakeSymmetries`` compute: the
reciprocal-lattice matrix B (Å⁻¹, no 2π), the list of reflections that reach the detector
(``hkls.csv``: d in Å, θ and 2θ in degrees, ring radius in µm at the *last* distance), ring
numbers, ring selection (``RingsToUse``) and the proper-rotation quaternions (w, x, y, z) used
for misorientation. Systematic absences come from gemmi (space-group setting = the first
table entry for the number, as sginfo picks it: b-unique, origin choice 1, hexagonal axes).
Everything that feeds a file is float64 and evaluated in the same operation order as the C
code, so ``hkls.csv`` comes out byte-identical to MIDAS's. It never reads or writes files
(see ``nfjax.io.hkls``) and never touches JAX or a device.

Reflection order. MIDAS enumerates the Laue-class asymmetric unit in (h, k, l) order,
expands each reflection with sginfo's ``BuildEq_hkl`` (whose output order follows sginfo's
sorted list of symmetry matrices), appends −hkl then +hkl, and sorts by d (descending) with a
stable sort. Equivalent planes differ in d only in the last bits, so the order inside a ring
is decided by those bits and the expansion order; both are reproduced here (the sginfo
matrix sorting is re-implemented in ``_sginfo_rotations``).

Deliberate differences from MIDAS (for docs/midas-differences.md):
* MIDAS stops at |h|, |k|, |l| ≤ 10 and silently loses reflections of large cells or short
  wavelengths; nfjax enumerates up to the index that d_min actually needs
  (⌈max(a, b, c) / d_min⌉). Where MIDAS's cap is not reached the rows are identical.
* MIDAS's de-duplication loop never emits the last generated entry; nfjax emits it.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import operator
from typing import Iterable, Sequence

import numpy as np

from nfjax.errors import NfjaxError, ParamError

__all__ = [
    "HklTable",
    "reciprocal_matrix",
    "generate_hkls",
    "hkls_from_params",
    "select_rings",
    "ring_summary",
    "symmetry_quaternions",
    "laue_class",
]

# MIDAS converts with a multiply by these (not x*pi/180 in one expression); the B-matrix
# off-diagonal ~1e-17 terms printed in hkls.csv depend on it.
_D2R = math.pi / 180.0
_R2D = 180.0 / math.pi

# Same-ring tolerance on d (Å), GetHKLList's Epsilon.
_RING_TOL = 1e-4

# Refuse absurd requests instead of allocating millions of rows (MIDAS's downstream
# programs stop at 5000 reflections anyway).
_MAX_REFLECTIONS = 200_000


def _sind(x: float) -> float:
    return math.sin(_D2R * x)


def _cosd(x: float) -> float:
    return math.cos(_D2R * x)


def _tand(x: float) -> float:
    return math.tan(_D2R * x)


def _asind(x: float) -> float:
    return _R2D * math.asin(x)


def _acosd(x: float) -> float:
    return _R2D * math.acos(x)


def _atand(x: float) -> float:
    return _R2D * math.atan(x)


# --------------------------------------------------------------------------- validation
def _check_space_group(space_group) -> int:
    if isinstance(space_group, (bool, np.bool_)):
        raise NfjaxError(f"space group must be an integer 1..230, got {space_group!r}")
    if not isinstance(space_group, (int, np.integer)):
        try:
            as_float = float(space_group)
        except (TypeError, ValueError):
            raise NfjaxError(
                f"space group must be an integer 1..230, got {space_group!r}") from None
        if not as_float.is_integer():
            raise NfjaxError(f"space group must be an integer 1..230, got {space_group!r}")
        space_group = int(as_float)
    sg = int(space_group)
    if not 1 <= sg <= 230:
        raise NfjaxError(f"space group must be an integer 1..230, got {sg}")
    return sg


def _check_lattice(lattice6) -> tuple[float, ...]:
    try:
        lat = tuple(float(x) for x in lattice6)
    except (TypeError, ValueError):
        raise NfjaxError(
            f"lattice parameters must be 6 numbers a b c alpha beta gamma, got {lattice6!r}"
        ) from None
    if len(lat) != 6:
        raise NfjaxError(
            f"lattice parameters must be 6 numbers a b c alpha beta gamma, got {len(lat)}")
    a, b, c, al, be, ga = lat
    if not all(math.isfinite(x) for x in lat) or min(a, b, c) <= 0:
        raise NfjaxError(f"lattice lengths must be finite and > 0 Å, got {lat[:3]}")
    if not all(0.0 < x < 180.0 for x in (al, be, ga)):
        raise NfjaxError(f"lattice angles must lie in (0, 180) degrees, got {lat[3:]}")
    # Volume^2 factor of a real cell: 1 - cos²α - cos²β - cos²γ + 2 cosα cosβ cosγ > 0.
    ca, cb, cg = (math.cos(math.radians(x)) for x in (al, be, ga))
    if 1.0 - ca * ca - cb * cb - cg * cg + 2.0 * ca * cb * cg <= 1e-12:
        raise NfjaxError(f"lattice angles {lat[3:]} do not form a cell of positive volume")
    return lat


def _check_positive(name: str, value) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise NfjaxError(f"{name} must be a number > 0, got {value!r}") from None
    if not (math.isfinite(v) and v > 0):
        raise NfjaxError(f"{name} must be a number > 0, got {value!r}")
    return v


# --------------------------------------------------------------------------- B matrix
def reciprocal_matrix(lattice6: Sequence[float]) -> np.ndarray:
    """MIDAS's reciprocal-lattice matrix B, (3, 3) float64, Å⁻¹ (no 2π).

    ``g = B @ (h, k, l)`` is the reciprocal vector in the crystal Cartesian frame (x ∥ a*).
    Evaluated exactly as ``GetHKLList.c`` does, degree trigonometry included, so for a cubic
    cell the off-diagonal terms are ~1e-17 (not 0), as MIDAS prints them.

    Args:
        lattice6: a, b, c (Å), α, β, γ (degrees).
    """
    a, b, c, alpha, beta, gamma = _check_lattice(lattice6)
    sin_a, sin_b, sin_g = _sind(alpha), _sind(beta), _sind(gamma)
    cos_a, cos_b, cos_g = _cosd(alpha), _cosd(beta), _cosd(gamma)
    gamma_pr = _acosd((cos_a * cos_b - cos_g) / (sin_a * sin_b))
    beta_pr = _acosd((cos_g * cos_a - cos_b) / (sin_g * sin_a))
    sin_beta_pr = _sind(beta_pr)
    vol = a * (b * (c * (sin_a * (sin_beta_pr * sin_g))))
    a_pr = b * c * sin_a / vol
    b_pr = c * a * sin_b / vol
    c_pr = a * b * sin_g / vol
    return np.array(
        [
            [a_pr, b_pr * _cosd(gamma_pr), c_pr * _cosd(beta_pr)],
            [0.0, b_pr * _sind(gamma_pr), -c_pr * sin_beta_pr * cos_a],
            [0.0, 0.0, c_pr * sin_beta_pr * sin_a],
        ],
        dtype=np.float64,
    )


def _g_vectors(bmat: np.ndarray, hkl: np.ndarray) -> np.ndarray:
    """g = B·hkl per row, (n, 3) float64, summed left to right as the C MatrixMult does.

    Element-wise numpy arithmetic is IEEE-exact and never fused, unlike a BLAS matmul, so
    the last bits agree with MIDAS (they decide the order inside a ring).
    """
    hh = hkl[:, 0].astype(np.float64)
    kk = hkl[:, 1].astype(np.float64)
    ll = hkl[:, 2].astype(np.float64)
    cols = [bmat[i, 0] * hh + bmat[i, 1] * kk + bmat[i, 2] * ll for i in range(3)]
    return np.stack(cols, axis=1)


def _d_spacing(g: np.ndarray) -> np.ndarray:
    """d = 1/|g| per row, Å (inf for the 000 row)."""
    with np.errstate(divide="ignore"):
        return 1.0 / np.sqrt(g[:, 0] * g[:, 0] + g[:, 1] * g[:, 1] + g[:, 2] * g[:, 2])


# --------------------------------------------------------------------------- sginfo order
# sginfo's table of crystallographic rotations (TabXtalRotMx): order, eigenvector, direction
# code, matrix (row-major). The eigenvector and the "inverse" flag of each symmetry matrix,
# found by matching against this table, are what sginfo sorts its operation list by.
_XTAL_ROT_TABLE = (
    (1, (0, 0, 0), ".", (1, 0, 0, 0, 1, 0, 0, 0, 1)),
    (2, (0, 0, 1), "=", (-1, 0, 0, 0, -1, 0, 0, 0, 1)),
    (2, (1, 0, 0), "=", (1, -1, 0, 0, -1, 0, 0, 0, -1)),
    (2, (0, 1, 0), "=", (-1, 0, 0, -1, 1, 0, 0, 0, -1)),
    (2, (1, 1, 0), '"', (0, 1, 0, 1, 0, 0, 0, 0, -1)),
    (2, (1, -1, 0), "'", (0, -1, 0, -1, 0, 0, 0, 0, -1)),
    (2, (2, 1, 0), "|", (1, 0, 0, 1, -1, 0, 0, 0, -1)),
    (2, (1, 2, 0), "\\", (-1, 1, 0, 0, 1, 0, 0, 0, -1)),
    (3, (0, 0, 1), "=", (0, -1, 0, 1, -1, 0, 0, 0, 1)),
    (3, (1, 1, 1), "*", (0, 0, 1, 1, 0, 0, 0, 1, 0)),
    (4, (0, 0, 1), "=", (0, -1, 0, 1, 0, 0, 0, 0, 1)),
    (6, (0, 0, 1), "=", (1, -1, 0, 1, 0, 0, 0, 0, 1)),
)
_R3_111 = np.array([[0, 0, 1], [1, 0, 0], [0, 1, 0]])
_R3I_111 = np.array([[0, 1, 0], [0, 0, 1], [1, 0, 0]])
_R4_001 = np.array([[0, -1, 0], [1, 0, 0], [0, 0, 1]])
_R4I_001 = np.array([[0, 1, 0], [-1, 0, 0], [0, 0, 1]])


def _rot_order(r: np.ndarray) -> int:
    """sginfo's signed rotation order (−n for a rotoinversion)."""
    det = int(round(np.linalg.det(r)))
    table = {(-3, -1): -1, (-2, -1): -6, (-1, -1): -4, (-1, 1): 2, (0, -1): -3, (0, 1): 3,
             (1, -1): -2, (1, 1): 4, (2, 1): 6, (3, 1): 1}
    return table[(int(np.trace(r)), det)]


def _rot_info(r: np.ndarray) -> tuple[int, tuple[int, int, int], int]:
    """(order, eigenvector, inverse flag) of a rotation matrix, as sginfo's GetRotMxInfo."""
    order = _rot_order(r)
    abs_order = abs(order)
    proper = r if order > 0 else -r
    for tab_order, eigen, dircode, flat in _XTAL_ROT_TABLE:
        if tab_order != abs_order:
            continue
        if dircode == ".":
            n_basis, nb, nb_inv = 1, None, None
        elif dircode == "*":
            n_basis, nb, nb_inv = 4, _R4_001, _R4I_001
        else:
            n_basis, nb, nb_inv = 3, _R3_111, _R3I_111
        match = np.array(flat).reshape(3, 3)
        for i_basis in range(n_basis):
            if i_basis:
                match = nb @ match @ nb_inv
            for inverse in range(2 if abs_order > 2 else 1):
                candidate = match if inverse == 0 else np.rint(np.linalg.inv(match)).astype(int)
                if np.array_equal(candidate, proper):
                    vec = np.array(eigen)
                    for _ in range(i_basis):
                        vec = nb @ vec
                    return order, (int(vec[0]), int(vec[1]), int(vec[2])), inverse
    raise AssertionError(f"not a crystallographic rotation: {r.tolist()}")


def _sginfo_sort_key(r: np.ndarray) -> tuple:
    # The lexicographic equivalent of sginfo's SgInfoListSortFunction: identity first, then
    # higher rotation orders, proper before improper, axes with more zero components first,
    # smaller axis indices first, then the axis itself, then R before R^-1.
    order, ev, inverse = _rot_info(r)
    abs_order = abs(order)
    n_zero = sum(1 for x in ev if x == 0)
    max_abs = max(abs(x) for x in ev)
    weight = 100 * abs(ev[2]) + 10 * abs(ev[0]) + abs(ev[1])
    return (
        0 if abs_order == 1 else 1,
        0 if order == 1 else 1,
        -abs_order if abs_order != 1 else 0,
        -order if abs_order != 1 else 0,
        -n_zero,
        max_abs,
        weight if n_zero < 2 else -weight,
        -ev[0], -ev[1], -ev[2],
        inverse,
    )


@functools.lru_cache(maxsize=None)
def _spacegroup(space_group: int):
    import gemmi

    return gemmi.find_spacegroup_by_number(space_group)


@functools.lru_cache(maxsize=None)
def _sginfo_rotations(space_group: int) -> tuple[np.ndarray, ...]:
    """The rotation parts of sginfo's final ListSeitzMx, in sginfo's order.

    Centring translations are factored out; with the inversion at the origin only the proper
    half is kept (sginfo's RemoveInversion). The list is sorted with sginfo's comparator and
    then each operation's powers are pulled up behind it (PostSortSgInfoList). Matching
    powers by rotation part alone is exact: in a space group each rotation part occurs with
    one translation modulo the lattice.
    """
    ops = _spacegroup(space_group).operations()
    den = 24  # gemmi's Op.DEN
    centring = {tuple(int(x) % den for x in c) for c in ops.cen_ops}
    minus_one = -np.eye(3, dtype=int)
    centric_at_origin = any(
        np.array_equal(np.array(op.rot) // den, minus_one)
        and tuple(int(x) % den for x in op.tran) in centring
        for op in ops.sym_ops
    )
    rots: list[np.ndarray] = []
    for op in ops.sym_ops:
        r = np.array(op.rot, dtype=int) // den
        if centric_at_origin and round(np.linalg.det(r)) < 0:
            continue
        if not any(np.array_equal(r, x) for x in rots):
            rots.append(r)
    rots.sort(key=_sginfo_sort_key)
    i = 0
    while i < len(rots):
        base = rots[i]
        order = _rot_order(base)
        i += 1
        if order < 0 and order % 2:
            order *= 2
        power = base
        for _ in range(1, abs(order) - 1):
            power = base @ power
            for j in range(i, len(rots)):
                if np.array_equal(rots[j], power):
                    rots.insert(i, rots.pop(j))
                    i += 1
                    break
    for r in rots:
        r.setflags(write=False)
    return tuple(rots)


def _list_minimum(space_group: int, nmax: int) -> tuple[int, int, int]:
    """sginfo's SetListMin_hkl lower bounds (h, k, l) of the asymmetric-unit loop."""
    system = _spacegroup(space_group).crystal_system_str()
    if system == "triclinic":
        return 0, -nmax, -nmax
    if system == "monoclinic":
        # gemmi's first setting is b-unique (as sginfo's), so k ≥ 0 and l free.
        return 0, 0, -nmax
    # Trigonal on rhombohedral axes would need k free; the settings used here are the
    # hexagonal-axes ones, so the default applies.
    return 0, 0, 0


def _transform(r: np.ndarray, h: int, k: int, m: int) -> tuple[int, int, int]:
    # (h k l)·R, as sginfo applies symmetry to Miller indices.
    return (
        int(r[0, 0] * h + r[1, 0] * k + r[2, 0] * m),
        int(r[0, 1] * h + r[1, 1] * k + r[2, 1] * m),
        int(r[0, 2] * h + r[1, 2] * k + r[2, 2] * m),
    )


def _is_suppressed(rots, box, hkl) -> bool:
    """sginfo's IsSuppressed_hkl: an equivalent (or its Friedel mate) inside the loop box
    comes earlier in (h, k, l) order, so this reflection was (or will be) listed there."""
    min_h, min_k, min_l, max_k, max_l = box
    h, k, m = hkl

    def inside(e):
        return min_h <= e[0] <= h and min_k <= e[1] <= max_k and min_l <= e[2] <= max_l

    mate = (-h, -k, -m)
    if inside(mate):
        if mate[0] < h or mate[1] < k or (k == 0 and mate[2] < m):
            return True
    for r in rots[1:]:
        e = _transform(r, h, k, m)
        for cand in (e, (-e[0], -e[1], -e[2])):
            if inside(cand) and (cand[0] < h or (cand[0] == h and (
                    cand[1] < k or (cand[1] == k and cand[2] < m)))):
                return True
    return False


def _equivalents(rots, hkl) -> list[tuple[int, int, int]]:
    """sginfo's BuildEq_hkl: one member of each ± pair of equivalents, in sginfo order."""
    eq = [tuple(hkl)]
    seen = {tuple(hkl), (-hkl[0], -hkl[1], -hkl[2])}
    for r in rots[1:]:
        e = _transform(r, *hkl)
        if e in seen:
            continue
        eq.append(e)
        seen.add(e)
        seen.add((-e[0], -e[1], -e[2]))
    return eq


def _family_label(members: Iterable[tuple[int, int, int]]) -> tuple[int, int, int]:
    # The conventional name of a family: the member with the most non-negative indices,
    # then the largest (h, k, l) — {2 0 0}, {1 1 0} (hexagonal), {3 1 1}.
    return max(members, key=lambda m: (sum(1 for x in m if x >= 0), m))


# --------------------------------------------------------------------------- HklTable
@dataclasses.dataclass(frozen=True, eq=False)
class HklTable:
    """A reflection list as ``hkls.csv`` holds it (one row per reflection, ±hkl both present).

    Attributes:
        hkl: (n, 3) int64 Miller indices.
        d: (n,) float64 d-spacing, Å.
        ring: (n,) int64 ring number (1-based).
        g: (n, 3) float64 reciprocal vector B·hkl, Å⁻¹ (no 2π).
        theta: (n,) float64 Bragg angle θ, degrees.
        two_theta: (n,) float64 2θ, degrees.
        radius: (n,) float64 ring radius at the last detector distance, µm.
        family: optional (n, 3) int64 name of each row's family of equivalent planes
            (e.g. 3 1 1); None when the table was read from a file.
    """

    hkl: np.ndarray
    d: np.ndarray
    ring: np.ndarray
    g: np.ndarray
    theta: np.ndarray
    two_theta: np.ndarray
    radius: np.ndarray
    family: np.ndarray | None = None

    def __post_init__(self) -> None:
        n = len(self.d)
        fields = {
            "hkl": (np.int64, (n, 3)), "d": (np.float64, (n,)), "ring": (np.int64, (n,)),
            "g": (np.float64, (n, 3)), "theta": (np.float64, (n,)),
            "two_theta": (np.float64, (n,)), "radius": (np.float64, (n,)),
        }
        if self.family is not None:
            fields["family"] = (np.int64, (n, 3))
        for name, (dtype, shape) in fields.items():
            arr = np.array(getattr(self, name), dtype=dtype, copy=True)
            if arr.shape != shape:
                raise ValueError(f"HklTable.{name} has shape {arr.shape}, expected {shape}")
            arr.setflags(write=False)
            object.__setattr__(self, name, arr)

    def __len__(self) -> int:
        return int(self.d.shape[0])

    @property
    def n_rings(self) -> int:
        """Number of distinct ring numbers in the table."""
        return int(np.unique(self.ring).size)

    def take(self, index: np.ndarray) -> "HklTable":
        """Rows ``index`` (integer array, repeats allowed), as a new table."""
        index = np.asarray(index, dtype=np.int64)
        return HklTable(
            hkl=self.hkl[index], d=self.d[index], ring=self.ring[index], g=self.g[index],
            theta=self.theta[index], two_theta=self.two_theta[index],
            radius=self.radius[index],
            family=None if self.family is None else self.family[index],
        )


# --------------------------------------------------------------------------- generation
def _d_min(wavelength: float, lsd_last: float, max_ring_rad: float) -> float:
    return wavelength / (2 * _sind(_atand(max_ring_rad / lsd_last) / 2))


def generate_hkls(lattice6: Sequence[float], space_group: int, wavelength: float,
                  lsd_last: float, max_ring_rad: float) -> HklTable:
    """All reflections with a ring radius ≤ ``max_ring_rad`` at ``lsd_last``, as MIDAS lists them.

    Args:
        lattice6: a, b, c (Å), α, β, γ (degrees).
        space_group: 1..230 (standard setting; see the module docstring).
        wavelength: X-ray wavelength, Å.
        lsd_last: sample–detector distance used for the ring cut and ``radius``, µm (MIDAS
            uses the LAST ``Lsd`` line).
        max_ring_rad: largest ring radius kept, µm.

    Returns:
        The full table in MIDAS ``GetHKLListNF`` order and ring numbering.
    """
    lat = _check_lattice(lattice6)
    sg = _check_space_group(space_group)
    wl = _check_positive("Wavelength", wavelength)
    lsd = _check_positive("Lsd", lsd_last)
    max_r = _check_positive("MaxRingRad", max_ring_rad)

    bmat = reciprocal_matrix(lat)
    d_min = _d_min(wl, lsd, max_r)
    volume = 1.0 / abs(np.linalg.det(bmat))
    expected = 4.0 / 3.0 * math.pi * volume / d_min ** 3
    if expected > _MAX_REFLECTIONS:
        raise NfjaxError(
            f"Wavelength {wl} Å, Lsd {lsd} µm and MaxRingRad {max_r} µm reach d = {d_min:.4g} Å:"
            f" about {expected:.0f} reflections for this cell (limit {_MAX_REFLECTIONS});"
            " lower MaxRingRad")
    # |h| = |a·g| ≤ a |g| ≤ a / d_min: every reflection that can pass the cut, and all of its
    # equivalents, lie in this box (MIDAS: fixed 10).
    nmax = int(math.floor(max(lat[:3]) / d_min * (1 + 1e-9))) + 1
    min_h, min_k, min_l = _list_minimum(sg, nmax)
    box = (min_h, min_k, min_l, nmax, nmax)
    rots = _sginfo_rotations(sg)
    ops = _spacegroup(sg).operations()

    families: list[tuple[int, int, int]] = []
    labels: list[tuple[int, int, int]] = []
    k_range = np.arange(min_k, nmax + 1)
    l_range = np.arange(min_l, nmax + 1)
    kk, ll = (x.ravel() for x in np.meshgrid(k_range, l_range, indexing="ij"))
    for h in range(min_h, nmax + 1):
        slab = np.stack([np.full_like(kk, h), kk, ll], axis=1)
        # A generous pre-filter on d (equivalents differ only in the last bits); the exact
        # cut is applied to the sorted rows below, as MIDAS does.
        d = _d_spacing(_g_vectors(bmat, slab)) if len(slab) else np.empty(0)
        keep = (d >= d_min * (1 - 1e-6)) & np.any(slab != 0, axis=1)
        cand = slab[keep]
        if not len(cand):
            continue
        absent = np.asarray(ops.systematic_absences(cand.astype(np.int32)), dtype=bool)
        for hkl, is_absent in zip(cand, absent):
            if is_absent:
                continue
            hkl = (int(hkl[0]), int(hkl[1]), int(hkl[2]))
            if _is_suppressed(rots, box, hkl):
                continue
            eq = _equivalents(rots, hkl)
            label = _family_label(eq + [(-e[0], -e[1], -e[2]) for e in eq])
            for e in eq:
                families.append((-e[0], -e[1], -e[2]))
                families.append(e)
                labels.extend((label, label))

    # Keep first occurrences (BuildEq already returns distinct ± pairs, so this only
    # matters for self-Friedel corner cases).
    seen: set[tuple[int, int, int]] = set()
    rows, row_labels = [], []
    for f, lab in zip(families, labels):
        if f not in seen:
            seen.add(f)
            rows.append(f)
            row_labels.append(lab)
    hkl = np.array(rows, dtype=np.int64).reshape(-1, 3)
    fam = np.array(row_labels, dtype=np.int64).reshape(-1, 3)
    g = _g_vectors(bmat, hkl)
    d = _d_spacing(g)
    # MIDAS (v11) sorts by exact d, descending, with glibc's qsort: a merge sort, hence
    # stable. argsort of -d with kind="stable" is the same permutation.
    order = np.argsort(-d, kind="stable")
    hkl, fam, g, d = hkl[order], fam[order], g[order], d[order]
    below = np.nonzero(d < d_min)[0]
    n = int(below[0]) if below.size else len(d)
    if n == 0:
        raise NfjaxError(
            f"no reflection of space group {sg} with lattice {lat} reaches MaxRingRad "
            f"{max_r} µm at Lsd {lsd} µm (d_min = {d_min:.6g} Å)")
    hkl, fam, g, d = hkl[:n], fam[:n], g[:n], d[:n]

    ring = np.empty(n, dtype=np.int64)
    theta = np.empty(n, dtype=np.float64)
    two_theta = np.empty(n, dtype=np.float64)
    radius = np.empty(n, dtype=np.float64)
    current, d_first = 1, float(d[0])
    for i in range(n):
        di = float(d[i])
        if i and not abs(di - d_first) < _RING_TOL:
            current += 1
            d_first = di
        ring[i] = current
        # math.* calls the C library, like MIDAS (numpy's SIMD versions may differ by an ulp).
        th = _asind(wl / (2 * di))
        theta[i] = th
        two_theta[i] = th * 2
        radius[i] = lsd * _tand(th * 2)
    return HklTable(hkl=hkl, d=d, ring=ring, g=g, theta=theta, two_theta=two_theta,
                    radius=radius, family=fam)


_PARAM_KEYS = (
    ("lattice_parameter", "LatticeParameter"),
    ("space_group", "SpaceGroup"),
    ("wavelength", "Wavelength"),
    ("lsd", "Lsd"),
    ("max_ring_rad", "MaxRingRad"),
)


def hkls_from_params(params) -> HklTable:
    """The full reflection table for a parsed parameter file (what ``hkls.csv`` holds).

    Uses ``LatticeParameter``, ``SpaceGroup``, ``Wavelength``, the LAST ``Lsd`` and
    ``MaxRingRad``; raises :class:`ParamError` naming the file and key when one is missing.
    """
    source = getattr(params, "source", None) or "<parameters>"
    values = {}
    for attr, key in _PARAM_KEYS:
        value = getattr(params, attr, None)
        if value is None or (attr == "lsd" and len(value) == 0):
            raise ParamError(f"{source}: missing key '{key}' (needed to build hkls.csv)")
        values[attr] = value
    try:
        return generate_hkls(values["lattice_parameter"], values["space_group"],
                             values["wavelength"], values["lsd"][-1], values["max_ring_rad"])
    except ParamError:
        raise
    except NfjaxError as exc:
        raise ParamError(f"{source}: {exc}") from None


def select_rings(table: HklTable, rings_to_use: Sequence[int]) -> HklTable:
    """MIDAS's ``RingsToUse`` rebuild (reference §2.3).

    For each ring in ``rings_to_use``, in the given order, all rows of that ring in table
    order; a ring listed twice is duplicated. An empty ``rings_to_use`` returns ``table``.
    """
    if rings_to_use is None or len(rings_to_use) == 0:
        return table
    available = np.unique(table.ring)
    parts = []
    for r in rings_to_use:
        idx = np.nonzero(table.ring == int(r))[0]
        if idx.size == 0:
            have = (f"{available[0]}..{available[-1]}" if available.size else "none")
            raise NfjaxError(
                f"RingsToUse {int(r)}: no such ring in the reflection list (rings {have})")
        parts.append(idx)
    return table.take(np.concatenate(parts))


def reflections(params, hkls: HklTable | None = None) -> HklTable:
    """The reflections ``params`` fits with: its ``RingsToUse`` selected (:func:`select_rings`)
    from ``hkls`` (default :func:`hkls_from_params`). A ring the table lacks is a
    :class:`ParamError` naming the parameter file and the line of that ring."""
    table = hkls if hkls is not None else hkls_from_params(params)
    try:
        return select_rings(table, params.rings_to_use)
    except NfjaxError as exc:
        rings = list(params.rings_to_use)
        have = set(np.unique(table.ring).tolist())
        k = next((i for i, r in enumerate(rings) if int(r) not in have), None)
        lines = getattr(params, "lines", {}).get("RingsToUse", ())
        source = getattr(params, "source", None) or "<parameters>"
        at = f"{source}:{lines[k]}" if k is not None and k < len(lines) else source
        raise ParamError(f"{at}: {exc}") from None


def ring_summary(table: HklTable) -> list[str]:
    """One human-readable line per ring, e.g.
    ``ring  1  {1 1 1}  d=2.35559 A  theta=2.10419 deg  R=757.2 um  8 reflections``."""
    lines = []
    rings, first = np.unique(table.ring, return_index=True)
    for r, i0 in sorted(zip(rings.tolist(), first.tolist()), key=operator.itemgetter(1)):
        idx = np.nonzero(table.ring == r)[0]
        if table.family is not None:
            names = []
            for f in table.family[idx]:
                t = tuple(int(x) for x in f)
                if t not in names:
                    names.append(t)
        else:
            names = [_family_label([tuple(int(x) for x in table.hkl[i]) for i in idx])]
        label = "+".join("{" + " ".join(str(x) for x in t) + "}" for t in names)
        lines.append(
            f"ring {r:2d}  {label}  d={table.d[i0]:.5f} A  theta={table.theta[i0]:.5f} deg  "
            f"R={table.radius[i0]:.1f} um  {idx.size} reflections")
    return lines


# --------------------------------------------------------------------------- symmetry
# MIDAS's MakeSymmetries tables, quaternions (w, x, y, z), with its 5-decimal constants
# (0.70711, 0.86603, 0.5) kept literally: misorientation values computed with them are
# what MIDAS writes.
_S2 = 0.70711
_S3 = 0.86603
_TRICLINIC = ((1.0, 0.0, 0.0, 0.0),)
_MONOCLINIC = ((1.0, 0.0, 0.0, 0.0), (0.0, 0.0, 1.0, 0.0))  # 2 about y (b-unique)
_ORTHORHOMBIC = ((1.0, 0.0, 0.0, 0.0), (0.0, 1.0, 0.0, 0.0), (0.0, 0.0, 1.0, 0.0),
                 (0.0, 0.0, 0.0, 1.0))
_TETRAGONAL_HIGH = (
    (1.0, 0.0, 0.0, 0.0), (_S2, 0.0, 0.0, _S2), (0.0, 0.0, 0.0, 1.0), (_S2, -0.0, -0.0, -_S2),
    (0.0, 1.0, 0.0, 0.0), (0.0, 0.0, 1.0, 0.0), (0.0, _S2, _S2, 0.0), (0.0, -_S2, _S2, 0.0),
)
_TETRAGONAL_LOW = _TETRAGONAL_HIGH[:4]
_TRIGONAL_LOW = ((1.0, 0.0, 0.0, 0.0), (0.5, 0.0, 0.0, _S3), (0.5, -0.0, -0.0, -_S3))
# Type 1: in-plane 2-folds at 30°, 90°, 150° from x; type 2: at 0°, 60°, 120°.
_TRIGONAL_TYPE1 = (
    (1.0, 0.0, 0.0, 0.0), (0.0, _S3, -0.5, 0.0), (0.5, 0.0, 0.0, _S3), (0.0, 0.0, 1.0, 0.0),
    (0.5, -0.0, -0.0, -_S3), (0.0, _S3, 0.5, 0.0),
)
_TRIGONAL_TYPE2 = (
    (1.0, 0.0, 0.0, 0.0), (0.5, 0.0, 0.0, _S3), (0.5, -0.0, -0.0, -_S3), (0.0, 0.5, -_S3, 0.0),
    (0.0, 1.0, 0.0, 0.0), (0.0, 0.5, _S3, 0.0),
)
_TRIGONAL_TYPE2_SGS = frozenset({149, 151, 153, 157, 159, 162, 163})
_HEXAGONAL_HIGH = (
    (1.0, 0.0, 0.0, 0.0), (_S3, 0.0, 0.0, 0.5), (0.5, 0.0, 0.0, _S3), (0.0, 0.0, 0.0, 1.0),
    (0.5, -0.0, -0.0, -_S3), (_S3, -0.0, -0.0, -0.5),
    (0.0, 1.0, 0.0, 0.0), (0.0, _S3, 0.5, 0.0), (0.0, 0.5, _S3, 0.0), (0.0, 0.0, 1.0, 0.0),
    (0.0, -0.5, _S3, 0.0), (0.0, -_S3, 0.5, 0.0),
)
_HEXAGONAL_LOW = _HEXAGONAL_HIGH[:6]
_CUBIC_HIGH = (
    (1.0, 0.0, 0.0, 0.0), (_S2, _S2, 0.0, 0.0), (0.0, 1.0, 0.0, 0.0), (_S2, -_S2, 0.0, 0.0),
    (_S2, 0.0, _S2, 0.0), (0.0, 0.0, 1.0, 0.0), (_S2, 0.0, -_S2, 0.0), (_S2, 0.0, 0.0, _S2),
    (0.0, 0.0, 0.0, 1.0), (_S2, 0.0, 0.0, -_S2),
    (0.5, 0.5, 0.5, 0.5), (0.5, -0.5, -0.5, -0.5), (0.5, -0.5, 0.5, 0.5), (0.5, 0.5, -0.5, -0.5),
    (0.5, 0.5, -0.5, 0.5), (0.5, -0.5, 0.5, -0.5), (0.5, -0.5, -0.5, 0.5), (0.5, 0.5, 0.5, -0.5),
    (0.0, _S2, _S2, 0.0), (0.0, -_S2, _S2, 0.0), (0.0, _S2, 0.0, _S2), (0.0, _S2, 0.0, -_S2),
    (0.0, 0.0, _S2, _S2), (0.0, 0.0, _S2, -_S2),
)
# 23: identity, the three 2-folds about the axes, the eight ±120° about <111>.
_CUBIC_LOW = tuple(_CUBIC_HIGH[i] for i in (0, 2, 5, 8, 10, 11, 12, 13, 14, 15, 16, 17))

_SYMMETRY_TABLES = {
    "triclinic": _TRICLINIC,
    "monoclinic": _MONOCLINIC,
    "orthorhombic": _ORTHORHOMBIC,
    "tetragonal_low": _TETRAGONAL_LOW,
    "tetragonal_high": _TETRAGONAL_HIGH,
    "trigonal_low": _TRIGONAL_LOW,
    "trigonal_type1": _TRIGONAL_TYPE1,
    "trigonal_type2": _TRIGONAL_TYPE2,
    "hexagonal_low": _HEXAGONAL_LOW,
    "hexagonal_high": _HEXAGONAL_HIGH,
    "cubic_low": _CUBIC_LOW,
    "cubic_high": _CUBIC_HIGH,
}


def laue_class(space_group: int) -> str:
    """Name of MIDAS's symmetry set for a space group (reference §2.4).

    One of "triclinic", "monoclinic", "orthorhombic", "tetragonal_low" (4/m),
    "tetragonal_high" (4/mmm), "trigonal_low" (-3), "trigonal_type1", "trigonal_type2"
    (-3m with the in-plane 2-folds at 30/90/150° or 0/60/120° from x), "hexagonal_low"
    (6/m), "hexagonal_high" (6/mmm), "cubic_low" (m-3), "cubic_high" (m-3m).
    """
    sg = _check_space_group(space_group)
    if sg <= 2:
        return "triclinic"
    if sg <= 15:
        return "monoclinic"
    if sg <= 74:
        return "orthorhombic"
    if sg <= 88:
        return "tetragonal_low"
    if sg <= 142:
        return "tetragonal_high"
    if sg <= 148:
        return "trigonal_low"
    if sg <= 167:
        return "trigonal_type2" if sg in _TRIGONAL_TYPE2_SGS else "trigonal_type1"
    if sg <= 176:
        return "hexagonal_low"
    if sg <= 194:
        return "hexagonal_high"
    if sg <= 206:
        return "cubic_low"
    return "cubic_high"


def symmetry_quaternions(space_group: int) -> np.ndarray:
    """MIDAS's proper-rotation symmetry operators for a space group.

    Returns:
        (N, 4) float64 quaternions (w, x, y, z), N ∈ {1, 2, 3, 4, 6, 8, 12, 24}, with MIDAS's
        5-decimal constants (so they are unit quaternions only to ~1e-5).
    """
    return np.array(_SYMMETRY_TABLES[laue_class(space_group)], dtype=np.float64)
