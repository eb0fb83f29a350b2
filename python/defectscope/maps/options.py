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
import typing
from collections.abc import Mapping
from typing import Any

from defectscope.maps.rois import UNKNOWN_POLICIES

MODES = ("auto", "dense", "window")
SYMMETRIES = ("none", "d4")
NAN_POLICIES = ("raise", "zero", "propagate")


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
    """

    stride: int = _field(16, "window step in pixels")
    mode: str = _field("auto", "dense: one trunk pass per frame; window: each window", MODES)
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

    def __post_init__(self) -> None:
        for name in ("stride", "top_k", "batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        for field in dataclasses.fields(self):
            choices = field.metadata.get("choices")
            value = getattr(self, field.name)
            if choices and value not in choices:
                raise ValueError(f"{field.name} must be one of {', '.join(choices)}, got {value!r}")
        if self.min_spacing is not None:
            spacing = self.min_spacing
            if isinstance(spacing, bool) or not isinstance(spacing, int | float):
                raise ValueError(f"min_spacing must be a number, got {spacing!r}")
            if not math.isfinite(spacing) or spacing < 0:
                raise ValueError(f"min_spacing must be finite and >= 0, got {spacing!r}")
        if self.background is not None and not isinstance(self.background, str):
            raise ValueError(f"background must be a class name, got {self.background!r}")
        if not isinstance(self.keep_embeddings, bool):
            raise ValueError(f"keep_embeddings must be true or false, got {self.keep_embeddings!r}")

    def replace(self, **changes: Any) -> MapOptions:
        """A copy with ``changes`` applied (and validated)."""
        return dataclasses.replace(self, **changes)

    def to_json(self) -> dict[str, Any]:
        """The options as a JSON-ready dict (every field, so a record is complete)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_json(
        cls, data: Mapping[str, Any] | None, base: MapOptions | None = None
    ) -> MapOptions:
        """Options from a JSON object, over ``base`` (default: the defaults).

        Raises
        ------
        ValueError
            For a key that is no option, or a value of the wrong type or range; the
            message names the key.
        """
        base = base or cls()
        if data is None:
            return base
        if not isinstance(data, Mapping):
            raise ValueError(f"map options must be a JSON object, got {type(data).__name__}")
        names = {field.name for field in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"unknown map option(s) {', '.join(map(str, unknown))}")
        hints = typing.get_type_hints(cls)
        changes = {}
        for key, value in data.items():
            changes[key] = _coerce(key, value, hints[key])
        return dataclasses.replace(base, **changes)


def _coerce(key: str, value: Any, hint: Any) -> Any:
    """``value`` read from JSON as the field's type; ints given as floats like 16.0 pass."""
    allowed = typing.get_args(hint) or (hint,)
    if value is None:
        if type(None) in allowed:
            return None
        raise ValueError(f"{key} must not be null")
    if bool in allowed:
        if not isinstance(value, bool):
            raise ValueError(f"{key} must be true or false, got {value!r}")
        return value
    if int in allowed:
        if isinstance(value, float) and math.isfinite(value) and value.is_integer():
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{key} must be an integer, got {value!r}")
        return value
    if float in allowed:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ValueError(f"{key} must be a number, got {value!r}")
        try:
            number = float(value)
        except OverflowError:
            raise ValueError(f"{key} is out of range: {value!r}") from None
        if not math.isfinite(number):
            raise ValueError(f"{key} must be finite, got {value!r}")
        return number
    if not isinstance(value, str):
        raise ValueError(f"{key} must be a string, got {value!r}")
    return value
