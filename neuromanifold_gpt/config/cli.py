"""nanoGPT-style overrides: `--config FILE` (a Python file of `key = value` lines) and
`--key value` / `--key=value` on the command line, each checked against TrainConfig's types.
Keys are flat: a field of one of TrainConfig's sections is set by its own name
(`--checkpoint_policy mlp`, `lean_loss = True`).

Config files are read with `ast`, never executed: a value must be a literal. They are UTF-8
(a leading byte-order mark is accepted, as Python accepts it) and at most CONFIG_MAX_BYTES."""

from __future__ import annotations

import ast
import os
import stat
import types
import typing

from ..errors import BadInput
from ..files import kind
from .base import TrainConfig, flags

CONFIG_MAX_BYTES = 2**20  # `key = value` lines; a bound on what parsing one may cost

_TRUE = {"true", "1", "yes", "y", "on"}
_FALSE = {"false", "0", "no", "n", "off"}


def _flags() -> dict:
    """Every flat key -> its type hint (a Literal of names is a string checked by its section)."""
    return {name: str if typing.get_origin(hint) is typing.Literal else hint
            for name, hint in flags().items()}


def _field_types() -> dict[str, tuple[type, bool, bool]]:
    """flat key -> (base type, accepts None, accepts auto: a number field that also takes a str).
    A bool that accepts None is a switch left to the machine, and reads auto too (coerce)."""
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
    switch = nullable and typ is bool  # left to the machine as None, which the user knows as auto
    unset = {"none", "auto"} if switch else {"none"}
    if nullable and (value is None or (isinstance(value, str) and value.lower() in unset)):
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
                str: "a string"}[typ] + (" or auto" if auto or switch else "")
    raise BadInput(f"{key}={value!r} {where} is not valid: expected {expected}")


def _config_text(path: str) -> str:
    """A config file's text: a regular file of at most CONFIG_MAX_BYTES of UTF-8."""
    try:
        info = os.stat(path)
        if not stat.S_ISREG(info.st_mode):
            raise BadInput(f"config file {path} is a {kind(info.st_mode)}, not a regular file; "
                             f"pass a file such as config/train_shakespeare_char.py")
        if info.st_size > CONFIG_MAX_BYTES:
            raise BadInput(f"config file {path} is {info.st_size:,} bytes, more than the "
                             f"{CONFIG_MAX_BYTES:,} a file of `key = value` lines may be; pass a "
                             f"config file such as config/train_shakespeare_char.py")
        with open(path, encoding="utf-8-sig") as f:  # -sig: a leading byte-order mark, as Python
            return f.read()
    except (FileNotFoundError, NotADirectoryError):
        raise BadInput(f"config file {path!r} not found; pass an existing file such as "
                         f"config/train_shakespeare_char.py") from None
    except UnicodeDecodeError as e:
        raise BadInput(f"config file {path} is not UTF-8 text (byte {e.start}: "
                         f"{e.object[e.start]:#04x}); save it as UTF-8") from None
    except OSError as e:
        raise BadInput(f"config file {path} cannot be read ({e.strerror}); check its "
                         f"permissions") from None


def read_config_file(path: str) -> dict:
    """`key = literal` assignments of a config file, type-checked."""
    where = f"in {path}"
    text = _config_text(path)
    try:
        tree = ast.parse(text, filename=path)
    except (SyntaxError, ValueError) as e:  # ValueError: a null byte, on older Pythons
        line = f" line {e.lineno}" if getattr(e, "lineno", None) else ""
        raise BadInput(f"config file {path}{line}: {getattr(e, 'msg', e)}; fix its Python "
                         f"syntax") from None
    except (RecursionError, MemoryError):  # an expression nested past the parser's stack
        raise BadInput(f"config file {path}: an expression is nested too deeply to parse; a "
                         f"value must be a literal (number, string, True/False, None)") from None
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
