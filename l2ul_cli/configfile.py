"""Option values from a TOML (or YAML) file, for ``--config``.

Keys are the long option names without ``--`` (``n-adv`` or ``n_adv``). Top-level keys apply to
every command that has the option; a table named after a command (``[forget]``) applies to it
alone and wins over the top level. Flags on the command line win over both. Relative paths
resolve against the file's folder, so a config file works from any working directory.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping

from .errors import InputError

COMMANDS = ("forget", "relabel", "eval")


def read_config_file(path: str | os.PathLike) -> dict[str, Any]:
    """Parse the file into a dict; TOML by default, YAML for ``.yaml``/``.yml`` (needs PyYAML)."""
    p = Path(path)
    if not p.is_file():
        raise InputError(f"{p}: config file not found")
    if p.suffix.lower() in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError:
            raise InputError(f"{p}: YAML needs PyYAML (pip install pyyaml); or write the file as TOML") from None
        try:
            data = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
        except (yaml.YAMLError, UnicodeDecodeError) as exc:
            raise InputError(f"{p}: invalid YAML ({str(exc).splitlines()[0]})") from exc
    else:
        try:
            import tomllib
        except ImportError:  # Python 3.10
            import tomli as tomllib

        try:
            data = tomllib.loads(p.read_text(encoding="utf-8"))
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise InputError(f"{p}: invalid TOML ({str(exc).splitlines()[0]})") from exc
    if not isinstance(data, dict):
        raise InputError(f"{p}: expected a table of option = value")
    return data


def options_for(data: Mapping[str, Any], command: str, known: Mapping[str, str], path_params: set[str],
                source: str | os.PathLike, elsewhere: set[str] = frozenset()) -> dict[str, Any]:
    """The values for one command, keyed by parameter name.

    ``known`` maps every accepted key (``n-adv``, ``n_adv``) to its parameter name (``n_adv``);
    ``path_params`` names the parameters whose values are paths; ``elsewhere`` holds the keys
    of the other commands: a top-level key found only there is skipped (one file may serve
    ``forget`` and ``eval``), any other unknown key is an error.
    """
    src = Path(source)
    values: dict[str, Any] = {}

    def take(items: Mapping[str, Any], top: bool, where: str) -> None:
        for key, value in items.items():
            if top and key in COMMANDS and isinstance(value, dict):
                continue  # a command's table ("eval" and "forget" are also option names)
            name = known.get(key)
            if name is None:
                if not (top and key in elsewhere):
                    raise InputError(f"{src}: unknown option '{key}' in {where} (options of l2ul {command}: "
                                     f"{', '.join(sorted(k for k in known if '_' not in k))})")
                continue
            if name in path_params and value is not None:
                value = [_resolve(src, v) for v in value] if isinstance(value, list) else _resolve(src, value)
            values[name] = value

    take(data, True, "the top level")
    section = data.get(command, {})
    take(section if isinstance(section, dict) else {}, False, f"[{command}]")
    return values


def _resolve(src: Path, value: Any) -> Any:
    if not isinstance(value, str):
        return value
    p = Path(value).expanduser()
    return str(p if p.is_absolute() else src.parent / p)
