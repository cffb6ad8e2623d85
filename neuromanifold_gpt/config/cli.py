"""nanoGPT-style overrides: `--config FILE` (a Python file of `key = value` lines) and
`--key value` / `--key=value` on the command line, each checked against TrainConfig's types.
Keys are flat: a field of one of TrainConfig's sections is set by its own name
(`--checkpoint_policy mlp`, `lean_loss = True`).

Config files are read with `ast`, never executed: a value must be a literal."""

from __future__ import annotations

import ast
import types
import typing
from pathlib import Path

from ..errors import BadInput
from .base import TrainConfig, flags

_TRUE = {"true", "1", "yes", "y", "on"}
_FALSE = {"false", "0", "no", "n", "off"}


def _flags() -> dict:
    """Every flat key -> its type hint (a Literal of names is a string checked by its section)."""
    return {name: str if typing.get_origin(hint) is typing.Literal else hint
            for name, hint in flags().items()}


def _field_types() -> dict[str, tuple[type, bool, bool]]:
    """flat key -> (base type, accepts None, accepts auto: a number field that also takes a str)."""
    out = {}
    for name, hint in _flags().items():
        args = typing.get_args(hint)
        if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
            base = next(a for a in args if a is not type(None))
            out[name] = (base, type(None) in args, base is not str and str in args)
        else:
            out[name] = (hint, False, False)
    return out


def _unknown(key: str, where: str) -> BadInput:
    import difflib

    close = difflib.get_close_matches(key, list(_flags()), n=1)
    hint = f"; did you mean {close[0]}?" if close else "; see TrainConfig in neuromanifold_gpt/config/base.py"
    return BadInput(f"unknown config key {key!r} {where}{hint}")


def coerce(key: str, value, where: str):
    """Convert a string (command line) or literal (config file) to the field's type."""
    types_ = _field_types()
    if key not in types_:
        raise _unknown(key, where)
    typ, nullable, auto = types_[key]
    if nullable and (value is None or (isinstance(value, str) and value.lower() == "none")):
        return None
    if auto and isinstance(value, str) and value.lower() == "auto":
        return "auto"
    if typ is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in _TRUE | _FALSE:
            return value.lower() in _TRUE
    elif typ is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
    elif typ is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
    elif typ is str and isinstance(value, str):
        return value
    expected = {bool: "true/false (also 1/0, yes/no)", int: "an integer", float: "a number",
                str: "a string"}[typ] + (" or auto" if auto else "")
    raise BadInput(f"{key}={value!r} {where} is not valid: expected {expected}")


def read_config_file(path: str) -> dict:
    """`key = literal` assignments of a config file, type-checked."""
    p = Path(path)
    if not p.is_file():
        raise BadInput(f"config file {path!r} not found; pass an existing file such as "
                         f"config/train_shakespeare_char.py")
    where = f"in {path}"
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise BadInput(f"config file {path} is not UTF-8 text (byte {e.start}: "
                         f"{e.object[e.start]:#04x}); save it as UTF-8") from None
    except OSError as e:
        raise BadInput(f"config file {path} cannot be read ({e.strerror}); check its "
                         f"permissions") from None
    try:
        tree = ast.parse(text, filename=path)
    except (SyntaxError, ValueError) as e:  # ValueError: a null byte, on older Pythons
        line = f" line {e.lineno}" if getattr(e, "lineno", None) else ""
        raise BadInput(f"config file {path}{line}: {getattr(e, 'msg', e)}; fix its Python "
                         f"syntax") from None
    out = {}
    for node in tree.body:
        if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant):
            continue  # docstring
        if not (isinstance(node, ast.Assign) and len(node.targets) == 1
                and isinstance(node.targets[0], ast.Name)):
            raise BadInput(f"config file {path} line {node.lineno}: only `key = value` lines "
                             f"are allowed")
        key = node.targets[0].id
        try:
            value = ast.literal_eval(node.value)
        except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
            raise BadInput(f"config file {path} line {node.lineno}: the value of {key} must be "
                             f"a literal (number, string, True/False, None)") from None
        out[key] = coerce(key, value, where)
    return out


def parse_args(argv: list[str]) -> TrainConfig:
    """TrainConfig from `--config FILE` and `--key value` overrides (later ones win)."""
    overrides: dict = {}
    i = 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--"):
            raise BadInput(f"unexpected argument {arg!r}; use --key value or --key=value")
        key, eq, value = arg[2:].partition("=")
        if not eq:
            if i + 1 >= len(argv):
                raise BadInput(f"--{key} needs a value, e.g. --{key}=VALUE")
            value = argv[i + 1]
            i += 1
        i += 1
        if key == "config":
            overrides.update(read_config_file(value))
        else:
            overrides[key] = coerce(key, value, "on the command line")
    return TrainConfig.from_flags(**overrides)
