"""How to map a frame: one frozen set of options from the command line to the wire.

:class:`MapOptions` is what every caller of :meth:`Detector.find
<defectscope.maps.detector.Detector.find>` passes (CLI, batch, service, live detector,
napari, the Nion loop), so a setting means the same everywhere and a new one is one
edit here: each field's metadata holds its help text (and choices), from which the
command line builds its options, and the JSON form is what the service header and the
batch records carry.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import typing
from collections.abc import Mapping
from typing import Any

from defectscope.tiling.lattice import SCALE_RANGE

MODES = ("auto", "dense", "window")
# What regions unlike the training data may do: never ROIs, or compete as ROIs.
UNKNOWN_POLICIES = ("ignore", "explore")
SYMMETRIES = ("none", "d4")
# Which training densities say "unknown": every one the model carries, or one alone.
NOVELTY = (
    "auto",
    "embedding",
    "residual",
    "mc_dropout",
    "ensemble",
    "mc_dropout+residual",
    "ensemble+residual",
    "embedding+residual",
)
NAN_POLICIES = ("raise", "zero", "propagate")
# Scale matching: measure the factor, or map as recorded (a number is a factor).
SCALE_WORDS = ("auto", "off")


def _field(default: Any, help: str, choices: tuple[str, ...] | None = None, **more: Any):
    metadata = {"help": help, **more}
    if choices is not None:
        metadata["choices"] = choices
    return dataclasses.field(default=default, metadata=metadata)


@dataclasses.dataclass(frozen=True)
class MapOptions:
    """Everything that decides how a frame is mapped and which ROIs are proposed.

    Parameters
    ----------
    stride : int
        Window step in pixels.
    mode : {'auto', 'dense', 'window'}
        ``auto`` maps densely where a dense graph serves the stride, ``dense``
        requires one, ``window`` classifies each window on its own.
    symmetry : {'none', 'd4'}
        ``d4`` averages each window over the eight symmetries of the square.
    nan_policy : {'raise', 'zero', 'propagate'}
        What non-finite pixels do (see :func:`defectscope.tile`).
    unknown : {'ignore', 'explore'}
        Whether regions unlike the training data may become ROIs.
    top_k : int
        Number of ROIs proposed.
    min_spacing : float or None
        Least distance in pixels between ROI centres (None: the patch size).
    background : str or None
        The defect-free class, when the model's own choice is missing or wrong.
    keep_embeddings : bool
        Keep per-window embeddings in the result (ROIs need them; a map alone may not).
    batch_size : int
        Windows per engine call, used when a detector is loaded with these options.
    scale : 'auto', 'off' or float
        Resample the frame to the scale of the model's patches before tiling
        (:func:`~defectscope.maps.scale.decide_scale`): ``auto`` from the calibration,
        else the frame's lattice period; ``off`` maps the frame as recorded; a number
        is the zoom itself (``1.1`` enlarges the frame by 10 %), within
        :data:`~defectscope.tiling.lattice.SCALE_RANGE` (0.25-4). A string that reads
        as a number (``"1.1"`` from the command line) is that number.
    novelty : str
        One of :data:`NOVELTY`.
        What makes a window unknown. ``auto`` is ``ensemble+residual`` where the
        model carries both records (every model trained since they exist), else
        every density it carries. The sources: the embedding's density
        (``embedding``), which flags new structures; the lattice residual's
        (``residual``), which flags a new point defect in a known lattice; the
        disagreement of the head's Monte Carlo dropout (``mc_dropout``,
        :class:`~defectscope.artifacts.disagreement.DropoutNovelty`) or of a head
        ensemble on the embedding (``ensemble``,
        :class:`~defectscope.artifacts.disagreement.EnsembleNovelty`); or a pair
        with the lattice residual (``ensemble+residual``, ``mc_dropout+residual``,
        ``embedding+residual``): a window either calls unknown is unknown, at the
        larger of the two calibrated uncertainties. Where other sources than the
        embedding's density judge the windows, that density still checks the frame
        as a whole (``out_of_distribution``).
    ood_share : float
        Share of a frame's windows, in (0, 1], unknown beyond the rings of known
        defects above which the whole frame is flagged ``out_of_distribution`` (and
        gives no ROI unless ``unknown='explore'``).

    Raises
    ------
    ValueError
        For a value of the wrong type or range; the message names the field. Integer
        fields take any integral number (``numpy.int64`` too) and store an ``int``;
        ``min_spacing`` is stored as a ``float``.
    """

    stride: int = _field(16, "window step in pixels")
    mode: str = _field(
        "auto",
        "dense: one trunk pass over the frame (needs 'densify'); window: each window on its "
        "own; auto: dense where a dense graph serves the stride",
        MODES,
    )
    symmetry: str = _field("none", "d4: average the 8 symmetries of the square", SYMMETRIES)
    nan_policy: str = _field("raise", "what NaN/inf pixels do", NAN_POLICIES)
    unknown: str = _field(
        "ignore", "explore: regions unlike the training data may be ROIs", UNKNOWN_POLICIES
    )
    top_k: int = _field(5, "number of ROIs proposed")
    min_spacing: float | None = _field(None, "least ROI spacing in pixels (default: patch size)")
    background: str | None = _field(None, "the defect-free class, if the model's is wrong")
    keep_embeddings: bool = _field(True, "keep per-window embeddings (ROIs need them)")
    batch_size: int = _field(64, "windows per engine call")
    scale: str | float = _field(
        "auto",
        "resample the frame to the model's scale before tiling: auto (from the calibration, "
        "else the lattice period), off, or a factor (1.1 enlarges by 10%)",
        metavar="auto|off|FACTOR",
    )
    novelty: str = _field(
        "auto",
        "what makes a window unknown: auto (ensemble+residual where the model has both, "
        "else every density it has), embedding, residual, mc_dropout (the head's Monte "
        "Carlo dropout disagreement), ensemble (a head ensemble's), or ensemble+residual "
        "/ mc_dropout+residual / embedding+residual (each with the lattice residual)",
        NOVELTY,
    )
    ood_share: float = _field(
        0.25, "share of unknown windows above which a frame is out of distribution, in (0, 1]"
    )

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            value = _check(field.name, field, getattr(self, field.name))
            object.__setattr__(self, field.name, value)

    def replace(self, **changes: Any) -> MapOptions:
        """A copy with ``changes`` applied (and validated)."""
        return dataclasses.replace(self, **changes)

    def to_json(self) -> dict[str, Any]:
        """The options as a JSON-ready dict (every field, so a record is complete)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_json(
        cls,
        data: Mapping[str, Any] | None,
        base: MapOptions | None = None,
        aliases: Mapping[str, str] | None = None,
    ) -> MapOptions:
        """Options from a JSON object, over ``base`` (default: the defaults).

        Parameters
        ----------
        data : mapping or None
            Field names (or ``aliases``) to JSON values; None gives ``base``.
        base : MapOptions, optional
            The options that keys absent from ``data`` keep.
        aliases : mapping, optional
            Other names a key may have, to the field they set (``{"top": "top_k"}``,
            see :data:`LEGACY_NAMES`); an error names the key as ``data`` spelt it.

        Raises
        ------
        ValueError
            For a key that is no option (or a field given under two names), or a value
            of the wrong type or range; the message names the key.
        """
        base = base or cls()
        if data is None:
            return base
        if not isinstance(data, Mapping):
            raise ValueError(f"map options must be a JSON object, got {type(data).__name__}")
        fields = {field.name: field for field in dataclasses.fields(cls)}
        aliases = dict(aliases or {})
        unknown = sorted(str(key) for key in data if key not in fields and key not in aliases)
        if unknown:
            raise ValueError(
                f"unknown map option(s) {', '.join(unknown)}; known: {', '.join(fields)}"
            )
        hints = typing.get_type_hints(cls)
        changes: dict[str, Any] = {}
        given_as: dict[str, str] = {}
        for key, value in data.items():
            name = aliases.get(key, key)
            if name in given_as:
                raise ValueError(f"map option {name} is given twice, as {given_as[name]} and {key}")
            given_as[name] = key
            changes[name] = _check(key, fields[name], _coerce(key, value, hints[name]))
        return dataclasses.replace(base, **changes)


# The largest stride, top_k or batch size: the tiler's int32 range.
MAX_INT = 2**31 - 1

# Names the service header and older keyword arguments use for MapOptions fields.
LEGACY_NAMES = {"top": "top_k"}


def resolve_options(options: MapOptions | None = None, **given: Any) -> MapOptions:
    """``options`` with the keyword arguments of an older signature that were given.

    ``LiveDetector``, ``visit_top_roi`` and ``Detector.rois`` keep their keywords
    (``stride=``, ``top=``, ``unknown=`` ...) beside ``options=``; a keyword left at
    None is not given. Without ``options`` the given keywords apply over the
    defaults; with ``options`` a given keyword must agree with it.

    Raises
    ------
    TypeError
        When ``options`` is not a :class:`MapOptions`.
    ValueError
        For a bad value (naming the keyword as given), or a keyword that differs from
        ``options``.
    """
    if options is not None and not isinstance(options, MapOptions):
        raise TypeError(f"options must be MapOptions, got {type(options).__name__}")
    fields = {field.name: field for field in dataclasses.fields(MapOptions)}
    changes: dict[str, Any] = {}
    for key, value in given.items():
        if value is None:
            continue
        name = LEGACY_NAMES.get(key, key)
        if name not in fields:
            raise TypeError(f"{key} is no map option")
        changes[name] = _check(key, fields[name], value)
        if options is not None and getattr(options, name) != changes[name]:
            raise ValueError(
                f"{key}={value!r} differs from options.{name}={getattr(options, name)!r}; "
                "give it in one place"
            )
    return options if options is not None else MapOptions(**changes)


def _check(key: str, field: dataclasses.Field, value: Any) -> Any:
    """``value`` validated (and normalized) for ``field``; errors name ``key``."""
    name = field.name
    if name in ("stride", "top_k", "batch_size"):
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
            raise ValueError(f"{key} must be a positive integer, got {_short(value)}")
        if value > MAX_INT:  # a JSON integer may have any number of digits
            raise ValueError(f"{key} must be at most {MAX_INT}, got {_short(value)}")
        return int(value)
    choices = field.metadata.get("choices")
    if choices:
        if not isinstance(value, str) or value not in choices:
            raise ValueError(f"{key} must be one of {', '.join(choices)}, got {value!r}")
        return value
    if name == "min_spacing":
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise ValueError(f"{key} must be a number, got {value!r}")
        try:
            spacing = float(value)
        except OverflowError:
            raise ValueError(f"{key} is beyond the float range: {_short(value)}") from None
        if not math.isfinite(spacing) or spacing < 0:
            raise ValueError(f"{key} must be finite and >= 0, got {value!r}")
        return spacing
    if name == "background":
        if value is not None and (not isinstance(value, str) or not value):
            raise ValueError(f"{key} must be a class name, got {value!r}")
        return value
    if name == "scale":
        return _check_scale(key, value)
    if name == "ood_share":
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise ValueError(f"{key} must be a number in (0, 1], got {_short(value)}")
        try:
            share = float(value)
        except OverflowError:
            raise ValueError(f"{key} is beyond the float range: {_short(value)}") from None
        if not (math.isfinite(share) and 0 < share <= 1):
            raise ValueError(f"{key} must be a number in (0, 1], got {value!r}")
        return share
    if name == "keep_embeddings":
        if not isinstance(value, bool):
            raise ValueError(f"{key} must be true or false, got {value!r}")
        return value
    raise AssertionError(f"map option {name} has no check")  # a new field needs one here


def _check_scale(key: str, value: Any) -> str | float:
    """``auto``, ``off`` or a factor in SCALE_RANGE as a float; errors name ``key``."""
    low, high = SCALE_RANGE
    wanted = f"{key} must be 'auto', 'off' or a factor from {low:g} to {high:g}"
    if isinstance(value, str):
        text = value.strip()
        if text in SCALE_WORDS:
            return text
        try:
            value = float(text)
        except ValueError:
            raise ValueError(f"{wanted}, got {value!r}") from None
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{wanted}, got {_short(value)}")
    try:
        factor = float(value)
    except OverflowError:
        raise ValueError(f"{wanted}, got {_short(value)} (beyond the float range)") from None
    if not math.isfinite(factor) or factor <= 0:
        raise ValueError(f"{wanted}, got {value!r}")
    if not low <= factor <= high:
        # A factor the user asked for is not silently dropped: outside the range a
        # frame would be resampled beyond what any lattice needs (x10: 100x the pixels).
        raise ValueError(f"{wanted}, got {factor:g}")
    return factor


def _short(value: Any) -> str:
    """A number for a one-line message: a 400-digit integer is named by its size."""
    text = repr(value)
    return text if len(text) <= 40 else f"an integer of {len(text)} digits"


def _coerce(key: str, value: Any, hint: Any) -> Any:
    """``value`` read from JSON as the field's type; ints given as floats like 16.0 pass."""
    allowed = typing.get_args(hint) or (hint,)
    if str in allowed and isinstance(value, str):
        return value  # a str | float field: the field's own check reads the text
    if value is None:
        if type(None) in allowed:
            return None
        raise ValueError(f"{key} must not be null")
    if bool in allowed:
        if not isinstance(value, bool):
            raise ValueError(f"{key} must be true or false, got {_short(value)}")
        return value
    if int in allowed:
        if isinstance(value, float) and math.isfinite(value) and value.is_integer():
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{key} must be an integer, got {_short(value)}")
        return value
    if float in allowed:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ValueError(f"{key} must be a number, got {_short(value)}")
        try:
            number = float(value)
        except OverflowError:
            raise ValueError(f"{key} is beyond the float range: {_short(value)}") from None
        if not math.isfinite(number):
            raise ValueError(f"{key} must be finite, got {value!r}")
        return number
    if not isinstance(value, str):
        raise ValueError(f"{key} must be a string, got {_short(value)}")
    return value
