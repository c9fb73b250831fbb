"""Documents for training: the embedded corpus, text files, JSONL, Parquet, Hugging Face datasets.

    docs = load_documents(cfg.data)            # list[str]
    train_docs, val_docs = split_documents(docs, 0.05, seed=0)

The embedded corpus needs no download: the interpreter's own documentation (``pydoc_data``
topics, one document each) plus the docstrings of the standard library's modules, classes and
functions, read with ``ast`` (nothing is imported or executed). About 1.6M characters on 3.11.
"""

from __future__ import annotations

import ast
import functools
import json
import os
import random
import sysconfig
from pathlib import Path

from distil.errors import DistilError

# Parts of the standard library that are tests, tools or GUI demos rather than documentation.
_SKIP_DIRS = {"test", "tests", "idlelib", "site-packages", "lib2to3", "tkinter", "turtledemo", "ensurepip", "__pycache__"}
MIN_DOCSTRING_CHARS = 200


def embedded_corpus() -> list[str]:
    """Python's topic documentation plus standard-library docstrings, in a fixed order (a new list
    each call; the stdlib is read once per process)."""
    return list(_embedded_corpus())


@functools.lru_cache(maxsize=1)
def _embedded_corpus() -> tuple[str, ...]:
    from pydoc_data.topics import topics

    docs = [topics[name].strip() for name in sorted(topics) if topics[name].strip()]
    root = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS)
        files.extend(Path(dirpath) / f for f in sorted(filenames) if f.endswith(".py"))
    for path in sorted(files):
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, OSError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc and len(doc) >= MIN_DOCSTRING_CHARS:
                    docs.append(doc.strip())
    return tuple(docs)


def sample_documents(chars: int, seed: int = 0) -> tuple[str, list[str]]:
    """JSONL of embedded-corpus documents in a fixed random order, about ``chars`` characters in all,
    and the documents left out (in the same order; held-out material such as multiple-choice items)."""
    docs = embedded_corpus()
    random.Random(seed).shuffle(docs)
    lines, total = [], 0
    for doc in docs:
        if total >= chars:
            break
        lines.append(json.dumps({"text": doc}) + "\n")
        total += len(doc)
    return "".join(lines), docs[len(lines):]


def _read_text_documents(path: Path) -> list[str]:
    files = sorted(path.rglob("*.txt")) if path.is_dir() else [path]
    docs = []
    for f in files:
        text = read_text_file(f)
        if path.is_dir():
            docs.append(text.strip())  # one document per file
        else:
            # One file: documents are separated by blank lines.
            docs.extend(block.strip() for block in text.split("\n\n"))
    return [d for d in docs if d]


def read_text_file(path: Path) -> str:
    """A UTF-8 text file; other bytes are an error naming the file and the offset (never U+FFFD)."""
    try:
        return Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise DistilError(f"{path} is not UTF-8 text (byte {e.start}: {e.object[e.start:e.start + 1]!r}); "
                          "convert it, e.g. iconv -f latin1 -t utf-8") from None


def read_jsonl(path: Path):
    """(line number, record) for each non-blank line; invalid JSON or non-UTF-8 bytes are an error
    naming the line."""
    with Path(path).open("rb") as f:
        for line_no, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DistilError(f"{path}:{line_no} is not UTF-8 text (byte {e.start} of the line); convert the "
                                  "file to UTF-8") from None
            if not line.strip():
                continue
            try:
                yield line_no, json.loads(line)
            except json.JSONDecodeError as e:
                raise DistilError(f"{path}:{line_no} is not valid JSON: {e.msg}") from e


def _read_jsonl_documents(path: Path, field: str) -> list[str]:
    docs = []
    for line_no, record in read_jsonl(path):
        if not isinstance(record, dict) or field not in record:
            raise DistilError(f"{path}:{line_no} has no field {field!r} (set data.text_field)")
        text = record[field]
        if isinstance(text, str) and text.strip():
            docs.append(text.strip())
    return docs


def _read_parquet_documents(path: Path, field: str) -> list[str]:
    try:
        import pyarrow.parquet as pq
    except ImportError as e:
        raise DistilError("reading Parquet needs pyarrow: pip install pyarrow") from e
    files = sorted(path.rglob("*.parquet")) if path.is_dir() else [path]
    docs = []
    for f in files:
        try:
            table = pq.read_table(f, columns=[field])
        except (KeyError, ValueError) as e:
            raise DistilError(f"{f} has no column {field!r} (set data.text_field)") from e
        except Exception as e:
            raise DistilError(f"{f} is not a readable Parquet file: {e}") from e
        docs.extend(t.strip() for t in table.column(field).to_pylist() if isinstance(t, str) and t.strip())
    return docs


def _read_hf_documents(data_cfg) -> list[str]:
    """A Hugging Face dataset: a local directory saved with save_to_disk, a local data dir, or a hub id
    (read in streaming mode, so nothing but the documents used is downloaded)."""
    try:
        import datasets
    except ImportError as e:
        raise DistilError('Hugging Face datasets need the datasets package: pip install -e ".[eval]" or pip install datasets') from e
    path = Path(data_cfg.path)
    try:
        if (path / "dataset_info.json").is_file() or (path / "state.json").is_file():
            dataset = datasets.load_from_disk(str(path))
            if isinstance(dataset, datasets.DatasetDict):
                dataset = dataset[data_cfg.split]
        else:
            dataset = datasets.load_dataset(str(data_cfg.path), split=data_cfg.split, streaming=not path.exists())
    except Exception as e:
        raise DistilError(f"could not load dataset {data_cfg.path!r} (split {data_cfg.split!r}): {str(e).splitlines()[0]}") from e
    docs = []
    for record in dataset:
        if data_cfg.text_field not in record:
            raise DistilError(f"dataset {data_cfg.path!r} has no field {data_cfg.text_field!r} (set data.text_field)")
        text = record[data_cfg.text_field]
        if isinstance(text, str) and text.strip():
            docs.append(text.strip())
        if data_cfg.max_docs and len(docs) >= data_cfg.max_docs:
            break
    return docs


def load_documents(data_cfg) -> list[str]:
    """The documents named by a :class:`~distil.config.DataConfig`; an empty corpus is an error."""
    if data_cfg.source == "embedded":
        docs = embedded_corpus()
        where = "the embedded corpus"
    elif data_cfg.source == "hf":
        docs = _read_hf_documents(data_cfg)
        where = f"dataset {data_cfg.path}"
    else:
        path = Path(data_cfg.path)
        if not path.exists():
            raise DistilError(f"data.path not found: {path}")
        if data_cfg.source == "jsonl":
            docs = _read_jsonl_documents(path, data_cfg.text_field)
        elif data_cfg.source == "parquet":
            docs = _read_parquet_documents(path, data_cfg.text_field)
        else:
            docs = _read_text_documents(path)
        where = str(path)
    if data_cfg.max_docs:
        docs = docs[: data_cfg.max_docs]
    if not docs:
        raise DistilError(f"the corpus is empty: no documents in {where}")
    return docs


def split_documents(docs: list[str], val_fraction: float, seed: int = 0) -> tuple[list[str], list[str]]:
    """Split by document (never inside one), shuffled with ``seed``; both sides get at least one."""
    if len(docs) < 2:
        raise DistilError(f"the corpus has {len(docs)} document; at least 2 are needed to hold some out for validation")
    order = list(range(len(docs)))
    random.Random(seed).shuffle(order)
    num_val = min(len(docs) - 1, max(1, round(len(docs) * val_fraction)))
    val = [docs[i] for i in sorted(order[:num_val])]
    train = [docs[i] for i in sorted(order[num_val:])]
    return train, val
