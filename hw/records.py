"""``@record``: a frozen dataclass without the cost of making one at import.

``@dataclass`` writes the source of ``__init__``, ``__repr__``, ``__eq__``, ``__hash__``,
``__setattr__`` and ``__delattr__`` for each class and compiles it: ~1.5 ms of CPU per class
(x86; several times that on a Pi Zero), and ~20 of them are made before a code reaches the
panel (docs/PERFORMANCE.md "Sign-in"). A record shares one set of generic methods instead.
It is a dataclass to everything that asks: ``dataclasses.fields``, ``replace``, ``asdict`` and
``is_dataclass`` work on it, its fields take ``dataclasses.field(default=...,
default_factory=...)``, and it may extend a dataclass or another record (a ``@dataclass`` may
not extend a record). What it does not do: ``__post_init__``, ``InitVar``, ``ClassVar``,
``kw_only``, ordering, slots; a class needing them stays a ``@dataclass``.

Here, at the bottom of the import order, so that hw's option tables and the agent's
settings, state and sign-in records share it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import MISSING, Field, FrozenInstanceError
from typing import Any, TypeVar, dataclass_transform

_T = TypeVar("_T", bound=type)
# The marker dataclasses.fields() keeps a Field by (its ClassVar and InitVar fields have others).
_FIELD: Any = dataclasses._FIELD  # type: ignore[attr-defined]  # noqa: SLF001


@dataclass_transform(frozen_default=True, field_specifiers=(dataclasses.field, Field))
def record(cls: _T) -> _T:
    """Make ``cls`` a frozen dataclass: init from its annotated fields (in order, a base's first),
    repr, eq and hash by field values, and no assignment after ``__init__``."""
    fields: dict[str, Field[Any]] = {}
    for base in reversed(cls.__mro__[1:]):
        fields.update(getattr(base, "__dataclass_fields__", {}))
    for name, type_ in cls.__dict__.get("__annotations__", {}).items():
        value = cls.__dict__.get(name, MISSING)
        f: Field[Any] = value if isinstance(value, Field) else dataclasses.field(default=value)
        if f.default is not MISSING and f.default.__class__.__hash__ is None:
            raise ValueError(f"mutable default {type(f.default)} for field {name} is not allowed: "
                             "use default_factory")
        f.name, f.type = name, type_
        f._field_type = _FIELD  # type: ignore[attr-defined]
        fields[name] = f
        if isinstance(value, Field):
            if f.default is MISSING:
                delattr(cls, name)
            else:
                setattr(cls, name, f.default)
    names = tuple(fields)
    order = tuple(fields.values())
    required = sum(1 for f in order if f.default is MISSING and f.default_factory is MISSING)
    if any(f.default is MISSING and f.default_factory is MISSING for f in order[required:]):
        raise TypeError(f"{cls.__name__}: a field without a default follows one with a default")
    methods: dict[str, Any] = {
        "__dataclass_fields__": fields, "__match_args__": names, "__record_names__": names,
        "__init__": _make_init(cls.__name__, order), "__repr__": _repr, "__eq__": _eq,
        "__hash__": _hash, "__setattr__": _setattr, "__delattr__": _delattr,
    }
    for attr, value in methods.items():
        setattr(cls, attr, value)
    return cls


def _make_init(cls_name: str, order: tuple[Field[Any], ...]) -> Callable[..., None]:
    names = [f.name for f in order]
    known = frozenset(names)

    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        if len(args) > len(order):
            raise TypeError(f"{cls_name}.__init__() takes {len(order) + 1} positional arguments "
                            f"but {len(args) + 1} were given")
        for i, value in enumerate(args):
            if names[i] in kwargs:
                raise TypeError(f"{cls_name}.__init__() got multiple values for argument {names[i]!r}")
            object.__setattr__(self, names[i], value)
        if kwargs.keys() - known:
            extra = sorted(kwargs.keys() - known)[0]
            raise TypeError(f"{cls_name}.__init__() got an unexpected keyword argument {extra!r}")
        for f in order[len(args):]:
            if f.name in kwargs:
                value = kwargs[f.name]
            elif f.default is not MISSING:
                value = f.default
            elif f.default_factory is not MISSING:
                value = f.default_factory()
            else:
                raise TypeError(f"{cls_name}.__init__() missing required argument: {f.name!r}")
            object.__setattr__(self, f.name, value)

    __init__.__qualname__ = f"{cls_name}.__init__"
    return __init__


def _values(obj: Any) -> tuple[Any, ...]:
    return tuple(getattr(obj, name) for name in obj.__record_names__)


def _repr(self: Any) -> str:
    inner = ", ".join(f"{name}={getattr(self, name)!r}" for name in self.__record_names__)
    return f"{type(self).__qualname__}({inner})"


def _eq(self: Any, other: object) -> object:
    if other.__class__ is self.__class__:
        return bool(_values(self) == _values(other))
    return NotImplemented


def _hash(self: Any) -> int:
    return hash(_values(self))


def _setattr(self: Any, name: str, value: Any) -> None:
    raise FrozenInstanceError(f"cannot assign to field {name!r}")


def _delattr(self: Any, name: str) -> None:
    raise FrozenInstanceError(f"cannot delete field {name!r}")
