"""SentencePiece vocabularies: training on real WikiText, BERT special ids, the BertTokenizer-style
call API, save/load round trips and the ``train-spm`` CLI (in process and as a subprocess).

Ids are checked against the sentencepiece library's own processor on the same model, so the
[CLS]/[SEP]/type-id/truncation layout is tested independently of the wrapper's encode path.
"""

import gzip
import os
import pickle
import subprocess
import sys

import numpy as np
import pytest
import sentencepiece as spm

from bert_mini.paths import REPO_ROOT
from bert_mini.sentencepiece_tokenizer import (
    SentencePieceTokenizer,
    iter_corpus_lines,
    main,
    train_spm,
    truncate_pair_lengths,
)
from bert_mini.tokenization import SPECIAL_TOKENS, BertTokenizer

VOCAB_SIZE = 1_000


@pytest.fixture(scope="module")
def wiki_valid(data_dir):
    return data_dir / "pretrain" / "wikitext-2-raw" / "wiki.valid.raw"


@pytest.fixture(scope="module")
def model_file(tmp_path_factory, wiki_valid):
    prefix = tmp_path_factory.mktemp("spm") / "wiki"
    return train_spm(str(wiki_valid), prefix, vocab_size=VOCAB_SIZE, input_sentence_size=800)


@pytest.fixture(scope="module")
def tok(model_file):
    return SentencePieceTokenizer(model_file)


@pytest.fixture(scope="module")
def raw_sp(model_file):
    """The library's own processor on the same model: the reference for ids."""
    return spm.SentencePieceProcessor(model_file=str(model_file))


@pytest.fixture(scope="module")
def wiki_lines(wiki_valid):
    lines = [ln.strip() for ln in wiki_valid.read_text(encoding="utf-8").split("\n")]
    return [ln for ln in lines if ln and not ln.startswith("=")][:64]


def test_training_writes_model_and_vocab(model_file, tok):
    assert model_file.name == "wiki.model" and model_file.is_file()
    assert model_file.with_suffix(".vocab").is_file()
    assert tok.vocab_size == VOCAB_SIZE == len(tok.vocab)


def test_special_tokens_at_fixed_ids(tok, raw_sp):
    assert [raw_sp.id_to_piece(i) for i in range(5)] == list(SPECIAL_TOKENS)
    assert (tok.pad_id, tok.unk_id, tok.cls_id, tok.sep_id, tok.mask_id) == (0, 1, 2, 3, 4)
    assert [tok.vocab[t] for t in SPECIAL_TOKENS] == [0, 1, 2, 3, 4]
    assert raw_sp.pad_id() == 0 and raw_sp.unk_id() == 1
    assert raw_sp.bos_id() == -1 and raw_sp.eos_id() == -1
    assert all(raw_sp.is_control(i) for i in (0, 2, 3, 4)) and raw_sp.is_unknown(1)


def test_text_never_encodes_to_control_ids(tok, wiki_lines):
    ids = tok(wiki_lines + ["[CLS] [SEP] [MASK] [PAD] text"], max_length=512, padding="longest")
    inner = ids["input_ids"][:, 1:][ids["attention_mask"][:, 1:] == 1]
    assert not np.isin(inner[inner != tok.sep_id], [0, 2, 4]).any()
    assert (ids["input_ids"][:, 0] == tok.cls_id).all()


def test_lowercase_is_part_of_the_model(tok):
    assert tok.tokenize("The LOBSTER Is Blue") == tok.tokenize("the lobster is blue")


def test_pair_layout_and_token_types(tok, raw_sp):
    a, b = "The European lobster is blue.", "It turns red when cooked."
    ids_a, ids_b = raw_sp.encode(a), raw_sp.encode(b)
    out = tok([a], [b], padding="longest")
    expected = [2, *ids_a, 3, *ids_b, 3]
    assert out["input_ids"].tolist() == [expected]
    assert out["token_type_ids"].tolist() == [[0] * (len(ids_a) + 2) + [1] * (len(ids_b) + 1)]
    assert out["attention_mask"].tolist() == [[1] * len(expected)]
    assert all(v.dtype == np.int32 for v in out.values())
    assert tok.tokenize(a) == raw_sp.encode(a, out_type=str)
    assert tok.convert_tokens_to_ids(tok.tokenize(a)) == ids_a


def test_padding_shapes(tok, wiki_lines):
    fixed = tok(wiki_lines[:5], max_length=40)
    assert {k: v.shape for k, v in fixed.items()} == {
        "input_ids": (5, 40),
        "token_type_ids": (5, 40),
        "attention_mask": (5, 40),
    }
    short = tok(["a b", "a b c d e f"], max_length=64, padding="longest")
    n = short["attention_mask"].sum(axis=1)
    assert short["input_ids"].shape == (2, int(n.max()))
    assert short["input_ids"][0, int(n[0]) :].tolist() == [0] * (int(n.max()) - int(n[0]))
    assert tok([], max_length=8)["input_ids"].shape == (0, 8)


def test_truncation_single_and_longest_first_pairs(tok, raw_sp):
    long_text = " ".join(["lobster"] * 80)
    single = tok([long_text], max_length=16)
    assert single["attention_mask"].sum() == 16
    assert single["input_ids"][0, -1] == tok.sep_id
    assert single["input_ids"][0, 1:15].tolist() == raw_sp.encode(long_text)[:14]

    short = "blue"
    n_short = len(raw_sp.encode(short))
    pair = tok([long_text, long_text], [short, long_text], max_length=21)
    types = pair["token_type_ids"]
    # Long + short: only the long side is cut. Long + long: the 18 slots are split evenly.
    assert (types[0] == 1).sum() == n_short + 1 and (types[0] == 0).sum() == 21 - n_short - 1
    assert (types[1] == 1).sum() == 9 + 1 and (types[1] == 0).sum() == 9 + 2
    assert (pair["input_ids"][:, -1] == tok.sep_id).all()

    with pytest.raises(ValueError, match="row 0 has .* more than max_length=16"):
        tok([long_text], max_length=16, truncation=False)


def test_pair_truncation_matches_bert_tokenizer(vocab_path):
    """Same kept lengths as BertTokenizer (Rust longest_first) for every small length combination."""
    bert = BertTokenizer(vocab_path)  # "a" and "b" are one WordPiece each
    for max_length in range(3, 13):
        for len_a in range(11):
            for len_b in range(11):
                out = bert(["a " * len_a], ["b " * len_b], max_length=max_length)
                types, mask = out["token_type_ids"][0], out["attention_mask"][0]
                kept = (int(((types == 0) & (mask == 1)).sum()) - 2, int(types.sum()) - 1)
                assert truncate_pair_lengths(len_a, len_b, max_length - 3) == kept, (
                    max_length, len_a, len_b,
                )  # fmt: skip


def test_bad_calls_are_errors(tok):
    with pytest.raises(ValueError, match="pairs has 1 items but texts has 2"):
        tok(["a", "b"], ["c"])
    with pytest.raises(TypeError, match=r"texts\[1\] is int"):
        tok(["a", 3])
    with pytest.raises(ValueError, match="padding must be one of"):
        tok(["a"], padding="max")
    with pytest.raises(ValueError, match="max_length=2 is too small"):
        tok(["a"], ["b"], max_length=2)


def test_save_from_pretrained_round_trip(tok, tmp_path, wiki_lines, model_file):
    tok.save(tmp_path / "saved")
    assert (tmp_path / "saved" / "spiece.model").read_bytes() == model_file.read_bytes()
    reference = tok(wiki_lines, wiki_lines[::-1], max_length=96)
    for loaded in (
        SentencePieceTokenizer.from_pretrained(tmp_path / "saved"),
        SentencePieceTokenizer.from_pretrained(tmp_path / "saved" / "spiece.model"),
        pickle.loads(pickle.dumps(tok)),
    ):
        again = loaded(wiki_lines, wiki_lines[::-1], max_length=96)
        for key, value in reference.items():
            np.testing.assert_array_equal(again[key], value)
        assert loaded.vocab == tok.vocab
    assert tok.decode(reference["input_ids"][0]).startswith(wiki_lines[0][:10].lower())


def test_model_without_bert_specials_is_refused(tmp_path, wiki_valid):
    spm.SentencePieceTrainer.train(
        input=str(wiki_valid),
        model_prefix=str(tmp_path / "plain"),
        vocab_size=300,
        model_type="bpe",
        input_sentence_size=200,
        minloglevel=2,
    )
    with pytest.raises(ValueError, match=r"plain\.model: id 0 is '<unk>', expected '\[PAD\]'"):
        SentencePieceTokenizer(tmp_path / "plain.model")
    with pytest.raises(FileNotFoundError, match="missing.model"):
        SentencePieceTokenizer(tmp_path / "missing.model")


def test_corpus_lines_plain_and_gzip(tmp_path, wiki_valid):
    text = "\n".join(wiki_valid.read_text(encoding="utf-8").split("\n")[:200])
    plain, packed = tmp_path / "a.txt", tmp_path / "b.txt.gz"
    plain.write_text(text, encoding="utf-8")
    packed.write_bytes(gzip.compress(text.encode("utf-8")))
    lines = list(iter_corpus_lines([plain]))
    assert lines and lines == list(iter_corpus_lines([packed]))
    assert all(ln and ln == ln.strip() for ln in lines)
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"fine\nbroken \xff byte\n")
    with pytest.raises(ValueError, match=r"bad\.txt:2: not valid UTF-8"):
        list(iter_corpus_lines([bad]))


def test_main_trains_from_several_globs_including_gzip(tmp_path, wiki_valid, capsys):
    lines = wiki_valid.read_text(encoding="utf-8").split("\n")
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "part1.txt").write_text("\n".join(lines[:1500]), encoding="utf-8")
    (tmp_path / "in" / "part2.txt.gz").write_bytes(gzip.compress("\n".join(lines[1500:]).encode()))
    prefix = tmp_path / "out" / "cli"
    status = main(
        [
            "train-spm",
            "--input", str(tmp_path / "in" / "*.txt"),
            "--input", str(tmp_path / "in" / "*.gz"),
            "--model-prefix", str(prefix),
            "--vocab-size", "700",
            "--model-type", "bpe",
            "--input-sentence-size", "600",
        ]
    )  # fmt: skip
    assert status == 0
    assert "cli.model (700 pieces)" in capsys.readouterr().out
    assert SentencePieceTokenizer(f"{prefix}.model").vocab_size == 700


def test_main_errors_are_one_line(tmp_path, capsys):
    pattern = str(tmp_path / "nothing" / "*.txt")
    status = main(["train-spm", "--input", pattern, "--model-prefix", str(tmp_path / "m")])
    err = capsys.readouterr().err
    assert status == 1
    assert err == f"train-spm: error: --input {pattern!r} matched no files\n"
    assert not (tmp_path / "m.model").exists()
    with pytest.raises(FileNotFoundError, match="matched no files"):
        train_spm([pattern], tmp_path / "m")


def test_help_describes_every_flag(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["train-spm", "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for flag in (
        "--input",
        "--model-prefix",
        "--vocab-size",
        "--model-type",
        "--no-lowercase",
        "--input-sentence-size",
    ):
        assert flag in out
    assert "[MASK]=4" in " ".join(out.split())


def test_cli_subprocess_cased_bpe(tmp_path, wiki_valid):
    prefix = tmp_path / "cased"
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    result = subprocess.run(
        [
            sys.executable, "-m", "bert_mini.sentencepiece_tokenizer", "train-spm",
            "--input", str(wiki_valid),
            "--model-prefix", str(prefix),
            "--vocab-size", "800",
            "--model-type", "bpe",
            "--no-lowercase",
            "--input-sentence-size", "500",
        ],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    cased = SentencePieceTokenizer(f"{prefix}.model")
    assert cased.vocab_size == 800
    assert cased.tokenize("The Lobster") != cased.tokenize("the lobster")
    assert [cased.vocab[t] for t in SPECIAL_TOKENS] == [0, 1, 2, 3, 4]
