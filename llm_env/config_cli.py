"""Command-line options generated from config dataclasses, so a CLI has exactly the fields of its config.

Each field becomes ``--field-name`` with its type, default, choices (for ``Literal``, or a registry given as
``field(metadata={"choices": registry})``) and, as help, the docstring written under the field in the class
body (the CleanRL style our configs use).
"""

from __future__ import annotations

import argparse
import ast
import collections.abc
import dataclasses
import inspect
import itertools
import textwrap
import types
import typing
from typing import Any, Literal, Union

__all__ = ["add_dataclass_arguments", "dataclass_from_args", "field_docs", "options_from_args"]


def field_docs(cls: type) -> dict[str, str]:
    """The string literal written right after each annotated field of a class body."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        except (OSError, TypeError):
            continue
        body = tree.body[0].body if tree.body and isinstance(tree.body[0], ast.ClassDef) else []
        for node, following in itertools.pairwise(body):
            if (
                isinstance(node, ast.AnnAssign)
                and isinstance(node.target, ast.Name)
                and isinstance(following, ast.Expr)
                and isinstance(following.value, ast.Constant)
                and isinstance(following.value.value, str)
            ):
                docs[node.target.id] = " ".join(following.value.value.split())
    return docs


def _optional(tp: Any) -> tuple[Any, bool]:
    """(the type an option parses to, whether ``none`` is accepted) of a field's annotation.

    ``X | None`` parses as X; a union with ``str`` and no sequence type (``torch.dtype | str``) as ``str``.
    """
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        optional = len(args) < len(typing.get_args(tp))
        if len(args) == 1:
            return args[0], optional
        sequences = (tuple, list, collections.abc.Sequence)
        if str in args and not any(typing.get_origin(a) in sequences for a in args):
            return str, optional
    return tp, False


def _converter(tp: Any, optional: bool) -> Any:
    def convert(text: str) -> Any:
        if optional and text.lower() == "none":
            return None
        return tp(text)

    convert.__name__ = getattr(tp, "__name__", "value")
    return convert


def _default(f: dataclasses.Field, base: Any) -> Any:
    if base is not None:
        return getattr(base, f.name)
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None


def add_dataclass_arguments(
    parser: argparse.ArgumentParser | Any,
    cls: type,
    *,
    prefix: str = "",
    exclude: tuple[str, ...] = (),
    include: tuple[str, ...] | None = None,
    base: Any = None,
) -> None:
    """Add one option per field of dataclass ``cls`` (nested dataclasses get ``--<field>-`` prefixes).

    ``include`` keeps only the named fields (in the class's order), ``exclude`` drops fields. A field
    without a default becomes a required option. ``base`` is an instance whose values are shown as
    defaults (nested configs use their parent's default instance, which may differ from the nested
    class's own defaults).
    """
    hints = typing.get_type_hints(cls)
    docs = field_docs(cls)
    group = (
        parser.add_argument_group(f"{cls.__name__} options")
        if hasattr(parser, "add_argument_group")
        else parser
    )
    for f in dataclasses.fields(cls):
        if f.name in exclude or f.name.startswith("_") or (include is not None and f.name not in include):
            continue
        tp, optional = _optional(hints[f.name])
        flag = "--" + (prefix + f.name).replace("_", "-")
        dest = (prefix + f.name).replace("-", "_")
        default = _default(f, base)
        if dataclasses.is_dataclass(tp):
            add_dataclass_arguments(parser, tp, prefix=f"{prefix}{f.name}_", base=default)
            continue
        help_text = docs.get(f.name, "") + (f" (default: {default})" if default is not None else "")
        help_text = help_text.replace("%", "%%")  # argparse formats help strings with %
        kwargs: dict[str, Any] = {"dest": dest, "default": argparse.SUPPRESS, "help": help_text}
        if base is None and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            kwargs["required"] = True
        origin = typing.get_origin(tp)
        if tp is bool:
            group.add_argument(flag, action=argparse.BooleanOptionalAction, **kwargs)
        elif origin is Literal:
            group.add_argument(
                flag, choices=[*typing.get_args(tp), *(["none"] if optional else [])], **kwargs
            )
        elif origin is tuple:
            inner = typing.get_args(tp)
            if len(inner) == 2 and inner[1] is Ellipsis:
                group.add_argument(flag, nargs="+", type=inner[0], **kwargs)
            else:
                group.add_argument(flag, nargs=len(inner), type=inner[0], **kwargs)
        elif origin in (list, collections.abc.Sequence) and len(typing.get_args(tp)) == 1:
            group.add_argument(flag, nargs="*", type=typing.get_args(tp)[0], **kwargs)
        elif tp in (int, float, str):
            choices = f.metadata.get("choices")  # e.g. a registry: its names when the parser is built
            if choices is not None:
                kwargs["choices"] = [*choices, *(["none"] if optional else [])]
                group.add_argument(flag, **kwargs)
            else:
                group.add_argument(flag, type=_converter(tp, optional), **kwargs)
        else:  # e.g. str | tuple[str, ...]: accept one or more strings
            group.add_argument(flag, nargs="+", **kwargs)


def options_from_args(
    cls: type, args: argparse.Namespace, *, prefix: str = "", include: tuple[str, ...] | None = None
) -> dict[str, Any]:
    """The fields of ``cls`` given on the command line (options left out are absent, so the dataclass's
    defaults apply), as keyword arguments; ``include`` restricts them as in :func:`add_dataclass_arguments`."""
    hints = typing.get_type_hints(cls)
    values: dict[str, Any] = {}
    namespace = vars(args)
    for f in dataclasses.fields(cls):
        if f.name.startswith("_") or (include is not None and f.name not in include):
            continue
        tp, _ = _optional(hints[f.name])
        dest = prefix + f.name
        if dataclasses.is_dataclass(tp):
            if any(key.startswith(f"{dest}_") for key in namespace):
                values[f.name] = dataclass_from_args(tp, args, prefix=f"{dest}_", base=_default(f, None))
            continue
        if dest in namespace:
            value = namespace[dest]
            if value == "none":
                value = None
            if isinstance(value, list):
                sequence = typing.get_origin(tp) in (tuple, list, collections.abc.Sequence)
                value = tuple(value) if sequence or len(value) > 1 else value[0]
            values[f.name] = value
    return values


def dataclass_from_args(
    cls: type, args: argparse.Namespace, *, prefix: str = "", base: Any = None, **overrides: Any
) -> Any:
    """Build ``cls`` from the options :func:`add_dataclass_arguments` added; options not given keep the
    defaults (those of ``base`` when given, as for nested configs). ``overrides`` set fields directly."""
    values = {**options_from_args(cls, args, prefix=prefix), **overrides}
    return dataclasses.replace(base, **values) if base is not None else cls(**values)
