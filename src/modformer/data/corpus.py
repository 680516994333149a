"""Where the training text comes from: the built-in offline corpus and the user's files.

A corpus is a set of named *domains*, each a list of documents (strings). The built-in
corpus needs nothing but a Python installation:

- ``python``: the standard library's own ``.py`` sources,
- ``prose``: the English help topics shipped in ``pydoc_data.topics``,
- ``c``: the C headers under ``/usr/include`` (left out, with a warning, where missing).

Each built-in domain is read in a fixed order (sorted paths, sorted topic names) and capped
at ``max_bytes`` of UTF-8 text, so the same machine always yields the same corpus.

User inputs are ``.txt`` files (one document per file) and ``.jsonl`` files (one document
per line, in a string field, ``"text"`` by default), given as paths, globs (``**``
recurses, e.g. ``'src/**/*.py'``) or directories (searched recursively for the
``suffixes``, ``.txt`` and ``.jsonl`` by default). Any file but ``.jsonl`` is one document. ``NAME=PATH_OR_GLOB`` puts the
matched files in domain ``NAME``. Files and lines that cannot be used are skipped with a
logged warning and recorded (path, line, reason) so ``meta.json`` can list them.

The documents are held in memory; only the token streams are written to disk piece by
piece (see :mod:`modformer.data.prepare`). That suits corpora up to a few GB of text.
"""

from __future__ import annotations

import glob
import json
import logging
import os
import re
import sysconfig
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

BUILTIN_DOMAINS: tuple[str, ...] = ("python", "prose", "c")
# Small enough that `modformer prepare` plus the tiny demo model train fast on 2 CPU cores.
DEFAULT_MAX_BYTES_PER_DOMAIN = 2_000_000
C_INCLUDE_DIR = Path("/usr/include")
# Files a directory input contributes; a file named explicitly (or by a glob) is read
# whatever its suffix: `.jsonl` as JSON lines, anything else as one text document.
USER_SUFFIXES = (".txt", ".jsonl")

_DOMAIN_NAME = re.compile(r"^[A-Za-z0-9_.\-]+$")
_GLOB_CHARS = re.compile(r"[*?\[]")
_PYTHON_SKIP_DIRS = {"site-packages", "dist-packages", "__pycache__"}
_PYTHON_TEST_DIRS = {"test", "tests", "idle_test"}


class DataError(ValueError):
    """Bad data-pipeline input or a broken prepared-data directory; the message says the fix."""


@dataclass
class Domain:
    """The documents of one domain and the files (or topics) they came from."""

    name: str
    documents: list[str] = field(default_factory=list)
    # One `meta.json` "sources" entry per input file (per built-in domain for the defaults).
    sources: list[dict[str, Any]] = field(default_factory=list)

    @property
    def num_bytes(self) -> int:
        return sum(len(doc.encode("utf-8")) for doc in self.documents)


@dataclass
class Corpus:
    """Domains in a fixed order, plus every file or line that was skipped and why."""

    domains: dict[str, Domain]
    skipped: list[dict[str, Any]]

    def texts(self) -> Iterator[str]:
        """All documents, domain by domain (the order tokenizer training sees them in)."""
        for domain in self.domains.values():
            yield from domain.documents


def _skip(
    skipped: list[dict[str, Any]], path: Path | str, reason: str, line: int | None = None
) -> None:
    where = f"{path}:{line}" if line is not None else str(path)
    logger.warning("skipping %s: %s", where, reason)
    record: dict[str, Any] = {"path": str(path), "reason": reason}
    if line is not None:
        record["line"] = line
    skipped.append(record)


def _read_utf8(path: Path, skipped: list[dict[str, Any]]) -> str | None:
    """The file's text, decoded strictly (no newline translation), or None if unusable."""
    try:
        raw = path.read_bytes()
    except OSError as error:
        _skip(skipped, path, f"cannot read file: {error.strerror or error}")
        return None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as error:
        _skip(skipped, path, f"not valid UTF-8 (byte {error.start}); convert it to UTF-8")
        return None


def _truncate_utf8(text: str, max_bytes: int) -> str:
    """The longest prefix of `text` within `max_bytes` UTF-8 bytes, cut after a newline if
    the prefix has one (so a capped source file ends on a whole line)."""
    encoded = text.encode("utf-8")
    if len(encoded) <= max_bytes:
        return text
    prefix = encoded[:max_bytes]
    last_newline = prefix.rfind(b"\n")
    if last_newline >= 0:
        prefix = prefix[: last_newline + 1]
    # `ignore` drops a multi-byte character cut in half at the end; nothing else can fail.
    return prefix.decode("utf-8", errors="ignore")


def _walk_sorted(
    root: Path, suffix: str, skip_dir: Callable[[str], bool], skipped: list[dict[str, Any]]
) -> Iterator[Path]:
    """Files under `root` ending in `suffix`, in sorted order, walked lazily so a capped
    domain stops reading the tree as soon as its budget is full."""

    def on_error(error: OSError) -> None:
        _skip(skipped, error.filename or root, f"cannot list directory: {error.strerror}")

    for dirpath, dirnames, filenames in os.walk(root, onerror=on_error):
        dirnames[:] = sorted(d for d in dirnames if not skip_dir(d))
        for filename in sorted(filenames):
            if filename.endswith(suffix):
                yield Path(dirpath) / filename


def _fill_within_budget(domain: Domain, texts: Iterable[str], max_bytes: int, source: str) -> None:
    """Append `texts` as documents until `max_bytes` of UTF-8 is used (the last one is
    truncated to fit), and record where they came from as the domain's source."""
    used_bytes = 0
    truncated = False
    for text in texts:
        if not text.strip():
            continue  # empty headers / __init__.py files carry nothing to learn
        document = _truncate_utf8(text, max_bytes - used_bytes)
        truncated = document != text
        if document.strip():
            domain.documents.append(document)
            used_bytes += len(document.encode("utf-8"))
        if used_bytes >= max_bytes or truncated:
            break
    domain.sources.append(
        {
            "domain": domain.name,
            "path": source,
            "builtin": True,
            "documents": len(domain.documents),
            "bytes": used_bytes,
            "truncated": truncated,
        }
    )


def _readable_texts(files: Iterable[Path], skipped: list[dict[str, Any]]) -> Iterator[str]:
    for path in files:
        text = _read_utf8(path, skipped)
        if text is not None:
            yield text


def python_stdlib_domain(
    max_bytes: int = DEFAULT_MAX_BYTES_PER_DOMAIN,
    include_tests: bool = False,
    skipped: list[dict[str, Any]] | None = None,
) -> Domain:
    """The standard library's `.py` files (site-packages excluded; test suites only when
    `include_tests`), one document per file, in sorted path order, capped at `max_bytes`."""
    skipped = [] if skipped is None else skipped
    root = Path(sysconfig.get_paths()["stdlib"])
    excluded = _PYTHON_SKIP_DIRS if include_tests else _PYTHON_SKIP_DIRS | _PYTHON_TEST_DIRS
    domain = Domain("python")
    files = _walk_sorted(root, ".py", lambda name: name in excluded, skipped)
    _fill_within_budget(domain, _readable_texts(files, skipped), max_bytes, str(root))
    return domain


def prose_domain(max_bytes: int = DEFAULT_MAX_BYTES_PER_DOMAIN) -> Domain:
    """Python's built-in help topics (English prose), one document per topic, sorted by
    topic name, capped at `max_bytes`. Empty (with a warning) if `pydoc_data` is missing."""
    domain = Domain("prose")
    try:
        from pydoc_data.topics import topics
    except ImportError:
        logger.warning("pydoc_data is not installed with this Python: no 'prose' domain")
        return domain
    texts = (topics[name] for name in sorted(topics))
    _fill_within_budget(domain, texts, max_bytes, "pydoc_data.topics")
    return domain


def c_headers_domain(
    max_bytes: int = DEFAULT_MAX_BYTES_PER_DOMAIN,
    skipped: list[dict[str, Any]] | None = None,
    include_dir: Path = C_INCLUDE_DIR,
) -> Domain:
    """The `*.h` files under `include_dir`, recursively in sorted order, capped at
    `max_bytes`. Empty (with a warning) where the directory does not exist."""
    skipped = [] if skipped is None else skipped
    domain = Domain("c")
    if not include_dir.is_dir():
        logger.warning("%s does not exist on this machine: no 'c' domain", include_dir)
        return domain
    files = _walk_sorted(include_dir, ".h", lambda name: False, skipped)
    _fill_within_budget(domain, _readable_texts(files, skipped), max_bytes, str(include_dir))
    return domain


def builtin_domain(
    name: str,
    max_bytes: int = DEFAULT_MAX_BYTES_PER_DOMAIN,
    include_python_tests: bool = False,
    skipped: list[dict[str, Any]] | None = None,
) -> Domain:
    """One built-in domain by name (see `BUILTIN_DOMAINS`)."""
    if name == "python":
        return python_stdlib_domain(max_bytes, include_python_tests, skipped)
    if name == "prose":
        return prose_domain(max_bytes)
    if name == "c":
        return c_headers_domain(max_bytes, skipped)
    raise DataError(
        f"unknown built-in domain {name!r}; choose from {', '.join(BUILTIN_DOMAINS)} "
        "(name your own files with NAME=PATH in the inputs, or with --domain NAME)"
    )


def _read_text_file(path: Path, domain: Domain, skipped: list[dict[str, Any]]) -> None:
    text = _read_utf8(path, skipped)
    if text is None:
        return
    if not text.strip():
        _skip(skipped, path, "file is empty")
        return
    domain.documents.append(text)
    domain.sources.append(
        {"domain": domain.name, "path": str(path), "documents": 1, "bytes": len(text.encode())}
    )


def _read_jsonl_file(
    path: Path, domain: Domain, text_field: str, skipped: list[dict[str, Any]]
) -> None:
    try:
        raw = path.read_bytes()
    except OSError as error:
        _skip(skipped, path, f"cannot read file: {error.strerror or error}")
        return
    num_documents = 0
    num_bytes = 0
    # Lines are decoded one by one so a single bad line costs only that line.
    for line_number, raw_line in enumerate(raw.splitlines(), start=1):
        if not raw_line.strip():
            continue  # blank lines (e.g. a trailing newline) are not records
        try:
            record = json.loads(raw_line.decode("utf-8"))
        except UnicodeDecodeError:
            _skip(skipped, path, "line is not valid UTF-8", line_number)
            continue
        except json.JSONDecodeError as error:
            _skip(skipped, path, f"line is not valid JSON ({error.msg})", line_number)
            continue
        if not isinstance(record, dict) or text_field not in record:
            _skip(
                skipped,
                path,
                f"record has no {text_field!r} field (choose the field with --text-field)",
                line_number,
            )
            continue
        text = record[text_field]
        if not isinstance(text, str):
            _skip(
                skipped,
                path,
                f"field {text_field!r} is {type(text).__name__}, not a string",
                line_number,
            )
            continue
        if not text.strip():
            _skip(skipped, path, f"field {text_field!r} is empty", line_number)
            continue
        domain.documents.append(text)
        num_documents += 1
        num_bytes += len(text.encode("utf-8"))
    if num_documents == 0:
        _skip(skipped, path, "no usable documents in this file")
        return
    domain.sources.append(
        {"domain": domain.name, "path": str(path), "documents": num_documents, "bytes": num_bytes}
    )


def parse_input_spec(spec: str | os.PathLike) -> tuple[str | None, str]:
    """Split `NAME=PATH_OR_GLOB` into (NAME, PATH_OR_GLOB); a plain path gives (None, path).

    A spec that names an existing path is always a path, even if it contains `=`.
    """
    spec = os.fspath(spec)
    if "=" in spec and not os.path.exists(spec):
        name, pattern = spec.split("=", 1)
        if not _DOMAIN_NAME.match(name):
            raise DataError(
                f"input {spec!r}: domain name {name!r} must be letters, digits, '_', '-' or '.'"
            )
        if not pattern:
            raise DataError(f"input {spec!r} names domain {name!r} but gives no path after '='")
        return name, pattern
    return None, spec


def check_suffixes(suffixes: Sequence[str]) -> tuple[str, ...]:
    """File name endings such as `.py`; a bare `py` gets its dot."""
    cleaned = tuple(dict.fromkeys(s if s.startswith(".") else f".{s}" for s in suffixes if s))
    if not cleaned or any(_GLOB_CHARS.search(s) or "/" in s for s in cleaned):
        raise DataError(
            f"suffixes must be file endings such as .py or .md, got {list(suffixes)}; for "
            "a pattern, give the input as a quoted glob such as 'src/**/*.py'"
        )
    return cleaned


def expand_input(pattern: str, suffixes: Sequence[str] = USER_SUFFIXES) -> tuple[list[Path], bool]:
    """The files an input pattern stands for, sorted, and whether it was a directory (whose
    files with one of `suffixes` are taken, recursively).

    Missing paths, globs that match nothing and directories without such files are errors:
    a typo must not silently shrink the corpus.
    """
    suffixes = check_suffixes(suffixes)
    if _GLOB_CHARS.search(pattern):
        matches = sorted(Path(p) for p in glob.glob(pattern, recursive=True))
        files = [p for p in matches if p.is_file()]
        if not files:
            raise DataError(f"glob {pattern!r} matches no files; check the pattern and quoting")
        return files, False
    path = Path(pattern)
    if not path.exists():
        raise DataError(f"input path {str(path)!r} does not exist")
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.name.endswith(suffixes) and p.is_file())
        if not files:
            raise DataError(
                f"directory {str(path)!r} contains no {' or '.join(suffixes)} files (searched "
                "recursively); name the file types with --suffixes (e.g. --suffixes .py) or "
                "give a quoted glob such as 'DIR/**/*.py'"
            )
        return files, True
    return [path], False


def _check_domain_name(name: str) -> str:
    if not _DOMAIN_NAME.match(name):
        raise DataError(f"domain name {name!r} must be letters, digits, '_', '-' or '.'")
    return name


def user_domains(
    inputs: Sequence[str | os.PathLike],
    domain: str | None = None,
    text_field: str = "text",
    skipped: list[dict[str, Any]] | None = None,
    suffixes: Sequence[str] = USER_SUFFIXES,
) -> dict[str, Domain]:
    """Read the user's inputs into domains, in order of first appearance.

    The domain of a file is, in order of precedence: the NAME of a `NAME=PATH` input,
    `domain`, the directory's name for a directory input, else the file's stem. Inputs
    that name the same domain are merged.
    """
    skipped = [] if skipped is None else skipped
    if domain is not None:
        _check_domain_name(domain)
    domains: dict[str, Domain] = {}
    seen: set[Path] = set()
    for spec in inputs:
        name, pattern = parse_input_spec(spec)
        files, is_directory = expand_input(pattern, suffixes)
        for path in files:
            if path.resolve() in seen:  # e.g. a file named both alone and by its directory
                logger.warning("%s is given more than once; reading it once", path)
                continue
            seen.add(path.resolve())
            if name is not None:
                domain_name = name
            elif domain is not None:
                domain_name = domain
            elif is_directory:
                domain_name = Path(pattern).resolve().name
            else:
                domain_name = path.stem
            target = domains.setdefault(domain_name, Domain(domain_name))
            if path.suffix == ".jsonl":
                _read_jsonl_file(path, target, text_field, skipped)
            else:
                _read_text_file(path, target, skipped)
    return domains


def build_corpus(
    inputs: Sequence[str | os.PathLike] | None = None,
    domains: Sequence[str] | None = None,
    domain: str | None = None,
    max_bytes_per_domain: int = DEFAULT_MAX_BYTES_PER_DOMAIN,
    include_python_tests: bool = False,
    text_field: str = "text",
    suffixes: Sequence[str] = USER_SUFFIXES,
) -> Corpus:
    """The corpus `modformer prepare` tokenizes.

    `inputs=None` means the built-in corpus: the domains listed in `domains` (all of
    `BUILTIN_DOMAINS` when None). With `inputs`, built-in domains are added only if
    `domains` names them. `max_bytes_per_domain` caps the built-in domains only; user
    files are always read whole; a directory input contributes its files ending in one of
    `suffixes`. Domains left without documents are dropped; no documents at all is an error.
    """
    if isinstance(inputs, (str, os.PathLike)):
        inputs = [inputs]  # one path given bare, not as a list
    if inputs is not None and len(inputs) == 0:
        raise DataError("inputs is an empty list; pass None to use the built-in corpus")
    if max_bytes_per_domain <= 0:
        raise DataError(f"max_bytes_per_domain must be positive, got {max_bytes_per_domain}")
    if not text_field:
        raise DataError("text_field must be a non-empty JSON field name")
    if domains is None:
        builtin_names: list[str] = list(BUILTIN_DOMAINS) if inputs is None else []
    else:
        builtin_names = list(dict.fromkeys(domains))  # drop repeats, keep order
        if not builtin_names and inputs is None:
            raise DataError("domains is empty; name at least one of " + ", ".join(BUILTIN_DOMAINS))
        unknown = [name for name in builtin_names if name not in BUILTIN_DOMAINS]
        if unknown:
            raise DataError(
                f"unknown built-in domain(s) {', '.join(map(repr, unknown))}; choose from "
                f"{', '.join(BUILTIN_DOMAINS)} (name your own files with NAME=PATH in the "
                "inputs, or with --domain NAME)"
            )

    skipped: list[dict[str, Any]] = []
    all_domains: dict[str, Domain] = {}
    for name in builtin_names:
        all_domains[name] = builtin_domain(
            name, max_bytes_per_domain, include_python_tests, skipped
        )
    if inputs is not None:
        for name, user_domain in user_domains(
            inputs, domain, text_field, skipped, suffixes
        ).items():
            if name in all_domains:  # a user file may extend a built-in domain
                all_domains[name].documents.extend(user_domain.documents)
                all_domains[name].sources.extend(user_domain.sources)
            else:
                all_domains[name] = user_domain

    nonempty = {name: d for name, d in all_domains.items() if d.documents}
    if not nonempty:
        reasons = "; ".join(f"{s['path']}: {s['reason']}" for s in skipped[:5])
        more = f" (and {len(skipped) - 5} more)" if len(skipped) > 5 else ""
        detail = f" Skipped inputs: {reasons}{more}." if skipped else ""
        raise DataError(
            "the corpus has no documents: every input was empty or unusable."
            f"{detail} Give non-empty UTF-8 .txt/.jsonl inputs, or omit inputs to use the "
            "built-in corpus."
        )
    return Corpus(domains=nonempty, skipped=skipped)
