"""One reader for users' documents: text files, folders of them, and JSONL, with a policy for bad inputs.

    docs, skipped = read_documents(["contracts/", "chats.jsonl"], flag="--docs", strict=False)
    docs[0].name, docs[0].text      # "a.txt" (relative to the folder given), the file's text
    skipped[0].name, skipped[0].reason

What counts as a document:

* a file named directly: one document, whatever its suffix (``.jsonl`` files: one per non-blank line);
* a folder: every ``.txt``, ``.md``, ``.text`` and ``.jsonl`` file below it, recursively, in sorted path order;
  hidden files and folders are ignored, other files are listed as skipped ("unsupported file type");
* a JSONL line: a JSON object with a string ``text`` (or ``context``, as in LongBench-style sets) field.

Text must be UTF-8 (a BOM is dropped); a NUL byte in the first 64 KiB means a binary file. Empty documents
are listed as skipped in both policies.

Policies: ``strict=True`` (training data, fidelity texts: a silent skip would change what was measured) raises
``error_cls`` naming the file and line at the first bad input; ``strict=False`` (a folder of a user's documents
to benchmark: one broken file should not lose the rest) lists it in ``skipped`` with the reason. A path that
does not exist raises in both; a folder without any text file raises in the strict policy.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

from .errors import ParcaError

__all__ = ["SUFFIXES", "TEXT_FIELDS", "Document", "DocumentError", "Skipped", "read_documents", "text_files"]

SUFFIXES = (".txt", ".md", ".text", ".jsonl")
TEXT_FIELDS = ("text", "context")
_SNIFF_BYTES = 65536


class DocumentError(ParcaError):
    """A document path is missing, or (strict policy) a file or JSONL line cannot be read as text."""


@dataclass(frozen=True)
class Document:
    name: str  # path as given, relative to a folder given, "file.jsonl:LINE" for a JSONL line
    text: str
    path: str = ""  # the file it came from (as given or below the folder given), without a line number


@dataclass(frozen=True)
class Skipped:
    name: str
    reason: str

    def as_dict(self) -> dict[str, str]:
        return asdict(self)


def decode_text(data: bytes) -> tuple[str | None, str | None]:
    """``(text, None)`` for UTF-8 text, ``(None, why not)`` for binary or other encodings."""
    if b"\x00" in data[:_SNIFF_BYTES]:
        return None, "binary file (NUL bytes), not text"
    try:
        return data.decode("utf-8-sig"), None
    except UnicodeDecodeError as e:
        return None, f"not UTF-8 text (invalid byte at offset {e.start}); convert it to UTF-8 or leave it out"


def _files(raw: str | Path, flag: str, error_cls: type[Exception]) -> list[tuple[Path, str]]:
    """``(path, display name)`` of the files a path stands for; folders recursively, hidden entries ignored."""
    p = Path(raw)
    if p.is_file():
        return [(p, str(p))]
    if not p.is_dir():
        raise error_cls(f"{flag} {p}: no such file or directory")
    out = []
    for f in sorted(p.rglob("*")):
        rel = f.relative_to(p)
        if f.is_file() and not any(part.startswith(".") for part in rel.parts):
            out.append((f, str(rel)))
    return out


def text_files(raw: str | Path, *, flag: str = "--data", error_cls: type[Exception] = DocumentError) -> list[Path]:
    """The files ``raw`` stands for that the reader reads: itself if a file, else its ``SUFFIXES`` files (sorted,
    hidden entries ignored). Raises for a missing path or a folder without any such file."""
    in_folder = Path(raw).is_dir()
    found = [f for f, _ in _files(raw, flag, error_cls) if not in_folder or f.suffix.lower() in SUFFIXES]
    if in_folder and not found:
        raise _no_text(raw, flag, error_cls)
    return found


def _no_text(raw: str | Path, flag: str, error_cls: type[Exception]) -> Exception:
    return error_cls(f"{flag} {raw}: folder holds no {', '.join('*' + s for s in SUFFIXES)} files")


def read_documents(paths: str | Path | Sequence[str | Path], *, flag: str = "--data", strict: bool = True,
                   error_cls: type[Exception] = DocumentError) -> tuple[list[Document], list[Skipped]]:
    """Every document of ``paths`` in order, and the inputs skipped (see the module docstring for the rules).

    ``flag`` names the option in error messages (``--data``, ``--docs``, ``--text``); ``error_cls`` is raised.
    """
    if isinstance(paths, (str, Path)):
        paths = [paths]
    docs: list[Document] = []
    skipped: list[Skipped] = []

    def bad(name: str, reason: str) -> None:
        if strict:
            raise error_cls(f"{flag} {name}: {reason}")
        skipped.append(Skipped(name, reason))

    for raw in paths:
        in_folder = Path(raw).is_dir()
        files = _files(raw, flag, error_cls)
        if in_folder and strict and not any(f.suffix.lower() in SUFFIXES for f, _ in files):
            raise _no_text(raw, flag, error_cls)
        for path, name in files:
            shown = str(path) if strict else name  # strict errors name the real path (it may be deep in a tree)
            if in_folder and path.suffix.lower() not in SUFFIXES:
                skipped.append(Skipped(name, f"unsupported file type {path.suffix or '(none)'} "
                                             f"(expected {', '.join(SUFFIXES)})"))
                continue
            try:
                data = path.read_bytes()
            except OSError as e:
                bad(shown, f"cannot read ({e.strerror or e})")
                continue
            text, why = decode_text(data)
            if text is None:
                bad(shown, why)
                continue
            if not text.strip():
                skipped.append(Skipped(name, "empty"))
                continue
            if path.suffix.lower() != ".jsonl":
                docs.append(Document(name, text, str(path)))
                continue
            found = 0
            for i, line in enumerate(text.splitlines(), 1):
                if not line.strip():
                    continue
                where = f"{name}:{i}"
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    bad(f"{shown}:{i}", f"not valid JSON ({e.msg} at column {e.colno}); each line must be one "
                                        "JSON object")
                    continue
                field = next((f for f in TEXT_FIELDS if isinstance(obj, dict) and isinstance(obj.get(f), str)),
                             None)
                if field is None:
                    bad(f"{shown}:{i}", "no 'text' field holding a string (or 'context'); each JSONL line needs one")
                    continue
                if not obj[field].strip():
                    skipped.append(Skipped(where, f"empty '{field}'"))
                    continue
                docs.append(Document(where, obj[field], str(path)))
                found += 1
            if not found and not any(s.name.startswith(name + ":") for s in skipped):
                skipped.append(Skipped(name, "no documents (only blank lines)"))
    return docs, skipped
