"""`value_type`: the core's immutable values, built fast.

`@value_type(...)` is `@dataclass(frozen=True, slots=True, ...)` with one change: its
`__init__` sets each field through the field's slot descriptor rather than through
`object.__setattr__`, which is what a frozen dataclass's generated `__init__` calls, once per
field, to get past its own `__setattr__`. The value is as immutable as before (assigning or
deleting a field raises FrozenInstanceError), equal, hashed, printed and replaced
(`dataclasses.replace`) as before, and its `__post_init__` (the command's validation) still
runs. Building one costs about a quarter of what it did: the hot path builds about a dozen
per operation (commands, results, counter views, audit events, records).

A class with no field, or with a field that takes a default_factory or is left out of
`__init__`, keeps the generated `__init__` (its body does something else than set fields).

A class with a `__post_init__` (a command's checks) also gets `unchecked(...)`: the same
value, built without running them, for fields that passed them once already (a command read
back from the checksummed log that a checked one was written to). Its `__post_init__` must
only check, never change a field.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, TypeVar

T = TypeVar("T")


def value_type(cls: type[T] | None = None, /, **options: Any) -> Any:
    """@dataclass(frozen=True, slots=True, **options) with a fast __init__."""
    def wrap(target: type[T]) -> type[T]:
        made = dataclasses.dataclass(target, frozen=True, slots=True, **options)
        _set_fields_through_slots(made)
        return made
    return wrap if cls is None else wrap(cls)


def _set_fields_through_slots(cls: type) -> None:
    fields = dataclasses.fields(cls)
    if not fields or any(not f.init or f.default_factory is not dataclasses.MISSING
                         for f in fields):
        return
    generated = cls.__init__  # type: ignore[misc]
    code = generated.__code__
    positional = code.co_varnames[1:code.co_argcount]
    keyword = code.co_varnames[code.co_argcount:code.co_argcount + code.co_kwonlyargcount]
    assert sorted(positional + keyword) == sorted(f.name for f in fields), cls
    namespace: dict[str, Callable[..., None]] = {
        f"_set_{name}": cls.__dict__[name].__set__ for name in positional + keyword}
    parameters = ", ".join(["self", *positional] + (["*", *keyword] if keyword else []))
    body = [f"    _set_{name}(self, {name})" for name in positional + keyword]
    checked = hasattr(cls, "__post_init__")
    if checked:
        body.append("    self.__post_init__()")
    exec(f"def __init__({parameters}):\n" + "\n".join(body), namespace)
    fast = namespace["__init__"]
    if checked:
        namespace["_new"] = object.__new__
        exec(f"def unchecked({parameters.replace('self', 'cls', 1)}):\n"
             "    self = _new(cls)\n" + "\n".join(body[:-1]) + "\n    return self", namespace)
        unchecked = namespace["unchecked"]
        unchecked.__defaults__ = generated.__defaults__
        unchecked.__kwdefaults__ = generated.__kwdefaults__
        unchecked.__qualname__ = f"{cls.__qualname__}.unchecked"
        unchecked.__doc__ = "The value, built without its __post_init__ checks (see values)."
        cls.unchecked = classmethod(unchecked)  # type: ignore[attr-defined]
    fast.__defaults__ = generated.__defaults__
    fast.__kwdefaults__ = generated.__kwdefaults__
    fast.__qualname__ = f"{cls.__qualname__}.__init__"
    fast.__doc__ = generated.__doc__
    fast.__annotations__ = generated.__annotations__
    cls.__init__ = fast  # type: ignore[misc]
