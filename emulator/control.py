"""The control API: ``POST /_emulator/{operation}``, JSON arguments in, JSON result out, loopback only.

The operations are the :class:`~emulator.state.EmulatorState` methods marked ``@operation``
(``state.OPERATIONS``); this module writes none of them. From each method's signature it derives
an :class:`Operation`: which arguments exist, which are required and what JSON each must be. A
request body is a JSON object of keyword arguments, checked against that before the method runs;
the method's return value is the response body. ``client.Emulator`` derives its methods from the
same signatures, so both sides of an operation come from the one method in ``state``.

Bad calls (unknown operation or argument, missing argument, wrong JSON type, and whatever the method
itself refuses: unknown tenant or app, malformed GUID, unknown fault kind) answer 400/404
``{"error": "..."}``, so a test fails at the line that configured the emulator wrongly, not later at
an opaque token error.
"""

from __future__ import annotations

import collections.abc
import inspect
import ipaddress
import json
import types
import typing
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, Final

from aiohttp import web

from .context import STATE
from .state import OPERATIONS, EmulatorState, StateError

PREFIX: Final = "/_emulator"

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

_SCALARS: Final[dict[Any, str]] = {str: "a string", bool: "a boolean", int: "an integer", float: "a number"}
_ACCEPTS: Final[dict[Any, type | tuple[type, ...]]] = {str: str, bool: bool, int: int, float: (int, float)}
_ARRAYS: Final = (list, collections.abc.Iterable, collections.abc.Sequence)


def describe(annotation: Any) -> str:
    """What JSON an annotation accepts, in words; TypeError for annotations JSON cannot carry."""
    if annotation is Any:
        return "any JSON value"
    if annotation in _SCALARS:
        return _SCALARS[annotation]
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        return " or ".join("null" if arg is type(None) else describe(arg) for arg in args)
    if origin in _ARRAYS and len(args) == 1:
        return f"a list of ({describe(args[0])})"
    if origin is dict and len(args) == 2 and args[0] is str:
        return f"an object of ({describe(args[1])})"
    raise TypeError(f"a control operation cannot take {annotation!r} from JSON")


def conform(value: Any, annotation: Any, where: str) -> Any:
    """``value`` (decoded JSON) as a parameter annotated ``annotation`` takes it, else StateError."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if annotation is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        for arg in args:
            if arg is type(None) and value is None:
                return None
            if arg is not type(None):
                try:
                    return conform(value, arg, where)
                except StateError:
                    continue
    elif origin in _ARRAYS:
        if isinstance(value, list):
            return [conform(item, args[0], f"{where}[{i}]") for i, item in enumerate(value)]
    elif origin is dict:
        if isinstance(value, dict):
            return {key: conform(item, args[1], f"{where}[{key!r}]") for key, item in value.items()}
    # JSON true/false decode to bool, which Python counts as an int: only a bool takes them.
    elif (
        annotation in _ACCEPTS
        and isinstance(value, _ACCEPTS[annotation])
        and (annotation is bool or not isinstance(value, bool))
    ):
        return value
    raise StateError(f"{where} must be {describe(annotation)}")


@dataclass(frozen=True)
class Parameter:
    """One argument of an operation: its name, annotation, and whether a call must give it."""

    name: str
    annotation: Any
    required: bool


@dataclass(frozen=True)
class Operation:
    """A control operation: an :class:`EmulatorState` method and the arguments it takes."""

    name: str
    method: Callable[..., Any]
    parameters: Mapping[str, Parameter]

    @classmethod
    def from_method(cls, method: Callable[..., Any]) -> Operation:
        """Derive the argument specs from the method's signature (after ``self``)."""
        hints = typing.get_type_hints(method)
        parameters: dict[str, Parameter] = {}
        for param in list(inspect.signature(method).parameters.values())[1:]:
            if param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD, param.POSITIONAL_ONLY):
                raise TypeError(f"{method.__qualname__}: control operations take named arguments only")
            describe(hints[param.name])  # fail at start-up, not at the first call
            parameters[param.name] = Parameter(param.name, hints[param.name], param.default is param.empty)
        return cls(method.__name__, method, parameters)

    def __call__(self, state: EmulatorState, arguments: Mapping[str, Any]) -> Any:
        """Check ``arguments`` (decoded JSON) against the signature, then run the method."""
        unknown = sorted(set(arguments) - set(self.parameters))
        if unknown:
            raise StateError(f"{self.name} takes no argument(s) {unknown}; it takes {list(self.parameters)}")
        missing = [p.name for p in self.parameters.values() if p.required and p.name not in arguments]
        if missing:
            raise StateError(f"{self.name} needs argument(s) {missing}")
        kwargs = {
            name: conform(value, self.parameters[name].annotation, repr(name))
            for name, value in arguments.items()
        }
        return self.method(state, **kwargs)


#: Every control operation by name, derived once from ``state.OPERATIONS``.
TABLE: Final[Mapping[str, Operation]] = {name: Operation.from_method(m) for name, m in OPERATIONS.items()}


@web.middleware
async def loopback_only_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Refuse control-API calls from anything but loopback; turn StateError into a 400."""
    if not request.path.startswith(PREFIX + "/"):
        return await handler(request)
    try:
        remote_is_loopback = ipaddress.ip_address(request.remote or "").is_loopback
    except ValueError:
        remote_is_loopback = False
    if not remote_is_loopback:
        return web.json_response({"error": "control API is loopback-only"}, status=403)
    try:
        return await handler(request)
    except StateError as exc:
        return web.json_response({"error": str(exc)}, status=400)


async def _arguments(request: web.Request) -> dict[str, Any]:
    if not request.can_read_body:
        return {}
    try:
        data = await request.json()
    except json.JSONDecodeError as exc:
        raise StateError(f"body is not JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise StateError("body must be a JSON object of arguments")
    return data


async def dispatch(request: web.Request) -> web.Response:
    """``POST /_emulator/{operation}``: run one operation on the emulator's state."""
    name = request.match_info["operation"]
    operation = TABLE.get(name)
    if operation is None:
        return web.json_response({"error": f"no control operation {name!r}"}, status=404)
    result = operation(request.app[STATE], await _arguments(request))
    return web.json_response(result)


def add_routes(router: web.UrlDispatcher) -> None:
    """Register the control API."""
    router.add_post(PREFIX + "/{operation}", dispatch)
