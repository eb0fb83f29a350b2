"""Command-line options made from a frozen dataclass's fields, so a new setting is one edit.

:class:`DataclassOptions` reads each field's annotation (the option's type), default and
metadata and adds one argparse option per field; :meth:`DataclassOptions.build` turns
the parsed namespace back into the dataclass, whose own checks then run. A field holding
another dataclass (``SimulationSettings.instrument``) is flattened into options for its
fields.

Field metadata read here (all optional):

``help``
    The option's help (default: the field's name).
``choices``
    The values the option takes.
``metavar``
    argparse's metavar (a tuple for a fixed-length tuple field).
``flag``
    The option string, where it differs from ``--field-name`` (``--lr``).
``minimum``
    Values below it, and non-finite ones, are refused while parsing.

A field annotated ``str | float`` (a word or a number, like ``MapOptions.scale``:
``auto``, ``off`` or ``1.1``) takes one value, read as a number where it reads as one,
else kept as text; the dataclass's own check then decides.
``cli``
    ``False`` leaves the field off the command line (it keeps its default).

A :class:`Spelling` given to :class:`DataclassOptions` says the same for a field whose
class the command line cannot annotate, and converts values whose command-line form
differs from the field's (a zone axis written ``0,0,1``, an energy in keV).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import types
import typing
from collections.abc import Callable, Collection, Iterator, Mapping
from pathlib import Path
from typing import Any

_PLAIN_TYPES = {int: int, float: float, str: None, Path: Path}


@dataclasses.dataclass(frozen=True)
class Spelling:
    """How one field is written on the command line where its name or type does not say.

    Attributes
    ----------
    flag : str, optional
        The option string (default: the field's ``flag`` metadata, else ``--field-name``).
    type : callable, optional
        argparse's ``type``; given, the option takes one value whatever the annotation.
    to_field : callable, optional
        Turns the parsed value into the field's value (keV to eV, ``"0,0,1"`` to a tuple).
    from_field : callable, optional
        Turns the field's default into the option's default (the inverse of ``to_field``).
    help : str, optional
        Help text instead of the field's ``help`` metadata.
    """

    flag: str | None = None
    type: Callable[[str], Any] | None = None
    to_field: Callable[[Any], Any] | None = None
    from_field: Callable[[Any], Any] | None = None
    help: str | None = None


@dataclasses.dataclass(frozen=True)
class _Leaf:
    """One option: the path of field names from the top dataclass to a plain field."""

    path: tuple[str, ...]
    field: dataclasses.Field
    hint: Any
    default: Any
    spelling: Spelling

    @property
    def name(self) -> str:
        return self.path[-1]

    @property
    def flag(self) -> str:
        return self.spelling.flag or self.field.metadata.get("flag") or _default_flag(self)


class DataclassOptions:
    """The command-line options of a frozen dataclass whose fields all have defaults.

    Parameters
    ----------
    cls : type
        A dataclass; fields holding dataclasses are flattened into their fields.
    spellings : mapping of str to Spelling, optional
        By field name (of the class or of a nested one).
    exclude : collection of str, optional
        Field names left off the command line (as ``cli=False`` metadata does).

    Raises
    ------
    TypeError
        For a field whose annotation has no command-line form and no :class:`Spelling`
        with a ``type`` (name it in ``exclude`` or give one).
    ValueError
        When two flattened fields share a name, or a spelling names no field.

    Examples
    --------
    >>> TRAINING = DataclassOptions(TrainConfig)                   # doctest: +SKIP
    >>> TRAINING.add(parser)                                       # doctest: +SKIP
    >>> config = TRAINING.build(parser.parse_args(["--epochs", "3"]))  # doctest: +SKIP
    """

    def __init__(
        self,
        cls: type,
        spellings: Mapping[str, Spelling] | None = None,
        exclude: Collection[str] = (),
    ):
        if not dataclasses.is_dataclass(cls):
            raise TypeError(f"{cls!r} is not a dataclass")
        self.cls = cls
        self._spellings = dict(spellings or {})
        self._exclude = set(exclude)
        self._base = cls()  # every field needs a default: the options start from it
        self.leaves: dict[str, _Leaf] = {}
        for leaf in self._walk(cls, self._base, ()):
            if leaf.name in self.leaves:
                raise ValueError(f"{cls.__name__}: two fields named {leaf.name!r} once flattened")
            _argparse_kwargs(leaf)  # a field without a command-line form fails here
            self.leaves[leaf.name] = leaf
        unknown = sorted(set(self._spellings) - set(self.leaves))
        if unknown:
            raise ValueError(f"{cls.__name__}: spellings for no option field {unknown}")
        # The parser remembers which fields it holds, so build() reads only those.
        self._key = f"_fields_{cls.__module__}.{cls.__qualname__}"

    def _walk(self, cls: type, default: Any, path: tuple[str, ...]) -> Iterator[_Leaf]:
        hints = typing.get_type_hints(cls)
        for field in dataclasses.fields(cls):
            if field.name in self._exclude or field.metadata.get("cli", True) is False:
                continue
            value = getattr(default, field.name)
            hint = hints[field.name]
            if dataclasses.is_dataclass(hint) and field.name not in self._spellings:
                yield from self._walk(hint, value, (*path, field.name))
                continue
            spelling = self._spellings.get(field.name, Spelling())
            yield _Leaf((*path, field.name), field, hint, value, spelling)

    def add(
        self,
        parser: argparse.ArgumentParser,
        only: Collection[str] | None = None,
        defaults: Mapping[str, Any] | None = None,
    ) -> None:
        """Add the options to ``parser``.

        Parameters
        ----------
        parser : ArgumentParser
        only : collection of str, optional
            Field names to add (default: every field); their order is the class's.
        defaults : mapping, optional
            Field values that differ from the class's defaults for this command (in the
            field's units, e.g. ``{"top_k": 10}``).
        """
        wanted = set(self.leaves) if only is None else set(only)
        unknown = sorted(wanted - set(self.leaves) | set(defaults or {}) - wanted)
        if unknown:
            raise ValueError(f"{self.cls.__name__}: no option field(s) {unknown} to add")
        added = []
        for name, leaf in self.leaves.items():
            if name not in wanted:
                continue
            kwargs = _argparse_kwargs(leaf)
            if defaults and name in defaults:
                kwargs["default"] = _option_default(leaf, defaults[name])
            parser.add_argument(leaf.flag, dest=name, **kwargs)
            added.append(name)
        previous = parser.get_default(self._key) or ()
        parser.set_defaults(**{self._key: (*previous, *added)})

    def build(self, args: argparse.Namespace) -> Any:
        """The dataclass from the options ``args`` holds, over the class's defaults.

        Fields the parser has no option for keep their defaults. The dataclass's own
        checks run; their ValueError is the command's one-line error.
        """
        values: dict[tuple[str, ...], Any] = {}
        for name in getattr(args, self._key, ()):
            leaf = self.leaves[name]
            value = getattr(args, name)
            if value is not None and leaf.spelling.to_field is not None:
                value = leaf.spelling.to_field(value)
            elif isinstance(value, list) and _origin(_without_none(leaf.hint)) is tuple:
                value = tuple(value)
            values[leaf.path] = value
        return _replace_paths(self._base, values)


def _replace_paths(obj: Any, values: Mapping[tuple[str, ...], Any]) -> Any:
    """``obj`` with the fields at each path replaced (nested dataclasses rebuilt)."""
    direct = {path[0]: value for path, value in values.items() if len(path) == 1}
    nested: dict[str, dict[tuple[str, ...], Any]] = {}
    for path, value in values.items():
        if len(path) > 1:
            nested.setdefault(path[0], {})[path[1:]] = value
    for name, inner in nested.items():
        direct[name] = _replace_paths(getattr(obj, name), inner)
    return dataclasses.replace(obj, **direct) if direct else obj


def _origin(hint: Any) -> Any:
    return typing.get_origin(hint)


def _without_none(hint: Any) -> Any:
    """``X`` for ``X | None`` (or ``Optional[X]``); other hints as they are."""
    if _origin(hint) in (typing.Union, types.UnionType):
        rest = [arg for arg in typing.get_args(hint) if arg is not type(None)]
        if len(rest) == 1:
            return rest[0]
    return hint


def _argparse_kwargs(leaf: _Leaf) -> dict[str, Any]:
    """``add_argument`` keywords for ``leaf`` (all but the flag and dest)."""
    metadata = leaf.field.metadata
    help_text = leaf.spelling.help or metadata.get("help") or leaf.name
    kwargs: dict[str, Any] = {"help": help_text.replace("%", "%%")}
    kwargs["default"] = _option_default(leaf, leaf.default)
    hint = _without_none(leaf.hint)
    if leaf.spelling.type is not None:
        kwargs["type"] = leaf.spelling.type
    elif hint is bool:
        kwargs["action"] = argparse.BooleanOptionalAction
    elif _word_or_number(hint):
        kwargs["type"] = _number_or_text
    elif hint in _PLAIN_TYPES:
        if _PLAIN_TYPES[hint] is not None:
            kwargs["type"] = _PLAIN_TYPES[hint]
    elif _origin(hint) is tuple:
        items = typing.get_args(hint)
        if len(items) == 2 and items[1] is Ellipsis:
            kwargs["nargs"], item = "+", items[0]
        elif items and len(set(items)) == 1:
            kwargs["nargs"], item = len(items), items[0]
        else:
            item = None
        if item not in (int, float, str):
            raise _no_form(leaf)
        if item is not str:
            kwargs["type"] = item
    else:
        raise _no_form(leaf)
    if "minimum" in metadata:
        kwargs["type"] = _at_least(kwargs.get("type", float), metadata["minimum"])
    if metadata.get("choices"):
        kwargs["choices"] = list(metadata["choices"])
    if metadata.get("metavar"):
        kwargs["metavar"] = metadata["metavar"]
    elif "action" not in kwargs and "choices" not in kwargs and leaf.flag != _default_flag(leaf):
        kwargs["metavar"] = leaf.flag.lstrip("-").replace("-", "_").upper()  # --lr LR
    return kwargs


def _word_or_number(hint: Any) -> bool:
    """Whether ``hint`` is ``str | float`` (or ``str | int``, in any order)."""
    if _origin(hint) not in (typing.Union, types.UnionType):
        return False
    args = set(typing.get_args(hint))
    return str in args and args - {str} <= {int, float} and len(args) > 1


def _number_or_text(text: str) -> float | str:
    """``"1.1"`` -> 1.1; ``"auto"`` stays text (argparse ``type`` of a word-or-number)."""
    try:
        return float(text)
    except ValueError:
        return text


_number_or_text.__name__ = "value"


def _default_flag(leaf: _Leaf) -> str:
    return "--" + leaf.name.replace("_", "-")


def _option_default(leaf: _Leaf, value: Any) -> Any:
    """A field value as the option's default (what ``--help`` shows)."""
    if leaf.spelling.from_field is not None and value is not None:
        return leaf.spelling.from_field(value)
    return value


def _no_form(leaf: _Leaf) -> TypeError:
    return TypeError(
        f"{'.'.join(leaf.path)}: no command-line form for {leaf.hint!r}; give it a "
        "Spelling with a type, or metadata cli=False"
    )


def _at_least(kind: Callable[[str], Any], minimum: float) -> Callable[[str], Any]:
    """An argparse type that refuses non-finite values and values below ``minimum``."""

    def convert(text: str) -> Any:
        value = kind(text)
        if not (math.isfinite(value) and value >= minimum):
            raise argparse.ArgumentTypeError(f"must be a finite number >= {minimum}, got {text}")
        return value

    convert.__name__ = getattr(kind, "__name__", "value")  # argparse names it in errors
    return convert
