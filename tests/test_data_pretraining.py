"""Corpora as documents, the TFDS text-corpus builder, and unmasked pre-training examples.

Real data: Gutenberg valid (12 books) and WikiText-2 raw valid/test from ../shared/data.
"""

import gzip
import itertools
import pathlib

import numpy as np
import pytest
import tensorflow as tf

from bert_mini.data.corpus import (
    BertMiniTextCorpus,
    custom_corpus_config,
    iter_documents,
    read_documents,
    resolve_files,
)
from bert_mini.data.pretraining import (
    SpecialIds,
    cached_pretraining_examples,
    create_examples,
    examples_dataset,
    load_examples,
    save_examples,
    tokenize_documents,
    truncation_counts,
)
from bert_mini.data.sources import DataError, prepare
from bert_mini.tokenization import BertTokenizer

SEQ = 128


@pytest.fixture(scope="module")
def tokenizer(vocab_path: pathlib.Path) -> BertTokenizer:
    return BertTokenizer(vocab_path)


@pytest.fixture(scope="module")
def gutenberg_valid(data_dir: pathlib.Path) -> pathlib.Path:
    return data_dir / "pretrain" / "gutenberg" / "valid.txt.gz"


@pytest.fixture(scope="module")
def wiki_valid(data_dir: pathlib.Path) -> pathlib.Path:
    return data_dir / "pretrain" / "wikitext-2-raw" / "wiki.valid.raw"


@pytest.fixture(scope="module")
def corpus(gutenberg_valid, tokenizer):
    return tokenize_documents(read_documents([gutenberg_valid]), tokenizer)


@pytest.fixture(scope="module")
def special(tokenizer) -> SpecialIds:
    return SpecialIds.of(tokenizer)


@pytest.fixture(scope="module")
def packed(corpus, special):
    return create_examples(corpus, special, max_seq_length=SEQ, seed=0)


@pytest.fixture(scope="module")
def pairs(corpus, special):
    return create_examples(corpus, special, max_seq_length=SEQ, next_sentence=True, seed=0)


# ------------------------------------------------------------------------------ reading


def test_read_documents_gutenberg_valid(gutenberg_valid):
    documents = list(read_documents([gutenberg_valid]))
    with gzip.open(gutenberg_valid, "rt", encoding="utf-8") as handle:
        raw_lines = handle.read().split("\n")
    paragraphs = [line for line in raw_lines if line.strip()]
    assert len(documents) == 12
    assert all(documents) and all(line and line == line.strip() for d in documents for line in d)
    assert list(itertools.chain.from_iterable(documents)) == paragraphs
    assert documents[0][0].startswith("Produced by")


def test_read_documents_wikitext_headings_start_documents(wiki_valid):
    raw_lines = wiki_valid.read_text(encoding="utf-8").split("\n")
    titles = [
        line.strip()[2:-2]
        for line in raw_lines
        if line.startswith(" = ") and not line.startswith(" = = ")
    ]
    documents = list(iter_documents([wiki_valid]))
    assert len(documents) == len(titles) == 60
    assert documents[0].title == "Homarus gammarus"
    assert documents[0].lines[0].startswith("Homarus gammarus , known as the European lobster")
    assert [d.title for d in documents] == [t.replace(" @-@ ", "-") for t in titles]
    lines = [line for d in documents for line in d.lines]
    assert not any(line.startswith((" ", "=")) for line in lines)  # no headings, no lead space
    assert not any(marker in line for line in lines for marker in (" @-@ ", " @,@ ", " @.@ "))
    assert any("well-known" in line or "-" in line for line in lines)
    assert [d.doc_id for d in documents[:2]] == ["wiki.valid.raw:0", "wiki.valid.raw:1"]


def test_read_documents_layouts_and_encodings(tmp_path):
    plain = tmp_path / "a.txt"
    plain.write_bytes(b"\xef\xbb\xbfone\r\ntwo\r\n\r\n\r\n  three  \n\n")
    zipped = tmp_path / "b.txt.gz"
    with gzip.open(zipped, "wt", encoding="utf-8") as handle:
        handle.write(" = T = \n \n Intro line \n \n = = Sec = = \n body 1 @,@ 000 \n = U = \n x \n")
    assert list(read_documents([plain, zipped])) == [
        ["one", "two"],
        ["three"],
        ["Intro line", "body 1,000"],
        ["x"],
    ]
    # Forcing the blank-line layout on WikiText keeps headings and splits at blank lines.
    assert list(read_documents([zipped], layout="blank_lines"))[0] == ["= T ="]


def test_bad_utf8_and_missing_files_are_data_errors(tmp_path):
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"fine\nalso fine\nbroken \xff here\n")
    with pytest.raises(DataError, match=r"bad\.txt:3: not valid UTF-8"):
        list(read_documents([bad]))
    missing = tmp_path / "nope.txt.gz"
    with pytest.raises(DataError, match=r"expected data file not found: .*nope\.txt\.gz"):
        list(read_documents([missing]))
    with pytest.raises(DataError, match=r"no file matches .*shard-\*\.txt .*get it here"):
        resolve_files(["shard-*.txt"], tmp_path, "get it here")
    with pytest.raises(ValueError, match="unknown corpus layout"):
        list(read_documents([bad], layout="xml"))


def test_tfds_missing_source_names_file_and_how_to_get(tmp_path):
    unrelated = tmp_path / "other"
    unrelated.mkdir()
    (unrelated / "README").write_text("not a corpus")
    for source in (tmp_path / "absent", unrelated):
        with pytest.raises(DataError, match=r"wikitext-2-raw/wiki\.valid\.raw .*SOURCES\.md"):
            prepare(
                BertMiniTextCorpus,
                source_dir=source,
                tfds_dir=tmp_path / "tfds",
                config="wikitext2_raw",
            )


# ------------------------------------------------------------------------------- TFDS


def test_tfds_build_wikitext2_raw(tmp_path_factory, data_dir, wiki_valid):
    builder = prepare(
        BertMiniTextCorpus, tfds_dir=tmp_path_factory.mktemp("tfds"), config="wikitext2_raw"
    )
    assert builder.info.splits["validation"].num_examples == 60
    assert builder.info.splits["test"].num_examples == 62
    examples = list(builder.as_dataset(split="validation", shuffle_files=False).as_numpy_iterator())
    by_id = {ex["id"].decode(): ex for ex in examples}
    expected = list(iter_documents([wiki_valid], root=data_dir / "pretrain"))
    assert sorted(by_id) == sorted(d.doc_id for d in expected)
    for document in expected[:5]:
        example = by_id[document.doc_id]
        assert example["title"].decode() == document.title
        assert [line.decode() for line in example["text"]] == document.lines


def test_tfds_build_custom_globs(tmp_path):
    for shard in range(2):
        with gzip.open(tmp_path / f"part-{shard}.txt.gz", "wt", encoding="utf-8") as handle:
            handle.write(f"doc {shard} a\ndoc {shard} b\n\ndoc {shard} c\n")
    config = custom_corpus_config("my_books", {"train": str(tmp_path / "part-*.txt.gz")})
    builder = prepare(BertMiniTextCorpus, tfds_dir=tmp_path / "tfds", config=config)
    texts = sorted(
        tuple(line.decode() for line in ex["text"])
        for ex in builder.as_dataset(split="train").as_numpy_iterator()
    )
    assert texts == [("doc 0 a", "doc 0 b"), ("doc 0 c",), ("doc 1 a", "doc 1 b"), ("doc 1 c",)]


def test_tfds_gutenberg_config_reads_all_five_train_shards(tmp_path):
    source = tmp_path / "pretrain"
    (source / "gutenberg").mkdir(parents=True)
    names = [f"train-{i:05d}-of-00005.txt.gz" for i in range(5)] + ["valid.txt.gz"]
    for index, name in enumerate(names):
        with gzip.open(source / "gutenberg" / name, "wt", encoding="utf-8") as handle:
            handle.write(f"book {index}\nsecond paragraph\n\nbook {index}b\n\n")
    builder = prepare(
        BertMiniTextCorpus, source_dir=source, tfds_dir=tmp_path / "tfds", config="gutenberg"
    )
    assert builder.info.splits["train"].num_examples == 10
    assert builder.info.splits["validation"].num_examples == 2
    ids = {ex["id"].decode() for ex in builder.as_dataset(split="train").as_numpy_iterator()}
    assert "gutenberg/train-00004-of-00005.txt.gz:1" in ids

    (source / "gutenberg" / names[3]).unlink()
    with pytest.raises(DataError, match=r"train-00003-of-00005\.txt\.gz .*SOURCES\.md"):
        prepare(
            BertMiniTextCorpus, source_dir=source, tfds_dir=tmp_path / "tfds2", config="gutenberg"
        )


# --------------------------------------------------------------------- example creation


def test_truncation_counts_match_googles_loop():
    def google(len_a, len_b, max_tokens):
        cut_a = cut_b = 0
        while len_a + len_b > max_tokens:
            if len_a > len_b:
                len_a, cut_a = len_a - 1, cut_a + 1
            else:
                len_b, cut_b = len_b - 1, cut_b + 1
        return cut_a, cut_b

    for len_a, len_b in itertools.product(range(1, 45), repeat=2):
        assert truncation_counts(len_a, len_b, 30) == google(len_a, len_b, 30), (len_a, len_b)


def _lengths(examples):
    return examples["attention_mask"].sum(axis=1)


def _check_common(examples, special):
    ids = examples["input_ids"]
    mask = examples["attention_mask"]
    rows = np.arange(len(ids))
    lengths = _lengths(examples)
    for key in ("input_ids", "token_type_ids", "attention_mask"):
        assert examples[key].dtype == np.int32 and examples[key].shape == (len(ids), SEQ)
    assert np.array_equal(mask, (np.arange(SEQ)[None, :] < lengths[:, None]).astype(np.int32))
    assert np.all(ids[:, 0] == special.cls)
    assert np.all(ids[rows, lengths - 1] == special.sep)
    assert np.all((ids == special.pad) == (mask == 0))
    assert np.all(lengths <= SEQ)


def test_packed_examples_use_every_token_once(packed, corpus, special):
    _check_common(packed, special)
    ids, mask = packed["input_ids"], packed["attention_mask"]
    assert np.all(packed["token_type_ids"] == 0)
    assert mask.mean() >= 0.95
    assert np.sum(_lengths(packed) < SEQ) == 1  # only the stream's last row is short
    # Bodies (without [CLS] and the closing [SEP]) hold the corpus plus one [SEP] between docs.
    body = ids.copy()
    body[:, 0] = -1
    body[np.arange(len(ids)), _lengths(packed) - 1] = -1
    body = body[(mask == 1) & (body >= 0)]
    separators = np.full(corpus.num_documents - 1, special.sep)
    assert np.array_equal(np.sort(body), np.sort(np.concatenate([corpus.ids, separators])))


def test_next_sentence_pairs(pairs, special):
    _check_common(pairs, special)
    ids, types = pairs["input_ids"], pairs["token_type_ids"]
    positions = np.arange(SEQ)[None, :]
    is_sep = ids == special.sep
    assert np.all(is_sep.sum(axis=1) == 2)
    first_sep = np.argmax(is_sep, axis=1)
    second_sep = _lengths(pairs) - 1
    assert np.all(first_sep >= 2) and np.all(second_sep - first_sep >= 2)  # A, B non-empty
    expected_types = (positions > first_sep[:, None]) & (positions <= second_sep[:, None])
    assert np.array_equal(types, expected_types.astype(np.int32))
    labels = pairs["next_sentence_label"]
    assert labels.dtype == np.int32 and set(np.unique(labels)) == {0, 1}
    assert len(labels) > 4000 and 0.46 <= labels.mean() <= 0.54
    assert np.mean(_lengths(pairs) == SEQ) > 0.6  # most pairs fill the whole sequence


def test_short_seq_prob_makes_short_pairs(corpus, special, pairs):
    never = create_examples(corpus, special, next_sentence=True, short_seq_prob=0.0, seed=0)
    often = create_examples(corpus, special, next_sentence=True, short_seq_prob=0.5, seed=0)
    short = [np.mean(_lengths(e) < SEQ // 2) for e in (never, pairs, often)]
    assert short[0] < short[1] < short[2]
    assert short[2] - short[0] > 0.05


def test_examples_are_deterministic_per_seed(corpus, special, packed, pairs):
    for next_sentence, first in ((False, packed), (True, pairs)):
        again = create_examples(corpus, special, next_sentence=next_sentence, seed=0)
        other = create_examples(corpus, special, next_sentence=next_sentence, seed=1)
        for key in first:
            assert np.array_equal(first[key], again[key]), key
        assert not np.array_equal(first["input_ids"][:100], other["input_ids"][:100])


def test_next_sentence_needs_two_documents(special, tokenizer):
    one = tokenize_documents([["a single document.", "with two lines."]], tokenizer)
    with pytest.raises(ValueError, match="at least 2 documents"):
        create_examples(one, special, next_sentence=True)
    short = create_examples(one, special, max_seq_length=8)
    assert short["input_ids"].shape == (2, 8)


def test_save_load_cache_and_dataset(tmp_path, wiki_valid, tokenizer):
    cache = tmp_path / "cache"
    first = cached_pretraining_examples([wiki_valid], tokenizer, cache, max_seq_length=64)
    files = list(cache.iterdir())
    assert len(files) == 1 and files[0].suffix == ".npz"
    again = cached_pretraining_examples([wiki_valid], tokenizer, cache, max_seq_length=64)
    for key in first:
        assert again[key].dtype == np.int32 and np.array_equal(first[key], again[key])
    cached_pretraining_examples([wiki_valid], tokenizer, cache, max_seq_length=64, seed=3)
    assert len(list(cache.iterdir())) == 2  # another option, another file

    save_examples(first, tmp_path / "x.npz")
    loaded = load_examples(tmp_path / "x.npz")
    assert all(np.array_equal(first[k], loaded[k]) for k in first)

    dataset = examples_dataset(first)
    assert dataset.element_spec["input_ids"] == tf.TensorSpec([64], tf.int32)
    assert int(dataset.cardinality()) == len(first["input_ids"])
    head = next(dataset.as_numpy_iterator())
    assert np.array_equal(head["input_ids"], first["input_ids"][0])
