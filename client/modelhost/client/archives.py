"""Zip archives (torch.save, torch.export.save) checked from their central directory
alone, before torch reads them: torch inflates a compressed entry whole in memory, so a
small file could declare gigabytes (a zip bomb). The server checks every checkpoint with
`entries`; the client checks what it downloads into memory. Nothing here imports torch.
"""

from __future__ import annotations

import zipfile
import zlib
from typing import IO

MAGIC = b"PK\x03\x04"
"""A local file header: what torch.load takes for a zip archive (else a legacy pickle)."""
MAX_CENTRAL_DIRECTORY = 16 << 20
"""About 250,000 entries (a tensor each, in torch.save): zipfile builds an object per entry."""
MAX_PICKLE_BYTES = 64 << 20
"""A state_dict's pickle takes about 120 bytes per tensor: this allows half a million."""
SLACK = 1 << 20
"""What entries may expand past the archive's own size (none do: they are stored)."""
BROKEN = (
    zipfile.BadZipFile,
    zlib.error,
    ValueError,
    EOFError,
    OSError,
    RuntimeError,
    NotImplementedError,
)
"""What zipfile raises for a broken archive (RuntimeError: an encrypted entry;
NotImplementedError: an unknown compression method)."""


class UnsafeArchive(ValueError):
    """A zip archive refused, or too broken to read, before anything in it is inflated."""


def entries(file: IO[bytes], size: int, what: str = "the archive") -> list[zipfile.ZipInfo]:
    """The entries of the zip archive in `file` (`size` bytes), as torch's reader (miniz)
    will see them, checked before anything is inflated:

    - its end record (the one both readers find) may declare a directory of at most
      MAX_CENTRAL_DIRECTORY bytes;
    - the directory must be where that record says: zipfile reads the one just before
      the record, miniz the one at the offset it declares, and a file with two
      directories would show each reader a different archive;
    - entries may not add up to more than the file (plus SLACK: a zip bomb), a pickle may
      take at most MAX_PICKLE_BYTES, and entries are stored, not compressed (torch.save
      and torch.export.save never compress).
    """
    try:
        return _entries(file, size, what)
    except UnsafeArchive:
        raise
    except BROKEN as error:
        raise UnsafeArchive(f"not a checkpoint: broken zip archive ({error})") from None


def _entries(file: IO[bytes], size: int, what: str) -> list[zipfile.ZipInfo]:
    end = zipfile._EndRecData(file)  # type: ignore[attr-defined]  # zipfile's own lookup
    if end is None:
        raise zipfile.BadZipFile("no end of central directory record")
    directory, offset = end[zipfile._ECD_SIZE], end[zipfile._ECD_OFFSET]  # type: ignore[attr-defined]
    if directory > MAX_CENTRAL_DIRECTORY:
        raise UnsafeArchive(
            f"refused: the directory of entries of {what} takes {directory} bytes; the limit "
            f"is {MAX_CENTRAL_DIRECTORY} bytes (about a quarter of a million tensors)"
        )
    file.seek(0)
    with zipfile.ZipFile(file) as archive:
        found_entries = archive.infolist()
        found = archive.start_dir
    if found != offset:
        raise UnsafeArchive(
            f"refused: the directory of entries of {what} is not where its end record says "
            f"(at {found}, declared at {offset}): readers would disagree on what it holds"
        )
    expanded = sum(entry.file_size for entry in found_entries)
    if expanded > size + SLACK:
        raise UnsafeArchive(
            f"refused as a zip bomb: the entries of {what} would expand to {expanded} bytes "
            f"from {size}; torch.save and torch.export.save store entries uncompressed"
        )
    for entry in found_entries:
        if entry.filename.endswith(".pkl") and entry.file_size > MAX_PICKLE_BYTES:
            raise UnsafeArchive(
                f"refused: {what} holds a pickle ({entry.filename}) of {entry.file_size} "
                f"bytes; the limit is {MAX_PICKLE_BYTES} bytes"
            )
    compressed = [e.filename for e in found_entries if e.compress_type != zipfile.ZIP_STORED]
    if compressed:
        raise UnsafeArchive(
            f"refused: {what} has compressed entries ({', '.join(compressed[:3])}); "
            "torch.save and torch.export.save store entries uncompressed"
        )
    return found_entries
