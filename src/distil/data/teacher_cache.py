"""Teacher top-k caches on disk: a manifest and checksummed shards of compressed per-sequence blocks.

    writer = CacheWriter(out_dir, settings, total_sequences=n, sequences_per_shard=256)
    for index, (tokens, ids, logprobs, tail) in ...:   # in sequence order, from writer.next_sequence
        writer.add(tokens, ids, logprobs, tail)
    writer.finish()

    cache = TeacherCache(out_dir)                  # checks every shard exists with the right size
    tokens, ids, logprobs, tail = cache.get(17)    # one sequence, decoded from the memory-mapped shard

Layout of a cache folder::

    manifest.json        written last: a folder without it is an unfinished cache
    progress.json        while writing: settings and the completed shards (for resuming)
    id_order.npy         ``ranked`` encoding: the id frequency table (uint32 [vocab]), written
                         before the first shard; its SHA-256 is in progress.json and the manifest
    shard-00000.bin ...  blocks (one per sequence, see distil.data.topk_codec), then an index
                         (block offsets, positions and CRC32 per block) and a footer
    tokenizer/           the data's tokenizer (cache-teacher), so training needs nothing of the teacher
    teacher_tokenizer/   a cross-tokenizer cache: the teacher's tokenizer, for the alignment

A shard is written under a temporary name and renamed when complete, so a killed writer leaves
whole shards plus at most one temporary file, which a resumed run deletes and redoes. Every block
carries a CRC32 checked when it is read; the manifest holds each shard's size and SHA-256
(``TeacherCache.verify``), so a truncated or corrupt shard is an error, never silent garbage.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import struct
import zlib
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from distil.data.topk_codec import (
    COARSE,
    CUT,
    DEFAULT_ENCODING,
    ENCODINGS,
    LEVEL,
    STEP,
    decode_block,
    ranks_of,
)
from distil.errors import DistilError
from distil.fsutil import atomic_write_text, fsync_dir
from distil.spec import shared_vocab

log = logging.getLogger("distil")

FORMAT = "distil-topk-cache"
VERSION = 2  # 2 added the ranked encoding and its id table; 1 reads the same
CROSS_VERSION = 3  # a cross-tokenizer cache (which a reader of 2 must not take for an ordinary one)
READS_VERSIONS = (1, 2, 3)
ID_ORDER_FILE = "id_order.npy"
MAGIC = b"DSTLTOPK"
_FOOTER = struct.Struct("<QQ8s")  # index offset, number of blocks, magic


@dataclass
class CacheSettings:
    """Everything that decides the cache's content; a resumed writer must match it exactly."""

    teacher: str  # the teacher's path or hub id, an API model, or "import:<file>"
    tokenizer_hash: str
    vocab_size: int
    k: int
    temperature: float = 1.0
    encoding: str = DEFAULT_ENCODING
    source: str = "teacher"  # teacher (aligned with data windows) | api | import (sequences of its own)
    seq_len: int | None = None  # teacher / api: data.seq_len of the windows
    document_attention: bool = False
    tokens_sha256: str | None = None  # teacher / api: the token stream the cache is aligned to
    level: int = LEVEL  # zstd level
    # A cross-tokenizer cache (loss.cross_tokenizer): sequence i is training window i (in the data's
    # tokenizer, ``tokenizer_hash``) re-tokenised by the teacher's tokenizer (this hash, saved in the
    # folder's teacher_tokenizer/); ``k`` columns: the top-(k - 1), then the produced token when the
    # top-(k - 1) lacks it. None: an ordinary cache, in the data's tokenizer.
    teacher_tokenizer_hash: str | None = None

    def __post_init__(self):
        if self.encoding not in ENCODINGS:
            raise DistilError(f"cache encoding {self.encoding!r} is not one of {', '.join(ENCODINGS)}")
        if self.k < 1:
            raise DistilError(f"k = {self.k} must be >= 1")
        top = self.k - 1 if self.teacher_tokenizer_hash else self.k  # a cross-tokenizer cache's last column
        if top > self.vocab_size:
            raise DistilError(f"k = {top} is larger than the vocabulary ({self.vocab_size} tokens)")


@dataclass
class Manifest:
    settings: CacheSettings
    num_sequences: int
    num_tokens: int  # positions with a top-k entry list
    shards: list[dict] = field(default_factory=list)  # {file, first_sequence, sequences, bytes, sha256}
    stats: dict = field(default_factory=dict)  # e.g. import counts
    dtype: str = ""  # how values are stored (from the encoding), for readers of the JSON
    id_order: dict | None = None  # ranked: {file, sha256} of the id frequency table
    format: str = FORMAT
    version: int = VERSION

    def to_json(self) -> str:
        raw = asdict(self)
        if raw["settings"]["teacher_tokenizer_hash"] is None:  # an ordinary cache reads as before
            del raw["settings"]["teacher_tokenizer_hash"]
        return json.dumps(raw, indent=2) + "\n"

    @classmethod
    def read(cls, path: Path) -> Manifest:
        try:
            raw = json.loads(path.read_text())
            if raw.get("format") != FORMAT:
                raise DistilError(f"{path} is not a distil top-k cache manifest")
            if raw.get("version") not in READS_VERSIONS:
                raise DistilError(f"{path} has cache format version {raw.get('version')}; this distil reads "
                                  f"{', '.join(map(str, READS_VERSIONS))}")
            return cls(settings=CacheSettings(**raw.pop("settings")), **raw)
        except (json.JSONDecodeError, TypeError, KeyError) as e:
            raise DistilError(f"{path} is not a valid cache manifest: {e}") from e

    @property
    def bytes(self) -> int:
        return sum(s["bytes"] for s in self.shards)


def tokens_sha256(windows: np.ndarray, chunk: int = 4096) -> str:
    """SHA-256 of a [n, seq_len + 1] window array as little-endian uint32 (what a cache is aligned to)."""
    h = hashlib.sha256()
    for start in range(0, len(windows), chunk):
        h.update(np.ascontiguousarray(windows[start : start + chunk]).astype("<u4").tobytes())
    return h.hexdigest()


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            h.update(block)
    return h.hexdigest()


def save_id_order(path: Path, order: np.ndarray) -> str:
    """Write a ranked cache's id table atomically; returns its SHA-256."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        np.save(f, np.asarray(order, dtype="<u4"))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)
    return file_sha256(path)


def load_id_order(path: Path, *, vocab_size: int, sha256: str | None) -> np.ndarray:
    """A ranked cache's id table, checked against its recorded SHA-256 and the vocabulary."""
    if not path.is_file():
        raise DistilError(f"the ranked cache's id table {path} is missing")
    if sha256 is not None and file_sha256(path) != sha256:
        raise DistilError(f"the id table {path} fails its SHA-256 checksum: corrupt or from another cache")
    try:
        order = np.load(path, allow_pickle=False)
    except ValueError as e:
        raise DistilError(f"the id table {path} is unreadable: {e}") from e
    if order.shape != (vocab_size,):
        raise DistilError(f"the id table {path} has {order.size} entries; the cache's vocabulary has {vocab_size}")
    ranks_of(order)  # a permutation, or an error
    return order.astype(np.int64)


def shard_name(index: int) -> str:
    return f"shard-{index:05d}.bin"


class _ShardFile:
    """One shard being written: blocks appended to a temporary file, index and footer at the end."""

    def __init__(self, final: Path):
        self.final = final
        self.tmp = final.with_name(f".{final.name}.tmp")
        self.file = open(self.tmp, "wb")
        self.hash = hashlib.sha256()
        self.offsets, self.positions, self.crcs = [0], [], []

    def _write(self, data: bytes) -> None:
        self.file.write(data)
        self.hash.update(data)

    def add(self, block: bytes, positions: int) -> None:
        self._write(block)
        self.offsets.append(self.offsets[-1] + len(block))
        self.positions.append(positions)
        self.crcs.append(zlib.crc32(block))

    def close(self) -> dict:
        index_offset = self.offsets[-1]
        index = (np.asarray(self.offsets, dtype="<u8").tobytes() + np.asarray(self.positions, dtype="<u8").tobytes()
                 + np.asarray(self.crcs, dtype="<u4").tobytes())
        self._write(index)
        self._write(_FOOTER.pack(index_offset, len(self.positions), MAGIC))
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()
        os.replace(self.tmp, self.final)
        fsync_dir(self.final.parent)
        return {"file": self.final.name, "sequences": len(self.positions), "positions": int(sum(self.positions)),
                "bytes": self.final.stat().st_size, "sha256": self.hash.hexdigest()}

    def abort(self) -> None:
        self.file.close()
        self.tmp.unlink(missing_ok=True)


class CacheWriter:
    """Writes a cache sequence by sequence; resumes an interrupted one in the same folder.

    ``next_sequence`` is where writing continues (0 for a fresh cache): completed shards of an
    interrupted run are kept (after their SHA-256 is checked), the partial one is redone.

    A ``ranked`` cache needs its id table before the first block: ``id_order`` is the table kept
    from an interrupted run, else None until ``set_id_order`` (``topk_codec.frequency_order`` of
    the top-k over the first ``ORDER_SAMPLE`` positions); ``id_rank`` is what ``encode_block`` takes.
    """

    def __init__(self, path: str | Path, settings: CacheSettings, *, total_sequences: int, sequences_per_shard: int,
                 overwrite: bool = False):
        self.path = Path(path)
        self.settings = settings
        self.total = total_sequences
        self.per_shard = sequences_per_shard
        if sequences_per_shard < 1:
            raise DistilError("sequences per shard must be >= 1")
        if (self.path / "manifest.json").exists() and not overwrite:
            raise DistilError(f"{self.path} already holds a complete cache; pass --overwrite to write it again")
        if overwrite and self.path.exists():
            for f in self._cache_files():
                f.unlink()
        self.path.mkdir(parents=True, exist_ok=True)
        self.shards: list[dict] = []
        self.num_tokens = 0
        self.id_order: np.ndarray | None = None
        self.id_rank: np.ndarray | None = None
        self._id_order_sha: str | None = None
        self._resume()
        self.next_sequence = sum(s["sequences"] for s in self.shards)
        self._current: _ShardFile | None = None
        self._in_current = 0

    def _cache_files(self):
        return [f for f in self.path.iterdir() if f.name in ("manifest.json", "progress.json", ID_ORDER_FILE)
                or (f.name.startswith(("shard-", ".shard-")) and f.name.endswith((".bin", ".tmp")))
                or f.name == f".{ID_ORDER_FILE}.tmp"]

    @property
    def needs_id_order(self) -> bool:
        return self.settings.encoding == "ranked" and self.id_order is None

    def set_id_order(self, order: np.ndarray) -> None:
        """Fix a ranked cache's id table (before the first block)."""
        if self.settings.encoding != "ranked":
            raise DistilError(f"an id table is for the ranked encoding, not {self.settings.encoding!r}")
        if self.next_sequence or self._current is not None:
            raise DistilError("the id table must be set before the first block")
        order = np.asarray(order)
        self.id_rank = ranks_of(order)
        if len(order) != self.settings.vocab_size:
            raise DistilError(f"the id table has {len(order)} entries; the vocabulary has {self.settings.vocab_size}")
        self._id_order_sha = save_id_order(self.path / ID_ORDER_FILE, order)
        self.id_order = order.astype(np.int64)
        self._save_progress()

    def _progress(self) -> dict:
        return {"settings": asdict(self.settings), "total_sequences": self.total, "sequences_per_shard": self.per_shard}

    def _resume(self) -> None:
        progress_file = self.path / "progress.json"
        kept: list[dict] = []
        order_sha = None
        if progress_file.exists():
            try:
                progress = json.loads(progress_file.read_text())
            except json.JSONDecodeError as e:
                raise DistilError(f"{progress_file} is corrupt ({e}); pass --overwrite to start the cache again") from e
            mine = self._progress()
            for key, value in mine.items():
                theirs = progress.get(key)
                if theirs != value:
                    raise DistilError(f"{self.path} holds an unfinished cache written with other settings ({key}: "
                                      f"{theirs} there, {value} now); pass --overwrite to start again")
            order_sha = progress.get("id_order_sha256")
            if order_sha is not None:
                try:
                    self.id_order = load_id_order(self.path / ID_ORDER_FILE, vocab_size=self.settings.vocab_size,
                                                  sha256=order_sha)
                    self.id_rank = ranks_of(self.id_order)
                    self._id_order_sha = order_sha
                except DistilError as e:  # the shards were encoded with it: all are redone
                    log.warning("%s; the cache is started again", e)
                    progress["shards"] = []
            for shard in progress.get("shards", []):
                f = self.path / shard["file"]
                if f.is_file() and f.stat().st_size == shard["bytes"] and file_sha256(f) == shard["sha256"]:
                    kept.append(shard)
                else:
                    break  # this shard and everything after it are redone
        names = {s["file"] for s in kept}
        if self.id_order is not None:
            names.add(ID_ORDER_FILE)
        for f in self._cache_files():  # partial shards, shards after a damaged one
            if f.name != "progress.json" and f.name not in names:
                f.unlink()
        self.shards = kept
        self.num_tokens = sum(s["positions"] for s in kept)
        if kept:
            log.info("resuming the cache in %s: %d complete shards kept (%d sequences)", self.path, len(kept),
                     sum(s["sequences"] for s in kept))
        self._save_progress()

    def _save_progress(self) -> None:
        atomic_write_text(self.path / "progress.json", json.dumps(
            {**self._progress(), "id_order_sha256": self._id_order_sha, "shards": self.shards}, indent=1))

    def add_block(self, block: bytes, positions: int) -> None:
        """Append one encoded sequence (``topk_codec.encode_block``, with ``id_rank`` when ranked)."""
        if self.needs_id_order:
            raise DistilError("a ranked cache needs its id table (set_id_order) before the first block")
        if self.next_sequence >= self.total:
            raise DistilError(f"the cache was planned for {self.total} sequences; got more")
        if self._current is None:
            self._current = _ShardFile(self.path / shard_name(len(self.shards)))
            self._in_current = 0
        self._current.add(block, positions)
        self._in_current += 1
        self.next_sequence += 1
        self.num_tokens += positions
        if self._in_current == self.per_shard or self.next_sequence == self.total:
            shard = self._current.close()
            shard["first_sequence"] = self.next_sequence - shard["sequences"]
            self.shards.append(shard)
            self._current = None
            self._save_progress()

    def abort(self) -> None:
        if self._current is not None:
            self._current.abort()
            self._current = None

    def finish(self, stats: dict | None = None) -> Manifest:
        if self.next_sequence != self.total:
            raise DistilError(f"the cache holds {self.next_sequence} of {self.total} planned sequences")
        if self.needs_id_order:
            raise DistilError("a ranked cache needs its id table (set_id_order)")
        dtype = ("float32 log-probs and tail" if self.settings.encoding == "exact" else
                 f"uint16 log-space codes (step {STEP} nats above {CUT}, {COARSE} below), stored as differences")
        if self.settings.encoding == "ranked":
            dtype += "; ids as varint ranks in the id table"
        id_order = {"file": ID_ORDER_FILE, "sha256": self._id_order_sha} if self._id_order_sha else None
        manifest = Manifest(settings=self.settings, num_sequences=self.total, num_tokens=self.num_tokens,
                            shards=self.shards, stats=stats or {}, dtype=dtype, id_order=id_order,
                            version=CROSS_VERSION if self.settings.teacher_tokenizer_hash else VERSION)
        atomic_write_text(self.path / "manifest.json", manifest.to_json())
        (self.path / "progress.json").unlink(missing_ok=True)
        return manifest


class TeacherCache:
    """Reads a finished cache. Shards are memory-mapped on first use (per process, so the object
    can be handed to DataLoader workers); nothing is loaded whole."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        manifest = self.path / "manifest.json"
        if not manifest.is_file():
            hint = " (an unfinished cache: run `distil cache-teacher` again to complete it)" if (
                self.path / "progress.json").exists() else ""
            raise DistilError(f"no cache manifest at {manifest}{hint}")
        self.manifest = Manifest.read(manifest)
        self.settings = self.manifest.settings
        starts = []
        for shard in self.manifest.shards:
            f = self.path / shard["file"]
            if not f.is_file():
                raise DistilError(f"cache shard {f} is missing")
            if f.stat().st_size != shard["bytes"]:
                raise DistilError(f"cache shard {f} has {f.stat().st_size} bytes but the manifest says {shard['bytes']}: "
                                  "truncated or corrupt")
            starts.append(shard["first_sequence"])
        self._starts = np.asarray(starts, dtype=np.int64)
        self.id_order = None
        if self.settings.encoding == "ranked":
            if not self.manifest.id_order:
                raise DistilError(f"{manifest}: a ranked cache without its id table entry")
            self.id_order = load_id_order(self.path / self.manifest.id_order["file"], vocab_size=self.settings.vocab_size,
                                          sha256=self.manifest.id_order["sha256"])
        if sum(s["sequences"] for s in self.manifest.shards) != self.manifest.num_sequences:
            raise DistilError(f"{manifest}: the shards hold a different number of sequences than the manifest says")
        self._maps: dict[int, tuple] = {}

    def __len__(self) -> int:
        return self.manifest.num_sequences

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_maps"] = {}  # each process maps the shards itself
        return state

    def _shard(self, index: int):
        if index not in self._maps:
            shard = self.manifest.shards[index]
            f = self.path / shard["file"]
            data = np.memmap(f, dtype=np.uint8, mode="r")
            if len(data) < _FOOTER.size:
                raise DistilError(f"cache shard {f} is truncated")
            index_offset, count, magic = _FOOTER.unpack(bytes(data[-_FOOTER.size :]))
            expected = index_offset + 8 * (count + 1) + 8 * count + 4 * count + _FOOTER.size
            if magic != MAGIC or count != shard["sequences"] or expected != len(data):
                raise DistilError(f"cache shard {f} is truncated or corrupt (bad footer)")
            table = data[index_offset : len(data) - _FOOTER.size]
            offsets = np.frombuffer(table[: 8 * (count + 1)], dtype="<u8")
            positions = np.frombuffer(table[8 * (count + 1) : 8 * (2 * count + 1)], dtype="<u8")
            crcs = np.frombuffer(table[8 * (2 * count + 1) :], dtype="<u4")
            self._maps[index] = (data, offsets, positions, crcs)
        return self._maps[index]

    def locate(self, sequence: int) -> tuple[int, int]:
        if not 0 <= sequence < len(self):
            raise DistilError(f"sequence {sequence} is outside the cache (0..{len(self) - 1})")
        shard = int(np.searchsorted(self._starts, sequence, side="right") - 1)
        return shard, sequence - int(self._starts[shard])

    def get(self, sequence: int):
        """(tokens [n + 1], ids [n, k] (-1 absent), logprobs [n, k], tail log-mass [n]) of one sequence."""
        shard, i = self.locate(sequence)
        data, offsets, positions, crcs = self._shard(shard)
        block = data[offsets[i] : offsets[i + 1]]
        if zlib.crc32(block) != int(crcs[i]):
            raise DistilError(f"cache shard {self.path / self.manifest.shards[shard]['file']} is corrupt: block {i} "
                              "fails its CRC32 checksum")
        out = decode_block(memoryview(block), vocab_size=self.settings.vocab_size, encoding=self.settings.encoding,
                           id_order=self.id_order)
        if out[1].shape[0] != int(positions[i]):
            raise DistilError(f"cache shard {self.manifest.shards[shard]['file']} is corrupt: block {i} has the wrong length")
        return out

    def verify(self) -> None:
        """Check every shard's SHA-256 against the manifest (reads the whole cache once)."""
        for shard in self.manifest.shards:
            f = self.path / shard["file"]
            if file_sha256(f) != shard["sha256"]:
                raise DistilError(f"cache shard {f} fails its SHA-256 checksum: truncated or corrupt")

    # -- alignment with the training data ----------------------------------------------------

    def check_against(self, *, tokenizer_hash: str, vocab_size: int | None = None, temperature: float, seq_len: int | None = None,
                      num_sequences: int | None = None, windows_sha256=None, document_attention: bool | None = None):
        """Raise naming both sides when the cache does not belong to this data and student."""
        s = self.settings
        if s.tokenizer_hash != tokenizer_hash:
            raise DistilError(f"the cache {self.path} was written with tokenizer {s.tokenizer_hash[:12]} but the data "
                              f"uses tokenizer {tokenizer_hash[:12]}")
        if vocab_size is not None and s.vocab_size != vocab_size:
            try:
                shared_vocab(vocab_size, s.vocab_size)
            except DistilError:
                raise DistilError(f"the cache {self.path} has vocabulary size {s.vocab_size} but the student's is "
                                  f"{vocab_size}") from None
        if abs(s.temperature - temperature) > 1e-9:
            raise DistilError(f"the cache {self.path} holds log-probs at temperature {s.temperature} but "
                              f"loss.temperature is {temperature}")
        if s.source == "import":
            return
        if seq_len is not None and s.seq_len != seq_len:
            raise DistilError(f"the cache {self.path} was written for data.seq_len {s.seq_len} but data.seq_len is {seq_len}")
        if num_sequences is not None and self.manifest.num_sequences != num_sequences:
            raise DistilError(f"the cache {self.path} holds {self.manifest.num_sequences} sequences but the data has "
                              f"{num_sequences} training windows")
        if document_attention is not None and s.document_attention != document_attention:
            raise DistilError(f"the cache {self.path} was written with data.document_attention={s.document_attention} "
                              f"but data.document_attention is {document_attention}")
        if windows_sha256 is not None and s.tokens_sha256:
            ours = windows_sha256()
            if ours != s.tokens_sha256:
                raise DistilError(f"the cache {self.path} is aligned to token stream {s.tokens_sha256[:12]} but the "
                                  f"data's training windows hash to {ours[:12]}: a different corpus or split")
