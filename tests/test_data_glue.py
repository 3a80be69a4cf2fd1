"""GLUE from the real GLUE TSVs in ../shared/data: counts, quirks, catalog parity, bad rows,
and fine-tuning features.

Expected values are computed independently from the raw bytes of the files (split on LF and tab)
or taken from SOURCES.md / the TFDS catalog's own builder, never from the code under test.
"""

import pathlib
import re

import numpy as np
import pytest
import tensorflow_datasets as tfds
from ml_collections import ConfigDict

from bert_mini.data.glue import (
    GLUE_TASKS,
    BertMiniGlue,
    encode_glue,
    glue_task,
    load_glue,
    read_glue_rows,
)
from bert_mini.data.sources import DataError, prepare
from bert_mini.inputs import glue_arrays
from bert_mini.tokenization import BertTokenizer

# ----------------------------------------------------------------------------- helpers


@pytest.fixture(scope="module")
def glue_dir(data_dir: pathlib.Path) -> pathlib.Path:
    return data_dir / "glue"


@pytest.fixture(scope="module")
def tfds_dir(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    """One TFDS build folder per module: each task is prepared once, then reused."""
    return tmp_path_factory.mktemp("tfds")


@pytest.fixture(scope="module")
def load(glue_dir: pathlib.Path, tfds_dir: pathlib.Path):
    """``load(task, split)`` -> whole split as numpy columns, sorted by ``idx``."""
    cache: dict[tuple[str, str], dict[str, np.ndarray]] = {}

    def load_split(task: str, split: str) -> dict[str, np.ndarray]:
        if (task, split) not in cache:
            ds = load_glue(task, split, source_dir=glue_dir, tfds_dir=tfds_dir)
            batch = next(ds.batch(1_000_000).as_numpy_iterator())
            order = np.argsort(batch["idx"])
            cache[task, split] = {k: v[order] for k, v in batch.items()}
        return cache[task, split]

    return load_split


def raw_rows(path: pathlib.Path, header: bool = True) -> list[list[str]]:
    """The file's data rows as tab-split fields, by plain byte handling (independent parser)."""
    text = path.read_bytes().decode("utf-8")
    if text.startswith("\ufeff"):
        text = text[1:]
    lines = text.split("\n")
    if lines[-1] == "":
        lines.pop()
    return [line.split("\t") for line in lines[1 if header else 0 :]]


def texts(column: np.ndarray) -> list[str]:
    return [t.decode("utf-8") for t in column]


def assert_idx_is_row_number(split: dict[str, np.ndarray], n_rows: int) -> None:
    np.testing.assert_array_equal(split["idx"], np.arange(n_rows))


# ----------------------------------------------------------------------------- real data


def test_sst2_counts_labels_and_unlabelled_test(load, glue_dir):
    train, dev, test = load("sst2", "train"), load("glue/sst2", "validation"), load("sst2", "test")
    assert len(train["idx"]) == 67_349 and len(dev["idx"]) == 872 and len(test["idx"]) == 1_821
    np.testing.assert_array_equal(np.bincount(train["label"]), [29_780, 37_569])
    np.testing.assert_array_equal(np.bincount(dev["label"]), [428, 444])
    assert (test["label"] == -1).all()
    for split in (train, dev, test):
        assert_idx_is_row_number(split, len(split["idx"]))
    raw_dev = raw_rows(glue_dir / "SST-2" / "dev.tsv")
    assert texts(dev["sentence"]) == [r[0] for r in raw_dev]  # trailing spaces kept
    assert dev["label"].tolist() == [int(r[1]) for r in raw_dev]
    assert texts(test["sentence"]) == [r[1] for r in raw_rows(glue_dir / "SST-2" / "test.tsv")]


def test_cola_headerless_files_and_dev_without_final_newline(load, glue_dir):
    train, dev = load("cola", "train"), load("cola", "validation")
    assert len(train["idx"]) == 8_551 and len(dev["idx"]) == 1_043
    np.testing.assert_array_equal(np.bincount(train["label"]), [2_528, 6_023])
    np.testing.assert_array_equal(np.bincount(dev["label"]), [322, 721])
    raw_dev = raw_rows(glue_dir / "CoLA" / "dev.tsv", header=False)
    assert not (glue_dir / "CoLA" / "dev.tsv").read_bytes().endswith(b"\n")
    for i in (0, 1_042):  # the first row (no header eaten) and the unterminated last row
        assert dev["sentence"][i].decode() == raw_dev[i][3]
        assert dev["label"][i] == int(raw_dev[i][1])
    assert texts(train["sentence"]) == [r[3] for r in raw_rows(glue_dir / "CoLA/train.tsv", False)]
    assert (load("cola", "test")["label"] == -1).all()


def test_mrpc_bom_header_and_unlabelled_test(load, glue_dir):
    train, dev, test = load("mrpc", "train"), load("mrpc", "validation"), load("mrpc", "test")
    assert (len(train["idx"]), len(dev["idx"]), len(test["idx"])) == (3_668, 408, 1_725)
    np.testing.assert_array_equal(np.bincount(train["label"]), [1_194, 2_474])
    assert (test["label"] == -1).all()
    raw_train = raw_rows(glue_dir / "MRPC" / "train.tsv")
    assert train["label"].tolist() == [int(r[0]) for r in raw_train]
    assert texts(train["sentence1"]) == [r[3] for r in raw_train]
    assert texts(train["sentence2"]) == [r[4] for r in raw_train]  # bare quotes kept


def test_stsb_float_scores_by_header_name(load, glue_dir):
    train, dev, test = load("stsb", "train"), load("stsb", "validation"), load("stsb", "test")
    assert (len(train["idx"]), len(dev["idx"]), len(test["idx"])) == (5_749, 1_500, 1_379)
    for split in (train, dev):
        assert split["label"].dtype == np.float32
        assert split["label"].min() >= 0.0 and split["label"].max() <= 5.0
    raw_dev = raw_rows(glue_dir / "STS-B" / "dev.tsv")
    np.testing.assert_array_equal(dev["label"], np.float32([float(r[9]) for r in raw_dev]))
    assert texts(dev["sentence1"]) == [r[7] for r in raw_dev]
    assert test["label"].dtype == np.float32 and (test["label"] == -1.0).all()
    assert texts(test["sentence2"]) == [r[8] for r in raw_rows(glue_dir / "STS-B" / "test.tsv")]


def test_rte_string_labels_map_to_catalog_classes_and_row_2164_is_intact(load, glue_dir, tfds_dir):
    train, dev = load("rte", "train"), load("rte", "validation")
    assert len(train["idx"]) == 2_490 and len(dev["idx"]) == 277
    names = tfds.builder("glue/rte", data_dir=tfds_dir).info.features["label"].names
    raw_train = raw_rows(glue_dir / "RTE" / "train.tsv")
    assert [names[i] for i in train["label"]] == [r[3] for r in raw_train]
    assert set(train["label"].tolist()) == {0, 1}  # entailment=0, not_entailment=1
    assert raw_train[2164][0] == "2164"
    sentence1 = train["sentence1"][2164].decode()
    assert sentence1 == raw_train[2164][1] and sentence1.startswith(' "That film')


def test_qnli_dev_and_missing_files_are_named(load, glue_dir, tfds_dir):
    dev = load("qnli", "validation")
    assert len(dev["idx"]) == 5_463 and set(dev) == {"question", "sentence", "label", "idx"}
    with pytest.raises(DataError, match=r"QNLI/train\.tsv.*gluebenchmark\.com"):
        load_glue("qnli", "train", source_dir=glue_dir, tfds_dir=tfds_dir)
    with pytest.raises(DataError, match=r"MNLI/dev_matched\.tsv.*gluebenchmark\.com"):
        load_glue("mnli", "validation_matched", source_dir=glue_dir, tfds_dir=tfds_dir)
    with pytest.raises(DataError, match=r"no glue/mnli files found.*MNLI/train\.tsv"):
        prepare(BertMiniGlue, glue_dir, tfds_dir, config="mnli")
    assert not BertMiniGlue(data_dir=tfds_dir, config="mnli").is_prepared()
    with pytest.raises(ValueError, match="no split 'validation'"):
        load_glue("mnli", "validation", source_dir=glue_dir, tfds_dir=tfds_dir)
    with pytest.raises(ValueError, match="no split 'validation'"):  # checked before any download
        load_glue("tfds:glue/mnli", "validation", tfds_dir=tfds_dir)


# ----------------------------------------------------------------------------- catalog parity


class _NoDownload:
    """Stands in for the catalog's download manager so its split names can be read offline."""

    def download_and_extract(self, url):
        return "/nonexistent"

    def download(self, urls):
        return {k: "/nonexistent" for k in urls}


def _spec(feature) -> object:
    names = getattr(feature, "names", None)
    return type(feature).__name__, feature.dtype, feature.shape, names


@pytest.mark.parametrize("name", sorted(GLUE_TASKS))
def test_features_splits_and_columns_match_the_tfds_catalog(name, tmp_path):
    catalog = tfds.builder(f"glue/{name}", data_dir=tmp_path)
    ours = BertMiniGlue(data_dir=tmp_path, config=name)
    assert type(catalog).__module__ == "tensorflow_datasets.text.glue"
    theirs_features, our_features = catalog.info.features, ours.info.features
    assert set(our_features) == set(theirs_features)
    for key in theirs_features:
        assert _spec(our_features[key]) == _spec(theirs_features[key]), key
    catalog_splits = [str(s.name) for s in catalog._split_generators(_NoDownload())]
    assert list(glue_task(name).splits) == catalog_splits
    config = catalog.builder_config
    if name not in ("mrpc", "cola"):  # the catalog reads MRPC/CoLA from other file layouts
        assert dict(glue_task(name).text_features) == config.text_features
        assert glue_task(name).label_column == config.label_column
    assert list(glue_task(name).text_features) == list(config.text_features)  # segment order


# ----------------------------------------------------------------------------- bad rows


def write(path: pathlib.Path, text: str) -> pathlib.Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def test_wrong_column_count_names_file_and_line_or_is_skipped(tmp_path):
    path = write(
        tmp_path / "train.tsv", "sentence\tlabel\ngood \t1\nno label here\nbad \t0\t?\nok\t0"
    )
    with pytest.raises(
        DataError, match=rf"^{re.escape(str(path))}:3: expected 2 tab-separated columns, found 1"
    ):
        read_glue_rows("sst2", "train", path)
    rows, skipped = read_glue_rows("sst2", "train", path, skip_bad_rows=True)
    assert skipped == 2
    assert rows == [
        {"sentence": "good ", "label": 1, "idx": 0},
        {"sentence": "ok", "label": 0, "idx": 3},  # idx still counts the skipped rows
    ]


def test_unknown_label_names_file_and_line_or_is_skipped(tmp_path):
    path = write(
        tmp_path / "dev.tsv",
        'index\tsentence1\tsentence2\tlabel\n0\ta\tb\tnot_entailment\n1\t"c\td\tmaybe\n'
        "2\te\tf\t2\n3\tg\th\t0\n",
    )
    with pytest.raises(
        DataError, match=rf"^{re.escape(str(path))}:3: label 'maybe' is not one of the rte labels"
    ):
        read_glue_rows("rte", "validation", path)
    rows, skipped = read_glue_rows("rte", "validation", path, skip_bad_rows=True)
    assert skipped == 2  # 'maybe' and the out-of-range index 2
    assert [(r["idx"], r["label"]) for r in rows] == [(0, 1), (3, 0)]


def test_bad_float_score_names_file_and_line_or_is_skipped(tmp_path):
    header = (
        "index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\tscore"
    )
    body = ["0\tg\tf\ty\t0\tn\tn\ta\tb\t4.250", "1\tg\tf\ty\t1\tn\tn\tc\td\thigh"]
    body += ["2\tg\tf\ty\t2\tn\tn\te\tf\t7.5", "3\tg\tf\ty\t3\tn\tn\tg\th\tnan"]
    path = write(tmp_path / "train.tsv", "\n".join([header, *body]) + "\n")
    with pytest.raises(
        DataError, match=rf"^{re.escape(str(path))}:3: score 'high' is not a number"
    ):
        read_glue_rows("stsb", "train", path)
    rows, skipped = read_glue_rows("stsb", "train", path, skip_bad_rows=True)
    assert skipped == 3 and rows == [{"sentence1": "a", "sentence2": "b", "label": 4.25, "idx": 0}]


def test_header_without_a_needed_column_is_an_error(tmp_path):
    path = write(tmp_path / "train.tsv", "text\tlabel\na\t1\n")
    with pytest.raises(
        DataError, match=rf"^{re.escape(str(path))}:1: header has no column 'sentence'"
    ):
        read_glue_rows("sst2", "train", path)


def test_builder_fails_on_bad_rows_or_skips_and_records_them(tmp_path):
    source = tmp_path / "glue"
    bad = write(source / "SST-2" / "train.tsv", "sentence\tlabel\r\nfine\t1\r\nbroken\t7\r\nok\t0")
    with pytest.raises(DataError, match=rf"{re.escape(str(bad))}:3: label '7'"):
        prepare(BertMiniGlue, source, tmp_path / "strict", config="sst2")
    builder = prepare(BertMiniGlue, source, tmp_path / "lenient", config="sst2", skip_bad_rows=True)
    assert list(builder.info.splits) == ["train"]  # dev/test files absent: no such splits
    assert builder.info.splits["train"].num_examples == 2
    reloaded = BertMiniGlue(data_dir=tmp_path / "lenient", config="sst2")
    assert reloaded.info.metadata["skipped_rows"] == {"train": 1}
    ds = load_glue("sst2", "train", source_dir=source, tfds_dir=tmp_path / "lenient")
    got = sorted(
        (int(e["idx"]), e["sentence"].decode(), int(e["label"])) for e in ds.as_numpy_iterator()
    )
    assert got == [(0, "fine", 1), (2, "ok", 0)]  # CRLF dropped, last line without newline kept
    with pytest.raises(DataError, match=r"SST-2/test\.tsv.*gluebenchmark\.com"):
        load_glue("sst2", "test", source_dir=source, tfds_dir=tmp_path / "lenient")
    write(source / "SST-2" / "dev.tsv", "sentence\tlabel\nlate\t1\n")
    with pytest.raises(DataError, match=r"prepared before .*SST-2/dev\.tsv existed"):
        load_glue("sst2", "train+validation", source_dir=source, tfds_dir=tmp_path / "lenient")
    fresh = load_glue(
        "sst2", "train+validation", source_dir=source, tfds_dir=tmp_path / "new", skip_bad_rows=True
    )
    assert sorted(e["sentence"].decode() for e in fresh.as_numpy_iterator()) == [
        "fine",
        "late",
        "ok",
    ]


# ----------------------------------------------------------------------------- features


@pytest.fixture(scope="module")
def tokenizer(vocab_path: pathlib.Path) -> BertTokenizer:
    return BertTokenizer(vocab_path)


def assert_bert_layout(features: dict[str, np.ndarray], tokenizer: BertTokenizer, pair: bool):
    ids, types, mask = features["input_ids"], features["token_type_ids"], features["attention_mask"]
    lengths = mask.sum(axis=1)
    assert (ids[:, 0] == tokenizer.cls_id).all()
    assert (ids[np.arange(len(ids)), lengths - 1] == tokenizer.sep_id).all()
    assert ((ids == tokenizer.sep_id).sum(axis=1) == (2 if pair else 1)).all()
    assert (ids[mask == 0] == tokenizer.pad_id).all()
    positions = np.arange(ids.shape[1])[None, :]
    first_sep = np.argmax(ids == tokenizer.sep_id, axis=1)[:, None]
    expected_types = (positions > first_sep) & (mask == 1) if pair else np.zeros_like(types)
    np.testing.assert_array_equal(types, expected_types.astype(np.int32))


def test_encode_sst2_dev_single_sentences(load, glue_dir, tfds_dir, tokenizer):
    ds = load_glue("sst2", "validation", source_dir=glue_dir, tfds_dir=tfds_dir)
    features = encode_glue(ds, "sst2", tokenizer, max_length=64)
    order = np.argsort(features["idx"])
    features = {k: v[order] for k, v in features.items()}
    assert features["input_ids"].shape == (872, 64)
    for key in ("input_ids", "token_type_ids", "attention_mask", "label", "idx"):
        assert features[key].dtype == np.int32, key
    assert_bert_layout(features, tokenizer, pair=False)
    raw = raw_rows(glue_dir / "SST-2" / "dev.tsv")
    np.testing.assert_array_equal(features["label"], [int(r[1]) for r in raw])
    direct = tokenizer([r[0] for r in raw], max_length=64)
    for key, value in direct.items():
        np.testing.assert_array_equal(features[key], value, err_msg=key)


def test_encode_mrpc_dev_pairs(glue_dir, tokenizer):
    path = glue_dir / "MRPC" / "dev.tsv"
    rows, skipped = read_glue_rows("mrpc", "validation", path)
    features = encode_glue(rows, "mrpc", tokenizer, max_length=48)  # short: forces truncation
    assert skipped == 0 and features["input_ids"].shape == (408, 48)
    assert_bert_layout(features, tokenizer, pair=True)
    raw = raw_rows(path)
    np.testing.assert_array_equal(features["label"], np.int32([int(r[0]) for r in raw]))
    np.testing.assert_array_equal(features["idx"], np.arange(408))
    direct = tokenizer([r[3] for r in raw], [r[4] for r in raw], max_length=48)
    for key, value in direct.items():
        np.testing.assert_array_equal(features[key], value, err_msg=key)
    assert (features["attention_mask"].sum(axis=1) == 48).any()  # some pairs were truncated


def test_encode_stsb_keeps_float_scores(load, tokenizer):
    dev = load("stsb", "validation")
    examples = [{k: dev[k][i] for k in dev} for i in range(5)]  # numpy bytes/scalars, as TFDS gives
    features = encode_glue(examples, "stsb", tokenizer, max_length=32)
    assert features["label"].dtype == np.float32
    np.testing.assert_array_equal(features["label"], dev["label"][:5])
    assert_bert_layout(features, tokenizer, pair=True)


def test_glue_arrays_with_max_examples_encode_the_first_rows_of_the_split(
    data_dir, tfds_dir, tokenizer
):
    """The training loop's reader: batched, and ``max_examples`` reads the first rows only."""
    config = ConfigDict(
        {"data": {"task": "mrpc", "data_dir": str(data_dir), "tfds_dir": str(tfds_dir)}}
    )
    config.data.max_seq_length = 48
    whole = glue_arrays(config, tokenizer, "train")
    first = glue_arrays(config, tokenizer, "train", max_examples=100)
    assert whole["input_ids"].shape == (3668, 48) and first["input_ids"].shape == (100, 48)
    rows = load_glue("mrpc", "train", source_dir=data_dir / "glue", tfds_dir=tfds_dir)
    rows = list(rows.take(100).as_numpy_iterator())  # one at a time, in TFDS's stored order
    direct = tokenizer(
        [r["sentence1"].decode() for r in rows],
        [r["sentence2"].decode() for r in rows],
        max_length=48,
    )
    np.testing.assert_array_equal(first["idx"], [r["idx"] for r in rows])
    np.testing.assert_array_equal(first["label"], [r["label"] for r in rows])
    for key, value in direct.items():
        np.testing.assert_array_equal(first[key], value, err_msg=key)
    for key, value in first.items():
        np.testing.assert_array_equal(whole[key][:100], value, err_msg=key)
