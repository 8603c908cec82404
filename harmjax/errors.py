"""Exceptions raised by harmjax.

Every error names the offending input (a path, a key, an architecture) and says what would
fix it. They subclass the matching builtin (FileNotFoundError, ValueError) so callers can
catch them either way.
"""


class HarmjaxError(Exception):
    """Base class of every error harmjax raises on bad input."""


class MissingFileError(HarmjaxError, FileNotFoundError):
    """A file or directory the caller named, or one a checkpoint needs, does not exist."""


class CheckpointError(HarmjaxError, ValueError):
    """A checkpoint exists but cannot be read as a model: truncated, malformed or inconsistent."""


class UnsupportedArchitectureError(HarmjaxError, ValueError):
    """The checkpoint's architecture is not one of the decoder's families."""


class UnsupportedDtypeError(HarmjaxError, ValueError):
    """A parameter dtype harmjax does not compute in."""


class HubUnavailableError(HarmjaxError, ConnectionError):
    """A Hugging Face hub id was given but the hub cannot be reached and nothing is cached."""


class AssetError(HarmjaxError, RuntimeError):
    """An embedded asset (default model, prompt set) cannot be fetched or fails its checksum."""


class DiskSpaceError(HarmjaxError, OSError):
    """A write of known size would not fit on the disk it is going to; raised before it starts."""


class DeviceMemoryError(HarmjaxError, MemoryError):
    """A jitted job would not fit in accelerator memory; raised before its first batch."""


class ScoreKindError(HarmjaxError, ValueError):
    """An attribution score kind that harmjax does not know (the message lists the known ones)."""
