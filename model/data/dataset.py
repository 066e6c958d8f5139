"""Caption + VQGAN-code datasets in dalle-mini's training format.

Upstream's encoded datasets are tables with a `caption` column (text) and an `encoding` column (the
image's VQGAN codes, a list of ints in row-major order). This module writes and reads that format:

- JSON lines (`.jsonl`): one `{"caption": "...", "encoding": [c0, c1, ...]}` object per line;
- Parquet (`.parquet`): the same two columns, read and written with pyarrow when it is installed
  (upstream's datasets are parquet files; pyarrow is a test dependency, not a runtime one).

A dataset path may also be a folder, whose `*.jsonl` and `*.parquet` files are read in name order.
"""

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np

CAPTION, ENCODING = "caption", "encoding"


def write_dataset(path, captions: Sequence[str], encodings: np.ndarray) -> Path:
    """Writes captions [n] and encodings int [n, codes] to `path` (.jsonl or .parquet)."""
    path = Path(path)
    encodings = np.asarray(encodings)
    if encodings.ndim != 2 or len(encodings) != len(captions):
        raise ValueError(f"need one row of codes per caption: {len(captions)} captions, encodings {encodings.shape}")
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".parquet":
        pa, pq = _pyarrow()
        # A list<int> column built from one flat array and offsets: no Python int per code, which
        # matters at hundreds of thousands of rows.
        offsets = np.arange(len(encodings) + 1, dtype=np.int32) * encodings.shape[1]
        column = pa.ListArray.from_arrays(pa.array(offsets), pa.array(encodings.reshape(-1).astype(np.int32)))
        pq.write_table(pa.table({CAPTION: pa.array(list(captions), pa.string()), ENCODING: column}), path)
    elif path.suffix == ".jsonl":
        with open(path, "w", encoding="utf-8") as f:
            for text, row in zip(captions, encodings):
                f.write(json.dumps({CAPTION: text, ENCODING: row.tolist()}) + "\n")
    else:
        raise ValueError(f"{path}: dataset files end in .jsonl or .parquet")
    return path


def read_dataset(path) -> tuple[list[str], np.ndarray]:
    """(captions [n], encodings np.int32 [n, codes]) from a .jsonl / .parquet file or a folder of them."""
    path = Path(path)
    files = sorted(p for p in path.iterdir() if p.suffix in (".jsonl", ".parquet")) if path.is_dir() else [path]
    if not files:
        raise FileNotFoundError(f"{path} holds no .jsonl or .parquet files")
    captions, parts = [], []
    for file in files:
        if file.suffix == ".parquet":
            texts, rows = _read_parquet(file)
        elif file.suffix == ".jsonl":
            texts, rows = [], []
            for line in file.read_text(encoding="utf-8").splitlines():
                if line.strip():
                    record = json.loads(line)
                    texts.append(record[CAPTION])
                    rows.append(record[ENCODING])
            rows = _rows_array(file, rows)
        else:
            raise ValueError(f"{file}: dataset files end in .jsonl or .parquet")
        captions += texts
        parts.append(rows)
    _check_same_length(path, (rows.shape[1] for rows in parts if len(rows)))
    return captions, np.concatenate(parts).astype(np.int32)


def _check_same_length(file, lengths) -> None:
    lengths = set(lengths)
    if len(lengths) > 1:
        raise ValueError(f"{file}: encodings have different lengths {sorted(lengths)[:5]}")


def _rows_array(file, rows) -> np.ndarray:
    _check_same_length(file, (len(row) for row in rows))
    return np.asarray(rows, dtype=np.int32).reshape(len(rows), -1)


def _read_parquet(file) -> tuple[list[str], np.ndarray]:
    """Reads the encoding column as one flat array (list or fixed-size list of ints)."""
    pa, pq = _pyarrow()
    table = pq.read_table(file, columns=[CAPTION, ENCODING])
    column = table.column(ENCODING).combine_chunks()
    if hasattr(column, "offsets"):  # list<int>; a fixed-size list has one length by type
        _check_same_length(file, np.diff(np.asarray(column.offsets)).tolist())
    flat = np.asarray(column.flatten().to_numpy(zero_copy_only=False), dtype=np.int32)
    return table.column(CAPTION).to_pylist(), flat.reshape(len(table), -1)


def _pyarrow():
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ModuleNotFoundError:
        raise ModuleNotFoundError("parquet datasets need pyarrow (`pip install pyarrow`); "
                                  "or use .jsonl files") from None
    return pa, pq
