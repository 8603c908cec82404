"""Common command-line slips answered with one `error:` line and exit status 2, before any
model is loaded: an unknown config file, an unknown setting (with the closest known one),
a value of the wrong type, and an output directory that cannot be created or written.

ml_collections parses `--config` and its `--config.x=...` overrides while absl parses the
command line, before `main` runs, and answers these slips with tracebacks; `guard_config_flag`
wraps the parse of the config flag and of every override flag so that the slip is reported
as one line naming the fix instead.
"""

from __future__ import annotations

import difflib
import os
import sys
import tempfile
from collections.abc import Iterator
from typing import Any

EXIT_STATUS = 2  # a usage error, as argparse and absl use


def fail(message: str) -> None:
    """Prints `error: <message>` as one line on stderr and exits with EXIT_STATUS."""
    print("error: " + " ".join(str(message).split()), file=sys.stderr)
    sys.exit(EXIT_STATUS)


def setting_paths(config: Any, prefix: str = "") -> Iterator[str]:
    """Dotted paths of every setting of a ConfigDict (or dict), nested ones included;
    a nested ConfigDict's own path is listed too, since it can be overridden whole."""
    for key, value in config.items():
        path = f"{prefix}{key}"
        yield path
        if hasattr(value, "items"):
            yield from setting_paths(value, path + ".")


def _overrides(argv: list[str], name: str) -> list[tuple[str, str | None]]:
    """(setting path, raw value or None) of each `--<name>.path[=value]` in argv."""
    out = []
    for arg in argv:
        stripped = arg.lstrip("-")
        if arg.startswith("-") and stripped.startswith(name + "."):
            path, _, value = stripped[len(name) + 1:].partition("=")
            out.append((path, value if "=" in stripped else None))
    return out


def unknown_setting_message(config: Any, argv: list[str], name: str = "config") -> str | None:
    """"unknown setting X; did you mean Y?" for the first `--config.X` override of argv
    that names no setting of `config` (None when all are known)."""
    known = list(setting_paths(config))
    for path, _ in _overrides(argv, name):
        if path in known:
            continue
        parent, _, leaf = path.rpartition(".")
        if parent and parent not in known:
            # A slip in the parent (prompt.per_category): the closest full path.
            close = difflib.get_close_matches(path, [k for k in known if not path.startswith(k + ".")], n=1, cutoff=0.6)
            if close:
                return f"unknown setting {path}; did you mean {close[0]}?"
        while parent and parent not in known:  # --config.foo.bar: list the top settings
            parent = parent.rpartition(".")[0]
        siblings = [k.rpartition(".")[2] for k in known if k.rpartition(".")[0] == parent]
        close = difflib.get_close_matches(leaf, siblings, n=1, cutoff=0.6)
        if close and parent == path.rpartition(".")[0]:
            return f"unknown setting {path}; did you mean {parent + '.' if parent else ''}{close[0]}?"
        return f"unknown setting {path}; the settings {'of ' + parent if parent else 'at the top'} are: {', '.join(siblings)}"
    return None


def load_config_file(argument: str) -> Any:
    """The settings of config file `argument` ("file.py" or "file.py:arg"): its
    `get_config()` (or `get_config(arg)`), loaded afresh."""
    import importlib.util

    path, sep, arg = str(argument).partition(":")
    spec = importlib.util.spec_from_file_location("harmjax_slip_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg) if sep else module.get_config()


def _config_file(argument: str) -> str:
    # "file.py:arg" passes `arg` to get_config; the file is what comes before the colon.
    return str(argument).split(":", 1)[0]


def _first_line(error: BaseException) -> str:
    lines = [ln.strip() for ln in str(error).splitlines() if ln.strip()]
    return lines[-1] if lines else type(error).__name__


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _guard_override(flag) -> None:
    """Wraps one override flag's public `parse` so that a wrong value is one line."""
    if getattr(flag, "_harmjax_guarded", False):
        return
    parse = flag.parse
    default = flag.default

    def guarded(argument):
        try:
            parse(argument)
        except Exception as e:  # noqa: BLE001 - any parse failure is the user's value
            kind = type(default).__name__
            expected = f"{'an' if kind[0] in 'aeiou' else 'a'} {kind}" if default is not None else "a Python literal"
            fail(f"--{flag.name}={argument}: not {expected} ({_first_line(e)})")
        value = flag.value
        # ml_collections turns "--config.q_sweep=abc" into a tuple of strings; a numeric
        # tuple setting would then fail minutes later, after the model's answers.
        if isinstance(default, (list, tuple)) and default and all(_is_number(d) for d in default):
            if not all(_is_number(v) for v in value):
                fail(f"--{flag.name}={argument}: expected numbers, e.g. --{flag.name}='{tuple(default)}'")

    flag.parse = guarded
    flag._harmjax_guarded = True


def guard_overrides(flag_values, name: str = "config") -> None:
    """Guards every `--<name>.x` override flag defined so far in `flag_values`."""
    for flag_name in list(flag_values):
        if flag_name.startswith(name + "."):
            _guard_override(flag_values[flag_name])


def guard_config_flag(flag_values, name: str = "config", argv: list[str] | None = None) -> None:
    """Wraps the parse of the config-file flag `name` of `flag_values` (and, once it has
    defined them, of its override flags) so that a missing config file, an unknown setting
    or a wrong value ends the process with one `error:` line instead of a traceback."""
    flag = flag_values[name]
    guard_overrides(flag_values, name)
    if getattr(flag, "_harmjax_guarded", False):
        return
    parse = flag.parse

    def guarded(argument):
        check_config_file(argument)
        try:
            parse(argument)
        except Exception as e:  # noqa: BLE001 - reported as one line below
            fail(explain_parse_error(argument, e, argv if argv is not None else sys.argv, name))
        guard_overrides(flag_values, name)

    flag.parse = guarded
    flag._harmjax_guarded = True


def check_config_file(argument: str) -> None:
    """Fails with one line when the config file of `--config=argument` does not exist."""
    path = _config_file(argument)
    if not os.path.isfile(path):
        where = os.path.abspath(path)
        fail(f"config file {path} not found ({where}); give a path to a file in configs/, "
             "relative to the directory you run from")


def explain_parse_error(argument: str, error: BaseException, argv: list[str], name: str = "config") -> str:
    """One line for an exception raised while the config file and its overrides were
    parsed: the unknown setting with a suggestion when there is one, else the error's
    last line."""
    try:
        config = load_config_file(argument)
        message = unknown_setting_message(config, argv, name)
    except Exception:  # noqa: BLE001 - the file itself fails: report that error below
        message = None
    return message or f"cannot load --{name}={argument}: {type(error).__name__}: {_first_line(error)}"


def check_output_dirs(config: Any) -> None:
    """Fails with one line when a non-empty `output_dir` setting (at any depth) names a
    directory that cannot be created or written; creates it otherwise (the job would)."""
    for path in setting_paths(config):
        if path.rpartition(".")[2] != "output_dir":
            continue
        value = config
        for part in path.split("."):
            value = value[part]
        if not isinstance(value, str) or not value:
            continue
        try:
            os.makedirs(value, exist_ok=True)
            with tempfile.NamedTemporaryFile(dir=value, prefix=".harmjax-write-check-"):
                pass
        except OSError as e:
            fail(f"--config.{path}={value}: cannot create or write this directory "
                 f"({e.strerror or type(e).__name__}); choose another output_dir")
