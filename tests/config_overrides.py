"""Config overrides for the launcher tests: the same (dotted key, value) list applied to a
ConfigDict in-process, or turned into absl `--config.*` flags for a subprocess."""


def with_overrides(cfg, overrides, output_dir):
    """`cfg` with each (dotted key, value) of `overrides` set, and output_dir."""
    for key, value in list(overrides) + [("output_dir", str(output_dir))]:
        node = cfg
        *path, last = key.split(".")
        for part in path:
            node = node[part]
        node[last] = value
    return cfg


def as_flags(overrides, output_dir):
    """The same overrides as `--config.key=value` flags (tuples as "(a,b)")."""
    flags = []
    for key, value in list(overrides) + [("output_dir", str(output_dir))]:
        if isinstance(value, tuple):
            value = "(" + ",".join(map(str, value)) + ")"
        flags.append(f"--config.{key}={value}")
    return flags
