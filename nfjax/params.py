"""MIDAS parameter files: parse, validate, format, write and edit.

This module owns the translation between MIDAS's plain-text ``Key value ...`` parameter files
and the typed, frozen :class:`Params`. Values keep MIDAS's units exactly as written: lengths
in µm (``Lsd``, ``px``, ``BoxSize``, ``GridSize``, ``Rsample``), angles in degrees, the
wavelength and lattice lengths in Å, the beam centre in pixels; nothing is converted here.
Every key is described once, in the field declarations of :class:`Params` (MIDAS name, token
types, single or repeated, MIDAS default, validation rule, listing group); the parser, the
validator, the listing and the writers are driven by that table. It must never guess: a
missing required key, a malformed value or an inconsistent count is one :class:`ParamError`
line naming the file, the line and the key, and where MIDAS's C programs would silently read
a line differently from nfjax (a tab after the key, an indented key) the user gets a warning.
It reads and writes parameter files only; it never touches data files or devices.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import numbers
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Callable

from nfjax.errors import ParamError
from nfjax.io import TEXT_ENCODING
from nfjax.io.atomic import atomic_write

__all__ = ["Params", "KeySpec", "read_params", "parse_params", "format_params",
           "write_params", "update_param_text", "KEYS"]

# --------------------------------------------------------------------------- rules
Rule = tuple[Callable[[Any], bool], str]


def _rule(pred: Callable[[Any], bool], text: str) -> Rule:
    return (pred, text)


_POS = _rule(lambda v: v > 0, "> 0")
_NONNEG = _rule(lambda v: v >= 0, ">= 0")
_GE1 = _rule(lambda v: v >= 1, ">= 1")
_NONZERO = _rule(lambda v: v != 0, "!= 0")
_LE1 = _rule(lambda v: v <= 1, "<= 1")
_FRACTION = _rule(lambda v: 0 <= v <= 1, "between 0 and 1")
# 65536 per side: beyond any detector, and a 2-distance, 1440-frame volume of it would need
# 1.5 PB; the bound turns an extra digit into a parameter error instead of a failed
# allocation deep inside a command.
_DETECTOR = _rule(lambda v: 0 < v <= 65536, "between 1 and 65536 pixels")
# At ±90° a tilt about y or z turns the detector edge-on to the beam, and a wedge of 90°
# the rotation axis along it: nothing projects, every spot is lost without an error.
_TILT = _rule(lambda v: -90 < v < 90, "strictly between -90 and 90 degrees")
_SPACE_GROUP = _rule(lambda v: 1 <= v <= 230, "between 1 and 230")
_LATTICE = _rule(lambda v: min(v[:3]) > 0 and all(0 < a < 180 for a in v[3:]),
                 "lengths a b c > 0 and angles strictly between 0 and 180 degrees")
_RANGE = _rule(lambda v: v[0] < v[1], "min < max")
_BOX = _rule(lambda v: v[0] < v[1] and v[2] < v[3], "ymin < ymax and zmin < zmax")
_MASK = _rule(lambda v: v[0] <= v[1] and v[2] <= v[3], "xmin <= xmax and ymin <= ymax")
_PAIR_NONNEG = _rule(lambda v: min(v) >= 0, "two tolerances >= 0")
_REFACTOR = _rule(lambda v: v[0] > 0 and v[1] > 0 and v[2] >= 0,
                  "G0 > 0, scale > 0 and nLoops >= 0")


def _one_of(*allowed: int) -> Rule:
    return _rule(lambda v: v in allowed, "in {" + ", ".join(map(str, allowed)) + "}")


_BIT = _one_of(0, 1)

# --------------------------------------------------------------------------- key table
_REQUIRED = object()
_GEOMETRY, _SCAN, _CRYSTAL, _GRID = "geometry", "scan", "crystal", "grid"
_FITTING, _FILES, _IMAGES, _WORKFLOW = "fitting", "files", "image processing", "workflow"


@dataclass(frozen=True)
class KeySpec:
    """One MIDAS key: its name, the Params attribute(s) it sets and how its tokens parse.

    ``types`` has one character per value token: ``f`` float, ``i`` int, ``s`` a single
    token string (MIDAS reads paths with ``%s``), ``?`` a presence flag. ``multi`` keys append
    one entry per line in file order; other keys keep the last line's value.
    """
    key: str
    attrs: tuple[str, ...]
    types: str
    multi: bool = False
    rule: Rule | None = None
    labels: tuple[str, ...] = ()
    group: str = _WORKFLOW
    required: bool = False


def _k(key: str, types: str, default: Any = None, *, multi: bool = False,
       rule: Rule | None = None, labels: str = "", group: str) -> Any:
    """A Params field described by its MIDAS key (see KeySpec).

    A required key's field still defaults to None (or ``()``): the parser enforces it,
    unless a tool that needs only a few keys asks it not to (``required=False``).
    """
    required = default is _REQUIRED
    meta = {"midas": dict(key=key, types=types, multi=multi, rule=rule,
                          labels=tuple(labels.split()), group=group, required=required)}
    if required:
        default = None
    return field(default=() if multi else default, metadata=meta)


@dataclass(frozen=True, kw_only=True)
class Params:
    """A parsed, validated MIDAS NF-HEDM parameter file (immutable).

    Fields are MIDAS's keys in snake_case, typed; repeated keys are tuples in file order
    (``lsd`` (nDistances,) µm, ``bc`` ((y, z) px per distance), ``omega_ranges`` ((lo, hi) deg),
    ``box_sizes`` ((ymin, ymax, zmin, zmax) µm)). Defaults are MIDAS's code defaults; ``None``
    marks a key MIDAS leaves uninitialised when absent (use :meth:`require`). ``source`` is
    the file path, ``warnings`` the parser's warnings, ``lines`` maps each key as written to
    its line numbers, ``extra`` keeps unknown keys' raw text (one string per line) for writers.
    The required keys (nDistances, Lsd, BC, px, Wavelength, LatticeParameter) are always set,
    except in a Params parsed with ``required=False``, where they may be None or ``()``.
    """
    # geometry
    n_distances: int = _k("nDistances", "i", _REQUIRED, rule=_GE1, group=_GEOMETRY)
    lsd: tuple[float, ...] = _k("Lsd", "f", _REQUIRED, multi=True, rule=_POS, group=_GEOMETRY)
    bc: tuple[tuple[float, float], ...] = _k("BC", "ff", _REQUIRED, multi=True, labels="y z",
                                             group=_GEOMETRY)
    tx: float | None = _k("tx", "f", group=_GEOMETRY)
    ty: float | None = _k("ty", "f", rule=_TILT, group=_GEOMETRY)
    tz: float | None = _k("tz", "f", rule=_TILT, group=_GEOMETRY)
    wedge: float = _k("Wedge", "f", 0.0, rule=_TILT, group=_GEOMETRY)
    px: float = _k("px", "f", _REQUIRED, rule=_POS, group=_GEOMETRY)
    nr_pixels_y: int = _k("NrPixelsY", "i", 2048, rule=_DETECTOR, group=_GEOMETRY)
    nr_pixels_z: int = _k("NrPixelsZ", "i", 2048, rule=_DETECTOR, group=_GEOMETRY)
    wavelength: float = _k("Wavelength", "f", _REQUIRED, rule=_POS, group=_GEOMETRY)
    max_ring_rad: float | None = _k("MaxRingRad", "f", rule=_POS, group=_GEOMETRY)
    exclude_pole_angle: float | None = _k("ExcludePoleAngle", "f", rule=_NONNEG, group=_GEOMETRY)
    # scan
    omega_start: float | None = _k("OmegaStart", "f", group=_SCAN)
    omega_step: float | None = _k("OmegaStep", "f", rule=_NONZERO, group=_SCAN)
    start_nr: int | None = _k("StartNr", "i", group=_SCAN)
    end_nr: int | None = _k("EndNr", "i", group=_SCAN)
    omega_ranges: tuple[tuple[float, float], ...] = _k(
        "OmegaRange", "ff", multi=True, rule=_RANGE, labels="min max", group=_SCAN)
    box_sizes: tuple[tuple[float, float, float, float], ...] = _k(
        "BoxSize", "ffff", multi=True, rule=_BOX, labels="ymin ymax zmin zmax", group=_SCAN)
    # crystal
    lattice_parameter: tuple[float, float, float, float, float, float] = _k(
        "LatticeParameter", "ffffff", _REQUIRED, rule=_LATTICE,
        labels="a b c alpha beta gamma", group=_CRYSTAL)
    space_group: int = _k("SpaceGroup", "i", 225, rule=_SPACE_GROUP, group=_CRYSTAL)
    rings_to_use: tuple[int, ...] = _k("RingsToUse", "i", multi=True, rule=_GE1, group=_CRYSTAL)
    sg_nr: int = _k("SGNr", "i", 225, rule=_SPACE_GROUP, group=_CRYSTAL)
    # grid
    grid_size: float | None = _k("GridSize", "f", rule=_POS, group=_GRID)
    edge_length: float | None = _k("EdgeLength", "f", rule=_NONNEG, group=_GRID)
    rsample: float | None = _k("Rsample", "f", rule=_POS, group=_GRID)
    grid_mask: tuple[float, float, float, float] | None = _k(
        "GridMask", "ffff", rule=_MASK, labels="xmin xmax ymin ymax", group=_GRID)
    tomo_image: str | None = _k("TomoImage", "s", group=_GRID)
    tomo_pixel_size: float | None = _k("TomoPixelSize", "f", rule=_POS, group=_GRID)
    grid_file_name: str = _k("GridFileName", "s", "grid.txt", group=_GRID)
    grid_points: tuple[tuple[float, ...], ...] = _k("GridPoints", "f" * 12, multi=True,
                                                     group=_GRID)
    # fitting (and calibration)
    orient_tol: float | None = _k("OrientTol", "f", rule=_NONNEG, group=_FITTING)
    min_frac_accept: float | None = _k("MinFracAccept", "f", rule=_FRACTION, group=_FITTING)
    save_n_solutions: int = _k("SaveNSolutions", "i", 1, rule=_GE1, group=_FITTING)
    min_miso_n_saves: float = _k("MinMisoNSaves", "f", 1.0, rule=_NONNEG, group=_FITTING)
    nearest_misorientation: int = _k("NearestMisorientation", "i", 0, group=_FITTING)
    num_iterations: int = _k("NumIterations", "i", 1, rule=_GE1, group=_FITTING)
    lsd_tol: float | None = _k("LsdTol", "f", rule=_NONNEG, group=_FITTING)
    lsd_relative_tol: float | None = _k("LsdRelativeTol", "f", rule=_NONNEG, group=_FITTING)
    bc_tol: tuple[float, float] | None = _k("BCTol", "ff", rule=_PAIR_NONNEG, labels="y z",
                                            group=_FITTING)
    tilts_tol: float | None = _k("TiltsTol", "f", rule=_NONNEG, group=_FITTING)
    # files
    data_directory: str | None = _k("DataDirectory", "s", group=_FILES)
    output_directory: str | None = _k("OutputDirectory", "s", group=_FILES)
    seed_orientations: str | None = _k("SeedOrientations", "s", group=_FILES)
    nr_orientations: int | None = _k("NrOrientations", "i", rule=_GE1, group=_FILES)
    grains_file: str | None = _k("GrainsFile", "s", group=_FILES)
    mic_file_binary: str | None = _k("MicFileBinary", "s", group=_FILES)
    mic_file_text: str | None = _k("MicFileText", "s", group=_FILES)
    orig_file_name: str | None = _k("OrigFileName", "s", group=_FILES)
    reduced_file_name: str | None = _k("ReducedFileName", "s", group=_FILES)
    ext_orig: str | None = _k("extOrig", "s", group=_FILES)
    ext_reduced: str | None = _k("extReduced", "s", group=_FILES)
    raw_start_nr: int = _k("RawStartNr", "i", 0, rule=_NONNEG, group=_FILES)
    nr_files_per_distance: int | None = _k("NrFilesPerDistance", "i", rule=_GE1, group=_FILES)
    wf_images: int = _k("WFImages", "i", 0, rule=_NONNEG, group=_FILES)
    # image processing (ProcessImagesCombined defaults, reference §8)
    blanket_subtraction: int = _k("BlanketSubtraction", "i", 0, rule=_NONNEG, group=_IMAGES)
    med_filt_radius: int = _k("MedFiltRadius", "i", 1, rule=_one_of(0, 1, 2), group=_IMAGES)
    gauss_filt_radius: float = _k("GaussFiltRadius", "f", 1.0, rule=_POS, group=_IMAGES)
    log_mask_radius: int = _k("LoGMaskRadius", "i", 4, rule=_GE1, group=_IMAGES)
    do_log_filter: int = _k("DoLoGFilter", "i", 1, rule=_BIT, group=_IMAGES)
    write_fin_image: int = _k("WriteFinImage", "i", 0, rule=_BIT, group=_IMAGES)
    write_legacy_bin: int = _k("WriteLegacyBin", "i", 0, rule=_BIT, group=_IMAGES)
    deblur: int = _k("Deblur", "i", 0, group=_IMAGES)
    ice9_input: bool = _k("Ice9Input", "?", False, group=_IMAGES)
    skip_image_binning: bool = _k("SkipImageBinning", "?", False, group=_IMAGES)
    precomputed_spots_info: int = _k("PrecomputedSpotsInfo", "i", 0, rule=_BIT, group=_IMAGES)
    # workflow, post-processing, simulation, denoising
    grid_refactor: tuple[float, float, int] | None = _k(
        "GridRefactor", "ffi", rule=_REFACTOR, labels="G0 scale nLoops", group=_WORKFLOW)
    seed_orientations_all: str | None = _k("SeedOrientationsAll", "s", group=_WORKFLOW)
    # MIDAS has three defaults (Mic2GrainsList 0.04, multi-resolution 0.5, simulateNF -1):
    # left None so each stage applies its own.
    min_confidence: float | None = _k("MinConfidence", "f", rule=_LE1, group=_WORKFLOW)
    max_angle: float = _k("MaxAngle", "f", 1.0, rule=_POS, group=_WORKFLOW)
    gb_angle: float = _k("GBAngle", "f", 5.0, rule=_POS, group=_WORKFLOW)
    phase_nr: int | None = _k("PhaseNr", "i", rule=_GE1, group=_WORKFLOW)
    num_phases: int | None = _k("NumPhases", "i", rule=_GE1, group=_WORKFLOW)
    global_position: float | None = _k("GlobalPosition", "f", group=_WORKFLOW)
    global_position_first_layer: float | None = _k("GlobalPositionFirstLayer", "f",
                                                   group=_WORKFLOW)
    layer_thickness: float | None = _k("LayerThickness", "f", rule=_NONNEG, group=_WORKFLOW)
    only_spots_info: int = _k("OnlySpotsInfo", "i", 0, rule=_BIT, group=_WORKFLOW)
    save_reduced_output: int = _k("SaveReducedOutput", "i", 0, rule=_BIT, group=_WORKFLOW)
    write_image: int = _k("WriteImage", "i", 1, rule=_BIT, group=_WORKFLOW)
    simulation_batches: int = _k("SimulationBatches", "i", 0, rule=_NONNEG, group=_WORKFLOW)
    denoise: int = _k("Denoise", "i", 0, rule=_BIT, group=_WORKFLOW)
    denoise_method: str | None = _k("DenoiseMethod", "s", group=_WORKFLOW)
    denoised_directory: str | None = _k("DenoisedDirectory", "s", group=_WORKFLOW)
    denoise_config_file: str | None = _k("DenoiseConfigFile", "s", group=_WORKFLOW)
    denoise_pattern: str | None = _k("DenoisePattern", "s", group=_WORKFLOW)
    denoise_train_jointly: int | None = _k("DenoiseTrainJointly", "i", rule=_BIT,
                                           group=_WORKFLOW)
    denoise_checkpoint: str | None = _k("DenoiseCheckpoint", "s", group=_WORKFLOW)
    denoise_finetune: int | None = _k("DenoiseFinetune", "i", rule=_BIT, group=_WORKFLOW)
    denoise_mask_threshold: float | None = _k("DenoiseMaskThreshold", "f", group=_WORKFLOW)
    denoise_no_median: int | None = _k("DenoiseNoMedian", "i", rule=_BIT, group=_WORKFLOW)
    # bookkeeping (not MIDAS keys)
    source: str = field(default="<string>", compare=False)
    warnings: tuple[str, ...] = field(default=(), compare=False)
    lines: Mapping[str, tuple[int, ...]] = field(default_factory=lambda: MappingProxyType({}),
                                                 compare=False, repr=False)
    extra: Mapping[str, tuple[str, ...]] = field(default_factory=lambda: MappingProxyType({}),
                                                 hash=False)

    # ------------------------------------------------------------------ derived values
    @property
    def n_frames(self) -> int:
        """Frames per distance, ``EndNr − StartNr + 1`` (MIDAS's fitter)."""
        self.require("StartNr", "EndNr")
        return self.end_nr - self.start_nr + 1

    @property
    def edge_length_effective(self) -> float:
        """Triangle edge in µm: ``EdgeLength`` when > 0, else ``GridSize`` (MakeHexGrid)."""
        if self.edge_length is not None and self.edge_length > 0:
            return self.edge_length
        self.require("GridSize")
        return self.grid_size

    @property
    def base_dir(self) -> Path:
        """The parameter file's folder (the current folder for text not read from a file)."""
        if self.source.startswith("<"):
            return Path.cwd()
        return Path(self.source).resolve().parent

    def resolve(self, path: str | os.PathLike) -> Path:
        """A file named in the parameter file, relative paths taken from the file's folder."""
        p = Path(os.path.expanduser(os.fspath(path)))
        return p if p.is_absolute() else self.base_dir / p

    @property
    def output_dir(self) -> Path:
        """Result folder: ``OutputDirectory``, else ``DataDirectory``, else the file's folder."""
        return self.resolve(self.output_directory or self.data_directory or ".")

    # ------------------------------------------------------------------ access
    def get_key(self, key: str) -> Any:
        """The typed value of MIDAS key ``key`` (aliases allowed; unknown keys: raw text)."""
        spec = KEYS.get(key)
        if spec is None:
            if key in self.extra:
                return self.extra[key][-1]
            raise KeyError(f"unknown MIDAS key {key!r}{_suggest(key)}")
        values = [getattr(self, a) for a in spec.attrs]
        return values[0] if len(set(values)) == 1 else tuple(values)

    def require(self, *keys: str, why: str | None = None) -> None:
        """Raise ParamError if any MIDAS key in ``keys`` is unset (None or no lines)."""
        missing = [k for k in keys if self.get_key(k) in (None, ())]
        if missing:
            names = ", ".join(f"'{k}'" for k in missing)
            plural = "s" if len(missing) > 1 else ""
            reason = f"needed {why}" if why else "optional when parsing, needed by this step"
            raise ParamError(f"{self.source}: missing required key{plural} {names} ({reason})")

    def replace(self, **changes: Any) -> Params:
        """A validated copy with some attributes (snake_case names) changed."""
        coerced = {}
        for attr, value in changes.items():
            spec = _BY_ATTR.get(attr)
            coerced[attr] = value if spec is None else _coerce(spec, value, self.source)
        # line numbers of changed keys no longer describe the values: drop them
        stale = {k for k, s in KEYS.items() if set(s.attrs) & set(coerced)}
        lines = MappingProxyType({k: v for k, v in self.lines.items() if k not in stale})
        new = dataclasses.replace(self, **coerced, lines=lines)
        _cross_check({f: getattr(new, f) for f in _BY_ATTR}, new.lines, new.source)
        return new


# --------------------------------------------------------------------------- table built
_BY_ATTR: dict[str, KeySpec] = {
    f.name: KeySpec(attrs=(f.name,), **f.metadata["midas"])
    for f in dataclasses.fields(Params) if "midas" in f.metadata
}
_ALIASES = {"LatticeConstant": ("lattice_parameter",), "RhoD": ("max_ring_rad",),
            "NrPixels": ("nr_pixels_y", "nr_pixels_z")}
#: Every known MIDAS key (aliases included) -> its KeySpec.
KEYS: dict[str, KeySpec] = {s.key: s for s in _BY_ATTR.values()}
for _alias, _attrs in _ALIASES.items():
    KEYS[_alias] = dataclasses.replace(_BY_ATTR[_attrs[0]], key=_alias, attrs=_attrs)
#: Keys of MIDAS's Python packages that nfjax does not interpret: kept raw, no warning.
_PASSTHROUGH = frozenset(
    "DataLoc PixelScale SumFrames MedianFrames MedianRowBlock NLMDenoise NLMH NLMHAbsolute "
    "BlanketSigma RefineWedge MinFracAcceptSigma ConfidenceMetric PhaseAtom "
    "DropForbiddenReflections".split())
#: MIDAS's fixed-size C buffers (reference §12 item 12): more lines overflow there.
_C_LIMITS = {"OmegaRange": 20, "BoxSize": 20, "RingsToUse": 100, "Lsd": 10}
_FLOAT_RE = re.compile(r"[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?\Z")
_INT_RE = re.compile(r"[+-]?\d+\Z")
_COMMENT_RE = re.compile(r"(?:^|(?<=\s))#")  # '#' starting a token opens a comment
_LINE_BREAK_RE = re.compile(r"\r\n|\r|\n")  # Unix, Windows and old Mac line ends
_NOUN = {"f": "a number", "i": "an integer", "s": "a name or path (one token)"}
_PLURAL = {"f": "numbers", "i": "integers", "s": "tokens"}


def _closest_key(key: str) -> tuple[str, bool] | None:
    """The known key ``key`` probably means, and whether only the case differs."""
    known = list(KEYS) + sorted(_PASSTHROUGH)
    folded = {k.lower(): k for k in known}
    if key.lower() in folded:
        return folded[key.lower()], True
    close = difflib.get_close_matches(key, known, n=1, cutoff=0.7)
    return (close[0], False) if close else None


def _suggest(key: str) -> str:
    match = _closest_key(key)
    if match is None:
        return ""
    name, case_only = match
    return f" (did you mean '{name}'?{' keys are case-sensitive' if case_only else ''})"


def _written_as(spec: KeySpec, lines: Mapping[str, tuple[int, ...]]) -> str:
    """A hint for a missing required key: an unknown key of the file that looks like it."""
    names = {k for k, s in KEYS.items() if s.attrs == spec.attrs}
    for key, found in lines.items():
        match = None if key in KEYS else _closest_key(key)
        if match is not None and match[0] in names:
            why = "keys are case-sensitive" if match[1] else "is it misspelt?"
            return f" (found '{key}' on line {found[0]}: {why})"
    return ""


# --------------------------------------------------------------------------- values
def _expected_count(spec: KeySpec) -> str:
    n, kinds = len(spec.types), set(spec.types)
    if n == 1:
        return _NOUN[spec.types]
    what = _PLURAL[spec.types[0]] if len(kinds) == 1 else "values"
    labels = f" ({' '.join(spec.labels)})" if spec.labels else ""
    return f"{n} {what}{labels}"


def _check_rule(spec: KeySpec, value: Any, found: str, where: str) -> None:
    if spec.rule is not None and not spec.rule[0](value):
        text = spec.rule[1]
        expected = f"{_NOUN[spec.types]} {text}" if len(spec.types) == 1 else text
        raise ParamError(f"{where}: expected {expected}, found {found}")


def _convert(spec: KeySpec, tokens: list[str], where: str) -> Any:
    """Typed value of one line's value tokens (comment already removed)."""
    n = len(spec.types)
    if len(tokens) != n:
        found = "nothing" if not tokens else (
            f"{len(tokens)} value{'s' if len(tokens) > 1 else ''} ('{' '.join(tokens)}')")
        hint = "; start a trailing comment with '#'" if len(tokens) > n else ""
        if any("#" in t for t in tokens):
            hint = "; a '#' inside a name is part of it: put a space before a comment"
        raise ParamError(f"{where}: expected {_expected_count(spec)}, found {found}{hint}")
    out = []
    for i, (kind, tok) in enumerate(zip(spec.types, tokens)):
        ok = {"f": _FLOAT_RE, "i": _INT_RE}.get(kind)
        if ok is not None and not ok.match(tok):
            label = f" for {spec.labels[i]}" if spec.labels else ""
            pos = f" (value {i + 1} of {n})" if n > 1 else ""
            raise ParamError(f"{where}: expected {_NOUN[kind]}{label}{pos}, found '{tok}'")
        value = float(tok) if kind == "f" else int(tok) if kind == "i" else tok
        if kind == "f" and not math.isfinite(value):
            raise ParamError(f"{where}: expected a finite number, found '{tok}'")
        out.append(value)
    value = out[0] if n == 1 else tuple(out)
    _check_rule(spec, value, " ".join(tokens) if n == 1 else f"'{' '.join(tokens)}'", where)
    return value


def _coerce_one(spec: KeySpec, value: Any, where: str) -> Any:
    """Check and normalise a Python value for one entry of ``spec`` (replace / update)."""
    n = len(spec.types)
    items = list(value) if n > 1 and isinstance(value, (tuple, list)) else [value]
    if len(items) != n:
        raise ParamError(f"{where}: expected {_expected_count(spec)}, found {value!r}")
    out = []
    for kind, item in zip(spec.types, items):
        if kind == "f" and isinstance(item, numbers.Real) and not isinstance(item, bool) \
                and math.isfinite(float(item)):
            out.append(float(item))
        elif kind == "i" and isinstance(item, numbers.Integral) and not isinstance(item, bool):
            out.append(int(item))
        elif kind == "s" and isinstance(item, (str, os.PathLike)) and os.fspath(item) \
                and not any(c.isspace() for c in os.fspath(item)) \
                and not os.fspath(item).startswith("#"):
            out.append(os.fspath(item))
        else:
            raise ParamError(f"{where}: expected {_NOUN.get(kind, 'a value')}, found {item!r}")
    result = out[0] if n == 1 else tuple(out)
    _check_rule(spec, result, repr(value), where)
    return result


def _coerce(spec: KeySpec, value: Any, source: str) -> Any:
    where = f"{source}: {spec.key}"
    if hasattr(value, "tolist"):  # numpy arrays and scalars
        value = value.tolist()
    if spec.types == "?" and value is None:
        return False
    if value is None or (spec.multi and value in ((), [])):
        if spec.required:
            raise ParamError(f"{source}: missing required key '{spec.key}'")
        return () if spec.multi else None
    if spec.types == "?":
        if not isinstance(value, bool):
            raise ParamError(f"{where}: expected True or False, found {value!r}")
        return value
    if spec.multi:
        return tuple(_coerce_one(spec, v, where) for v in _entries(spec, value))
    return _coerce_one(spec, value, where)


def _entries(spec: KeySpec, value: Any) -> list[Any]:
    """A multi key's value as a list of entries (one bare entry is accepted too)."""
    if not isinstance(value, (list, tuple)):
        return [value]
    if len(spec.types) > 1 and value and not isinstance(value[0], (list, tuple)):
        return [value]
    return list(value)


# --------------------------------------------------------------------------- parsing
def read_params(path: str | os.PathLike, *, required: bool = True) -> Params:
    """Parse and validate the MIDAS parameter file at ``path`` (see :func:`parse_params`)."""
    name = os.fspath(path)
    if not name:
        raise ParamError("parameter file name is empty: give the path of a MIDAS parameter "
                         "file")
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        raise ParamError(f"{name}: parameter file not found") from None
    except IsADirectoryError:
        raise ParamError(f"{name}: is a directory, not a parameter file") from None
    except OSError as exc:
        raise ParamError(f"{name}: cannot read parameter file ({exc.strerror})") from None
    if b"\0" in data:
        line = data[:data.index(b"\0")].count(b"\n") + 1
        raise ParamError(f"{name}: not a text parameter file (NUL byte on line {line})")
    try:
        text = data.decode(TEXT_ENCODING)
    except UnicodeDecodeError as exc:
        line = data[:exc.start].count(b"\n") + 1
        raise ParamError(f"{name}: not a text parameter file (bytes that are not UTF-8 on "
                         f"line {line})") from None
    return parse_params(text, source=name, required=required)


def parse_params(text: str, source: str = "<string>", *, required: bool = True) -> Params:
    """Parse parameter-file text into a validated :class:`Params`.

    Syntax as MIDAS's shared parser: ``Key value ...`` per line (lines end in LF, CRLF or
    CR), any whitespace between tokens, ``#`` opens a comment (see :func:`_strip_comment`),
    blank lines skipped, the last line of a scalar key wins and repeated keys append. Raises
    ParamError on the first malformed line, a missing required key (nDistances, Lsd, BC, px,
    Wavelength, LatticeParameter) or an inconsistent count. ``required=False`` lets the
    required keys be absent, for tools that read only a few keys (Mic2GrainsList's
    SpaceGroup, MaxAngle, ...); every key present is still checked.
    """
    if "\0" in text:
        line = text[:text.index("\0")].count("\n") + 1
        raise ParamError(f"{source}: not a text parameter file (NUL byte on line {line})")
    warnings: list[str] = []
    values: dict[str, Any] = {}
    set_at: dict[str, tuple[str, int]] = {}
    lines: dict[str, list[int]] = {}
    extra: dict[str, list[str]] = {}
    for lineno, raw in enumerate(_LINE_BREAK_RE.split(text), 1):
        content = _strip_comment(raw)
        tokens = content.split()
        if not tokens:
            continue
        key, args = tokens[0], tokens[1:]
        where = f"{source}:{lineno}: {key}"
        lines.setdefault(key, []).append(lineno)
        if content[0].isspace():
            warnings.append(f"{where}: line starts with whitespace; MIDAS's C programs "
                            "ignore such a line, nfjax reads it")
        after = content.lstrip()[len(key):len(key) + 1]
        if args and after != " ":
            warnings.append(f"{where}: a tab (not a space) follows the key; MIDAS's C "
                            "programs would not see this line, nfjax reads it")
        spec = KEYS.get(key)
        if spec is None:
            if key not in _PASSTHROUGH:
                warnings.append(f"{where}: unknown key, ignored{_suggest(key)}")
            extra.setdefault(key, []).append(content.lstrip()[len(key):].strip())
            continue
        if spec.types == "?":
            value = _parse_flag(args, where, warnings)
        else:
            value = _convert(spec, args, where)
        for attr in spec.attrs:
            if spec.multi:
                values.setdefault(attr, []).append(value)
                continue
            prev_key, prev_line = set_at.get(attr, (None, 0))
            if prev_key is not None and KEYS[prev_key].attrs == spec.attrs:
                warnings.append(f"{where}: repeated (also set by {prev_key} on line {prev_line}); "
                                "the last value is used, as in MIDAS")
            values[attr] = value
            set_at[attr] = (key, lineno)
    if not lines:
        raise ParamError(f"{source}: contains no parameters")
    for spec in _BY_ATTR.values():
        if required and spec.required and spec.attrs[0] not in values:
            alias = " (or 'LatticeConstant')" if spec.key == "LatticeParameter" else ""
            raise ParamError(f"{source}: missing required key '{spec.key}'{alias}"
                             f"{_written_as(spec, lines)}")
    kwargs = {a: tuple(v) if isinstance(v, list) else v for a, v in values.items()}
    frozen_lines = MappingProxyType({k: tuple(v) for k, v in lines.items()})
    full = {a: kwargs.get(a, _default(a)) for a in _BY_ATTR}
    warnings += _cross_check(full, frozen_lines, source)
    return Params(**kwargs, source=source, warnings=tuple(warnings), lines=frozen_lines,
                  extra=MappingProxyType({k: tuple(v) for k, v in extra.items()}))


def _strip_comment(line: str) -> str:
    """``line`` without its comment.

    A ``#`` that starts a token opens a comment. After a key whose values are numbers a
    ``#`` anywhere does (``px 1.48# pixel`` is 1.48, as MIDAS's ``%lf`` stops there); in
    the value of a key that names a file, or of an unknown key, a ``#`` inside a token is
    part of it (MIDAS's ``%s`` reads ``a#b.mic`` whole).
    """
    m = _COMMENT_RE.search(line)
    line = line[:m.start()] if m else line
    tokens = line.split(None, 1)
    if "#" in line and tokens:
        spec = KEYS.get(tokens[0])
        if spec is not None and "s" not in spec.types:
            line = line[:line.index("#")]
    return line


def _parse_flag(args: list[str], where: str, warnings: list[str]) -> bool:
    # MIDAS sets these flags when a line starts with "Key " whatever follows.
    if not args:
        warnings.append(f"{where}: flag without a value; MIDAS's C programs need 'Key 1' "
                        "(key, space, value) to see it, nfjax reads it as on")
        return True
    if len(args) != 1 or args[0] not in ("0", "1"):
        raise ParamError(f"{where}: expected nothing, 0 or 1, found '{' '.join(args)}'")
    if args[0] == "0":
        warnings.append(f"{where}: is 0, but MIDAS's C programs switch this flag on for any "
                        "line that names it; nfjax reads it as off")
    return args[0] == "1"


def _default(attr: str) -> Any:
    f = Params.__dataclass_fields__[attr]
    return None if f.default is dataclasses.MISSING else f.default


def _at(source: str, lines: Mapping[str, tuple[int, ...]], key: str) -> str:
    found = lines.get(key)
    return f"{source}:{found[-1]}" if found else source


def _line_list(lines: Mapping[str, tuple[int, ...]], key: str) -> str:
    found = lines.get(key, ())
    return f" (lines {', '.join(map(str, found))})" if found else ""


def _cross_check(v: dict[str, Any], lines: Mapping[str, tuple[int, ...]],
                 source: str) -> list[str]:
    """Checks between keys. Raises ParamError; returns warnings."""
    for key, attr in (("Lsd", "lsd"), ("BC", "bc")):
        if v["n_distances"] is not None and len(v[attr]) != v["n_distances"]:
            raise ParamError(f"{source}: nDistances is {v['n_distances']} but found "
                             f"{len(v[attr])} '{key}' line(s){_line_list(lines, key)}")
    if len(v["box_sizes"]) != len(v["omega_ranges"]):
        raise ParamError(
            f"{source}: found {len(v['omega_ranges'])} 'OmegaRange' line(s)"
            f"{_line_list(lines, 'OmegaRange')} but {len(v['box_sizes'])} 'BoxSize' line(s)"
            f"{_line_list(lines, 'BoxSize')}; MIDAS pairs each OmegaRange with one BoxSize")
    start, end = v["start_nr"], v["end_nr"]
    if start is not None and end is not None and end < start:
        raise ParamError(f"{_at(source, lines, 'EndNr')}: EndNr: expected an integer >= "
                         f"StartNr ({start}), found {end}")
    warnings = []
    nfiles = v["nr_files_per_distance"]
    if start is not None and end is not None and nfiles is not None \
            and nfiles != end - start + 1:
        warnings.append(f"{_at(source, lines, 'NrFilesPerDistance')}: NrFilesPerDistance is "
                        f"{nfiles} but EndNr - StartNr + 1 is {end - start + 1}; MIDAS needs "
                        "them equal (frames per distance)")
    for key, limit in _C_LIMITS.items():
        if len(lines.get(key, ())) > limit:
            warnings.append(f"{source}: {len(lines[key])} '{key}' lines; MIDAS's C programs "
                            f"hold at most {limit} (nfjax has no limit)")
    lattice = _lattice_mismatch(v["lattice_parameter"], v["space_group"])
    if lattice:
        warnings.append(f"{_at(source, lines, 'LatticeParameter')}: LatticeParameter "
                        f"{' '.join(_fmt_token(float(x)) for x in v['lattice_parameter'])} does "
                        f"not fit SpaceGroup {v['space_group']} ({lattice}); the reflections "
                        "are computed from the lattice as given")
    given = [key for key in ("NrPixelsY", "NrPixelsZ") if key in lines]
    if len(given) == 1 and "NrPixels" not in lines:
        other = "NrPixelsZ" if given[0] == "NrPixelsY" else "NrPixelsY"
        value = v["nr_pixels_y" if given[0] == "NrPixelsY" else "nr_pixels_z"]
        warnings.append(f"{_at(source, lines, given[0])}: {given[0]} {value} without "
                        f"{other}: {other} is taken as 2048, as MIDAS's fitter and simulateNF "
                        f"read it (its image processing would take {value}); give {other}, "
                        "or NrPixels for a square detector")
    grid_size_lines, point_lines = lines.get("GridSize", ()), lines.get("GridPoints", ())
    if point_lines and (not grid_size_lines or grid_size_lines[0] > point_lines[0]):
        warnings.append(f"{source}:{point_lines[0]}: GridPoints: comes before GridSize; "
                        "MIDAS's FitOrientationParametersMultiPoint needs GridSize first")
    return warnings


# Strained or refined lattices (a far-field fit's) deviate from their system by far less.
_LENGTH_TOL, _ANGLE_TOL = 0.005, 0.5


def _lattice_mismatch(lattice, space_group) -> str:
    """What a lattice breaks of its space group's crystal system ("" if nothing): lengths
    equal within 0.5 %, angles within 0.5 degrees."""
    if lattice is None or space_group is None:
        return ""
    a, b, c, al, be, ga = (float(x) for x in lattice)
    sg = int(space_group)
    same = lambda x, y: abs(x - y) <= _LENGTH_TOL * max(x, y)  # noqa: E731
    right = lambda *angles: all(abs(t - 90) <= _ANGLE_TOL for t in angles)  # noqa: E731
    if sg >= 195:
        ok, system = same(a, b) and same(b, c) and right(al, be, ga), "cubic: a = b = c, 90 90 90"
    elif sg >= 143:
        hexagonal = same(a, b) and right(al, be) and abs(ga - 120) <= _ANGLE_TOL
        rhombohedral = (143 <= sg <= 167 and same(a, b) and same(b, c)
                        and abs(al - be) <= _ANGLE_TOL and abs(be - ga) <= _ANGLE_TOL)
        ok = hexagonal or rhombohedral
        system = ("hexagonal: a = b, 90 90 120" if sg >= 168 else
                  "trigonal: a = b, 90 90 120, or rhombohedral a = b = c, alpha = beta = gamma")
    elif sg >= 75:
        ok, system = same(a, b) and right(al, be, ga), "tetragonal: a = b, 90 90 90"
    elif sg >= 16:
        ok, system = right(al, be, ga), "orthorhombic: 90 90 90"
    elif sg >= 3:
        ok, system = right(al, ga), "monoclinic (b unique): alpha = gamma = 90"
    else:
        return ""
    return "" if ok else system


# --------------------------------------------------------------------------- output
def _fmt_token(value: Any) -> str:
    """Shortest text that reads back to exactly ``value`` (repr of floats, '.0' dropped)."""
    if isinstance(value, float):
        text = repr(value)
        return text[:-2] if text.endswith(".0") else text
    return str(value)


def _fmt_value(spec: KeySpec, value: Any) -> str:
    if spec.types == "?":
        return "1"
    if len(spec.types) == 1:
        return _fmt_token(value)
    return " ".join(_fmt_token(x) for x in value)


def _render(params: Params, mark_defaults: bool) -> list[str]:
    """``Key value`` lines of every set key, grouped, in table order."""
    out: list[str] = []
    group = None
    same_pixels = params.nr_pixels_y == params.nr_pixels_z
    for attr, spec in _BY_ATTR.items():
        value = getattr(params, attr)
        if value is None or value == () or value is False:
            continue
        key = spec.key
        if attr in ("nr_pixels_y", "nr_pixels_z") and same_pixels:
            if attr == "nr_pixels_z":
                continue
            key = "NrPixels"  # one line sets both, as MIDAS's PIC and MedianImageLibTiff read
        if spec.group != group:
            out.extend(([""] if out else []) + [f"# {spec.group}"])
            group = spec.group
        from_file = any(a in params.lines for a, s in KEYS.items() if set(s.attrs) & {attr})
        if attr == "sg_nr" and not from_file:
            # Only MIDAS's ParseMic reads SGNr; listing its default 225 next to another
            # SpaceGroup reads as a contradiction.
            continue
        note = "  # default" if mark_defaults and not from_file and value == _default(attr) \
            else ""
        for entry in (value if spec.multi else [value]):
            out.append(f"{key} {_fmt_value(spec, entry)}{note}")
    if params.extra:
        out.extend(["", "# keys nfjax does not interpret (kept verbatim)"])
        for key, raws in params.extra.items():
            out.extend(f"{key} {raw}".rstrip() for raw in raws)
    return out


def format_params(params: Params) -> str:
    """Normalised listing: one ``Key value`` per line, grouped, every key that has a value.

    Values that come from MIDAS's defaults rather than the file end in ``# default``. The
    text is itself a valid parameter file.
    """
    return "\n".join(_render(params, mark_defaults=True)) + "\n"


def write_params(params: Params, path: str | os.PathLike) -> None:
    """Write ``params`` as a MIDAS parameter file, atomically.

    One space after each key (what MIDAS's C parsers need), one line per entry of a repeated
    key, floats in their shortest exact form, so ``read_params(path) == params``.
    """
    text = "# MIDAS NF-HEDM parameter file written by nfjax\n"
    text += "\n".join(_render(params, mark_defaults=False)) + "\n"
    with atomic_write(path, "w", encoding="utf-8") as fh:
        fh.write(text)


def update_param_text(text: str, changes: Mapping[str, Any]) -> str:
    """Rewrite parameter-file text with new values, keeping comments and layout.

    ``changes`` maps MIDAS keys to values (a list of entries for a repeated key replaces all
    its lines; ``None`` deletes the key). Every line of the key (and of its alias, e.g.
    LatticeConstant for LatticeParameter) is rewritten, unlike MIDAS's ``update_param_file``
    (nf_MIDAS_Multiple_Resolutions.py), which replaces only the first occurrence so that a
    later duplicate survives and, for the C programs, wins. Keys not present are appended.
    Known keys are validated (ParamError); unknown keys are written as given. Every line
    ends as the file's first line does (LF, CRLF or CR).
    """
    first_break = _LINE_BREAK_RE.search(text)
    newline = first_break.group() if first_break else "\n"
    rows = _LINE_BREAK_RE.split(text)
    if rows and rows[-1] == "":
        rows.pop()
    for key, value in changes.items():
        spec = KEYS.get(key)
        if spec is None:
            items = value if isinstance(value, list) else [value]
            new = [] if value is None else [
                " ".join(map(_fmt_token, v)) if isinstance(v, (tuple, list)) else _fmt_token(v)
                for v in items]
            names = {key}
        else:
            typed = _coerce(spec, value, "<update>")
            if spec.types == "?":
                new = ["1"] if typed else []
            else:
                new = [_fmt_value(spec, v) for v in (typed if spec.multi else [typed])
                       ] if typed not in (None, ()) else []
            names = {k for k, s in KEYS.items() if s.attrs == spec.attrs}
        multi = spec.multi if spec is not None else isinstance(value, list)
        rows = _replace_rows(rows, key, names, new, repeat_all=not multi)
    return newline.join(rows) + newline


def _replace_rows(rows: list[str], key: str, names: set[str], new: list[str],
                  repeat_all: bool) -> list[str]:
    out: list[str] = []
    done = False
    for row in rows:
        content = _strip_comment(row)
        tokens = content.split()
        if not tokens or tokens[0] not in names:
            out.append(row)
            continue
        if done and not repeat_all:
            continue  # a repeated key's later lines: the new list replaces them all
        done = True
        comment = row[len(content):]
        old = content.lstrip()[len(tokens[0]):]  # separator, old values, padding
        for i, value in enumerate(new):
            line = f"{tokens[0]} {value}"  # keep the file's spelling (alias) of the key
            if comment and i == 0:
                gap = max(1, len(old) - len(old.rstrip()))
                pad = max(len(line) + gap, len(tokens[0]) + len(old))  # keep the '#' column
                line = line.ljust(pad) + comment
            out.append(line)
    if not done:
        out.extend(f"{key} {value}" for value in new)
    return out
