"""Transfer sets D_T: cleaning, sentence splitting, GLUE/TSV text, dedup, and the TFDS builder.

Everything runs on the real staged files (IMDB, SST-2, MRPC, CoLA); the builder is built with a
small ``max_examples`` from a source folder whose SST-2 train file has dev sentences planted in
it, so the dev/test decontamination is seen to act inside a real build.
"""

import gzip
import itertools

import pytest
import tensorflow_datasets as tfds

from bert_mini.data import transfer as T
from bert_mini.data.sources import DataError, prepare

# ------------------------------------------------------------------------------ cleaning


def test_strip_html_turns_br_into_line_breaks_and_keeps_text_asides():
    raw = "Great.<br /><br />Awful<br/>ending.<BR>Really <i>bad</i> acting <grin>"
    assert T.strip_html(raw) == "Great.\nAwful\nending.\nReally bad acting <grin>"


def test_strip_html_on_text_without_tags_only_collapses_spaces():
    assert T.strip_html("  A  film.   The end. ") == "A film. The end."


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            "Mr. Smith went to Washington. He liked it! Did you?",
            ["Mr. Smith went to Washington.", "He liked it!", "Did you?"],
        ),
        # The staged train/unsup files lost their <br /> tags without a space.
        (
            "Great film.The acting was good (really).So good.",
            ["Great film.", "The acting was good (really).", "So good."],
        ),
        ('He said "Wow." "Really?" she asked.', ['He said "Wow."', '"Really?" she asked.']),
        (
            "Dr. Who and e.g. The Thing. Mt. Fuji too.",
            ["Dr. Who and e.g. The Thing.", "Mt. Fuji too."],
        ),
        ("J. R. R. Tolkien wrote it. I liked it.", ["J. R. R. Tolkien wrote it.", "I liked it."]),
        (
            "It got 3.5 stars... Then I left. version 2.0 is out",
            ["It got 3.5 stars...", "Then I left. version 2.0 is out"],
        ),
        ("Watch it!!! Now. www.imdb.com is fine", ["Watch it!!!", "Now. www.imdb.com is fine"]),
        ("line one\nLine two.\n\n  \nthree", ["line one", "Line two.", "three"]),
        ("", []),
        ("   ", []),
    ],
)
def test_split_sentences_hand_cases(text, expected):
    assert T.split_sentences(text) == expected


def test_word_windows():
    assert T.word_windows("a b c d e\nf g", 3) == ["a b c", "d e f", "g"]
    assert T.word_windows("", 3) == []
    with pytest.raises(ValueError, match="n_words"):
        T.word_windows("a", 0)


def test_sentences_of_real_imdb_reviews(data_dir):
    """Test reviews carry <br /> tags, train reviews have them glued away; both must split."""
    for split in ("test", "train"):
        reviews = list(itertools.islice(T.read_imdb_reviews(data_dir / "imdb", split), 300))
        assert len(reviews) == 300
        sentences = [s for r in reviews for s in T.split_sentences(T.strip_html(r))]
        assert len(sentences) > 2 * len(reviews)
        assert all(s and s == s.strip() and "  " not in s for s in sentences)
        assert not [s for s in sentences if "<br" in s.lower()]
        if split == "test":
            assert sum("<br" in r for r in reviews) > 100  # the tags really were there


def test_imdb_windows(data_dir):
    windows = list(
        itertools.islice(T.imdb_texts(data_dir / "imdb", ("unsup",), "windows", 16), 200)
    )
    assert len(windows) == 200
    assert all(1 <= len(w.split()) <= 16 for w in windows)
    assert sum(len(w.split()) == 16 for w in windows) > 150


# --------------------------------------------------------------------------- GLUE / TSV


def test_sst2_train_text_has_every_row_without_labels(data_dir):
    examples = T.glue_texts(data_dir / "glue", "SST-2")
    assert len(examples) == 67_349
    raw_rows = (data_dir / "glue/SST-2/train.tsv").read_text(encoding="utf-8").split("\n")[1:]
    assert examples[0].text == raw_rows[0].split("\t")[0].strip()
    assert all(e.text_b is None and e.source == "glue/SST-2/train" for e in examples)
    assert all(e.text and e.text == e.text.strip() and "\t" not in e.text for e in examples)


def test_pair_task_text_as_pairs_or_each(data_dir):
    pairs = T.glue_texts(data_dir / "glue", "MRPC", pair_mode="pair")
    each = T.glue_texts(data_dir / "glue", "MRPC", pair_mode="each")
    assert len(pairs) == 3_668
    assert len(each) == 2 * len(pairs)
    assert each[0].text == pairs[0].text and each[1].text == pairs[0].text_b
    assert pairs[0].text.startswith("Amrozi accused his brother")


def test_tsv_column_mrpc_with_bom(data_dir):
    path = data_dir / "glue/MRPC/train.tsv"
    quality = T.tsv_column(path, "Quality")  # the first header field is preceded by a BOM
    assert len(quality) == 3_668
    assert set(quality) == {"0", "1"}
    assert T.tsv_column(path, 3) == T.tsv_column(path, "#1 String")


def test_tsv_column_cola_without_header(data_dir):
    train = T.tsv_column(data_dir / "glue/CoLA/train.tsv", 3, has_header=False)
    labels = T.tsv_column(data_dir / "glue/CoLA/train.tsv", 1, has_header=False)
    assert len(train) == len(labels) == 8_551
    assert set(labels) == {"0", "1"}
    assert train[0] == "Our friends won't buy this analysis, let alone the next one we propose."
    dev = T.tsv_column(data_dir / "glue/CoLA/dev.tsv", 3, has_header=False)  # no final newline
    assert len(dev) == 1_043 and dev[-1]


def test_tsv_errors_name_file_and_line(tmp_path, data_dir):
    bad = tmp_path / "bad.tsv"
    bad.write_text("a\tb\n1\t2\nonly-one\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"bad\.tsv:3: expected at least 2"):
        T.tsv_column(bad, "b")
    with pytest.raises(DataError, match=r"bad\.tsv:1: no column 'c'"):
        T.tsv_column(bad, "c")
    with pytest.raises(DataError, match=r"has_header=False"):
        T.tsv_column(data_dir / "glue/CoLA/train.tsv", "sentence", has_header=False)


def test_missing_files_are_data_errors_that_say_how_to_get_them(tmp_path):
    with pytest.raises(DataError, match=r"train\.tsv\.gz.*BERT_MINI_DATA"):
        next(T.read_imdb_reviews(tmp_path, "train"))
    with pytest.raises(DataError, match=r"SST-2/train\.tsv.*glue/<TASK>"):
        T.glue_texts(tmp_path, "SST-2")
    with pytest.raises(DataError, match=r"expected data file not found: .*nope\.tsv"):
        T.tsv_column(tmp_path / "nope.tsv", 0)
    with pytest.raises(DataError, match=r"not found: .*/(imdb|glue)/.*BERT_MINI_DATA"):
        prepare(T.BertMiniTransfer, source_dir=tmp_path, tfds_dir=tmp_path / "tfds")


def test_malformed_imdb_row_names_the_line(tmp_path):
    with gzip.open(tmp_path / "train.tsv.gz", "wt", encoding="utf-8") as f:
        f.write("id\trating\tlabel\ttext\n0\t9\t1\tGood.\n1\t2\tBad row\n")
    with pytest.raises(DataError, match=r"train\.tsv\.gz:3: expected 4 tab-separated"):
        list(T.read_imdb_reviews(tmp_path, "train"))


# --------------------------------------------------------------------- dedup / overlap


def _detokenize(ptb: str) -> str:
    """An SST-2 (lower-cased, PTB-tokenised) sentence the way a raw review would write it."""
    text = ptb.replace(" n't", "n't").replace(" 's", "'s").replace(" ,", ",").replace(" .", ".")
    return text[:1].upper() + text[1:]


def test_normalize_for_overlap_ignores_ptb_spacing_case_and_accents():
    n = T.normalize_for_overlap
    assert n("it 's a charming journey . ") == n("It's a charming journey.")
    assert n("it does n't work , -lrb- sadly -rrb-") == n("It doesn't work (sadly)")
    assert n("ca n't stop") == n("Can't stop!")
    assert n("café") == n("cafe")
    assert n("a good film") != n("a bad film")


@pytest.fixture(scope="module")
def sst2_eval_texts(data_dir):
    return T.glue_eval_texts(data_dir / "glue", "SST-2")


def test_sst2_eval_texts_are_dev_plus_test(sst2_eval_texts):
    assert len(sst2_eval_texts) == 872 + 1_821


def test_planted_dev_sentences_are_removed_and_counted(data_dir, sst2_eval_texts):
    imdb = list(itertools.islice(T.imdb_texts(data_dir / "imdb", ("train",)), 300))
    dev = T.tsv_column(data_dir / "glue/SST-2/dev.tsv", "sentence")
    planted = dev[:10] + [_detokenize(s) for s in dev[10:20]]
    candidates = imdb[:100] + planted + imdb[100:] + imdb[:5]  # the last 5 are duplicates
    examples = [T.TransferExample(t, None, "mix") for t in candidates]
    kept, report = T.build_transfer_set([("mix", examples, 1, None)], sst2_eval_texts)
    counts = report["mix"]
    assert counts.read == len(candidates)
    assert counts.dropped_overlap >= 20
    assert counts.dropped_duplicate >= 5
    assert counts.kept == len(kept)
    assert counts.read == counts.kept + counts.dropped_overlap + counts.dropped_duplicate
    excluded = {T.normalize_for_overlap(t) for t in sst2_eval_texts}
    assert not [e for e in kept if T.normalize_for_overlap(e.text) in excluded]
    assert len({e.text for e in kept}) == len(kept)
    assert report["total"].as_dict() == counts.as_dict()


def test_sst2_train_deduplicated_against_dev_and_test(data_dir, sst2_eval_texts):
    kept, report = T.build_from_specs([T.GlueSource("SST-2")], data_dir, dedup_task="SST-2")
    c = report["total"]
    assert c.read == 67_349
    assert c.kept + c.dropped_overlap + c.dropped_duplicate + c.dropped_length == c.read
    assert c.dropped_overlap > 0 and c.dropped_duplicate > 0
    excluded = {T.normalize_for_overlap(t) for t in sst2_eval_texts}
    assert not [e for e in kept if T.normalize_for_overlap(e.text) in excluded]


def test_length_filter_and_quota_per_source():
    a = [T.TransferExample(t, None, "a") for t in ["one", "two words", "three words here"] * 2]
    b = [T.TransferExample(f"b {i} x", None, "b") for i in range(10)]
    kept, report = T.build_transfer_set([("a", a, 2, 2), ("b", b, 1, None)], max_examples=5)
    assert [e.text for e in kept] == ["two words", "b 0 x", "b 1 x"]
    assert report["a"].dropped_length == 4 and report["a"].dropped_duplicate == 1
    assert report["b"].kept == 2 and report["total"].kept == 3


# ------------------------------------------------------------------------------ builder


@pytest.fixture(scope="module")
def planted_root(tmp_path_factory, data_dir):
    """A source folder like ../shared/data whose SST-2 train starts with 5 dev sentences."""
    root = tmp_path_factory.mktemp("transfer_src")
    (root / "imdb").symlink_to(data_dir / "imdb", target_is_directory=True)
    sst = root / "glue" / "SST-2"
    sst.mkdir(parents=True)
    for name in ("dev.tsv", "test.tsv"):
        (sst / name).symlink_to(data_dir / "glue/SST-2" / name)
    dev_rows = (data_dir / "glue/SST-2/dev.tsv").read_text(encoding="utf-8").split("\n")[1:6]
    train = (data_dir / "glue/SST-2/train.tsv").read_text(encoding="utf-8").split("\n")
    (sst / "train.tsv").write_text("\n".join([train[0], *dev_rows, *train[1:200]]) + "\n")
    return root


@pytest.fixture(scope="module")
def movie_sst2(planted_root, tmp_path_factory):
    tfds_dir = tmp_path_factory.mktemp("transfer_tfds")
    return prepare(
        T.BertMiniTransfer,
        source_dir=planted_root,
        tfds_dir=tfds_dir,
        config="movie_sst2",
        max_examples=60,
    )


def test_movie_sst2_builder_features_and_sources(movie_sst2):
    assert movie_sst2.info.name == "bert_mini_transfer"
    assert movie_sst2.builder_config.name == "movie_sst2_max60"
    features = movie_sst2.info.features
    assert set(features.keys()) == {"text", "source"}
    assert all(isinstance(features[k], tfds.features.Text) for k in features)
    rows = list(tfds.as_numpy(movie_sst2.as_dataset(split="train")))
    assert len(rows) == 60
    sources = sorted({r["source"].decode() for r in rows})
    assert sources == ["glue/SST-2/train", "imdb/train+test+unsup/sentences"]
    assert all(r["text"].decode().strip() for r in rows)


def test_movie_sst2_builder_drops_planted_dev_sentences(movie_sst2, sst2_eval_texts):
    counts = movie_sst2.info.metadata["counts"]
    assert counts["glue/SST-2/train"]["dropped_overlap"] >= 5
    assert counts["total"]["kept"] == 60
    excluded = {T.normalize_for_overlap(t) for t in sst2_eval_texts}
    texts = [r["text"].decode() for r in tfds.as_numpy(movie_sst2.as_dataset(split="train"))]
    assert not [t for t in texts if T.normalize_for_overlap(t) in excluded]


def test_builder_reload_keeps_counts(movie_sst2):
    again = T.BertMiniTransfer(
        data_dir=movie_sst2.data_dir_root, config="movie_sst2", max_examples=60
    )
    assert again.info.splits["train"].num_examples == 60
    assert again.info.metadata["counts"] == movie_sst2.info.metadata["counts"]


def test_pair_config_has_text_b(data_dir, tmp_path):
    builder = prepare(
        T.BertMiniTransfer,
        source_dir=data_dir,
        tfds_dir=tmp_path,
        config="mrpc_train_pairs",
        max_examples=8,
    )
    assert set(builder.info.features.keys()) == {"text", "text_b", "source"}
    rows = list(tfds.as_numpy(builder.as_dataset(split="train")))
    assert len(rows) == 8 and all(r["text"] and r["text_b"] for r in rows)


def test_unknown_config_name():
    with pytest.raises(ValueError, match="unknown config 'nope'"):
        T.BertMiniTransfer(data_dir="/nonexistent", config="nope", max_examples=3)


def test_default_source_is_the_shared_data_root(data_dir):
    assert (data_dir / T.BertMiniTransfer.DEFAULT_SOURCE / "imdb").is_dir()
    assert str(T.BertMiniTransfer.code_path) == T.__file__
