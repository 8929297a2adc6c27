"""Reading (text, label) rows from local TSV/CSV files, with errors that name file and line."""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from pathlib import Path

from lmlab.data.reading import read_text_file
from lmlab.errors import ConfigError, DataError

DELIMITERS = {".tsv": "\t", ".csv": ","}


@dataclass(frozen=True)
class LabelledText:
    text: str
    label: str
    line: int  # 1-based line in its file, for error messages


def delimiter_for(path: Path, delimiter: str) -> str:
    """`auto` picks by suffix (.tsv tab, .csv comma; a trailing .gz is looked through)."""
    if delimiter == "tab":
        return "\t"
    if delimiter != "auto":
        if len(delimiter) != 1:
            raise ConfigError("data.delimiter", delimiter, ["auto", "tab", "a single character"])
        return delimiter
    suffixes = [s for s in path.suffixes if s != ".gz"]
    if suffixes and suffixes[-1].lower() in DELIMITERS:
        return DELIMITERS[suffixes[-1].lower()]
    raise ConfigError(
        "data.delimiter", delimiter, ["tab", ",", "a single character"],
        f"cannot tell the delimiter of {path} from its suffix (.tsv or .csv); set it",
    )


def _column_index(field: str, column: int | str, header: list[str] | None, path: Path) -> int:
    if isinstance(column, str) and column.strip().isdigit():
        column = int(column)
    if isinstance(column, int):
        if column < 0:
            raise ConfigError(field, column, reason="column indices are 0-based and >= 0")
        return column
    if header is None:
        raise ConfigError(field, column, reason="columns can be named only with data.has_header=true; "
                          "give a 0-based index instead")
    if column not in header:
        raise ConfigError(field, column, header, f"no column of that name in the header of {path}")
    return header.index(column)


def read_labelled_texts(
    path: str | Path,
    text_column: int | str,
    label_column: int | str,
    has_header: bool = True,
    delimiter: str = "auto",
) -> list[LabelledText]:
    """Rows of a delimited file as (text, label) pairs, blank lines skipped.

    TSV is read without quote handling (a `"` inside a sentence is text); CSV with standard
    quoting. CRLF line ends and a missing final newline are both fine. A row too short for a
    configured column raises DataError naming the file and line.
    """
    path = Path(path)
    delim = delimiter_for(path, delimiter)
    text = read_text_file(path)
    quoting = csv.QUOTE_NONE if delim == "\t" else csv.QUOTE_MINIMAL
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delim, quoting=quoting)
    header: list[str] | None = None
    columns: tuple[int, int] | None = None
    rows: list[LabelledText] = []
    try:
        for fields in reader:
            if not any(f.strip() for f in fields):
                continue
            if columns is None:
                if has_header:
                    header = [f.strip() for f in fields]
                columns = (
                    _column_index("data.text_column", text_column, header, path),
                    _column_index("data.label_column", label_column, header, path),
                )
                if columns[0] == columns[1]:
                    raise ConfigError("data.text_column", text_column,
                                      reason=f"is the same column as data.label_column={label_column!r}")
                if has_header:
                    continue
            need = max(columns) + 1
            if len(fields) < need:
                raise DataError(
                    path, f"row has {len(fields)} column(s) but data.text_column={text_column!r} and "
                    f"data.label_column={label_column!r} need {need} (delimiter {delim!r})",
                    line=reader.line_num,
                )
            rows.append(LabelledText(fields[columns[0]].strip(), fields[columns[1]].strip(), reader.line_num))
    except csv.Error as err:
        raise DataError(path, f"malformed row ({err})", line=reader.line_num) from None
    if not rows:
        raise DataError(path, "no data rows" + (" after the header" if has_header else ""))
    return rows
