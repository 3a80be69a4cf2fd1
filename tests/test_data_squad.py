"""SQuAD v1.1: the TFDS builder on the real dev file, fine-tuning windows, and the official metric.

The dev set is built once per module into a temporary TFDS folder; windows are cut over all
10,570 dev questions with the Rust tokenizer (a few seconds).
"""

import dataclasses
import json
import pathlib
import shutil

import numpy as np
import pytest
import tensorflow_datasets as tfds

from bert_mini.data import squad
from bert_mini.data.sources import DataError
from bert_mini.tokenization import BertTokenizer

N_ARTICLES, N_PARAGRAPHS, N_QUESTIONS = 48, 2067, 10570


# ----------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def squad_dir(data_dir: pathlib.Path) -> pathlib.Path:
    return data_dir / "squad"


@pytest.fixture(scope="module")
def tfds_dir(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    return tmp_path_factory.mktemp("tfds_squad")


@pytest.fixture(scope="module")
def dev_builder(squad_dir: pathlib.Path, tfds_dir: pathlib.Path) -> squad.BertMiniSquad:
    return squad.squad_builder(squad_dir, tfds_dir)


def _decode(example: dict) -> dict:
    """tfds.as_numpy record -> plain str/int record (what the JSON file holds)."""
    answers = example["answers"]
    return {
        "id": example["id"].decode(),
        "title": example["title"].decode(),
        "context": example["context"].decode(),
        "question": example["question"].decode(),
        "answers": {
            "text": [t.decode() for t in answers["text"]],
            "answer_start": [int(s) for s in answers["answer_start"]],
        },
    }


@pytest.fixture(scope="module")
def dev_examples(
    dev_builder: squad.BertMiniSquad, squad_dir: pathlib.Path, tfds_dir: pathlib.Path
) -> list[dict]:
    ds = squad.load_squad("validation", source_dir=squad_dir, tfds_dir=tfds_dir)
    return _decode_all(ds)


def _decode_all(ds) -> list[dict]:
    """Every record of ``ds`` as plain Python; ragged batches are ~5x faster than one by one."""
    examples = []
    for batch in tfds.as_numpy(ds.ragged_batch(4096)):
        answers = batch["answers"]
        texts, starts = answers["text"].to_list(), answers["answer_start"].to_list()
        for i in range(len(batch["id"])):
            one = {key: batch[key][i] for key in ("id", "title", "context", "question")}
            one["answers"] = {"text": texts[i], "answer_start": starts[i]}
            examples.append(_decode(one))
    return examples


@pytest.fixture(scope="module")
def tokenizer(vocab_path: pathlib.Path) -> BertTokenizer:
    return BertTokenizer(vocab_path)


@pytest.fixture(scope="module")
def dev_windows(dev_examples: list[dict], tokenizer: BertTokenizer) -> squad.SquadFeatures:
    return squad.make_squad_windows(
        dev_examples,
        tokenizer,
        max_seq_length=384,
        doc_stride=128,
        max_query_length=64,
        training=True,
    )


# ------------------------------------------------------------------------------------ builder


def test_dev_counts_and_splits(dev_builder: squad.BertMiniSquad, dev_examples: list[dict]):
    assert set(dev_builder.info.splits) == {"validation"}  # train-v1.1.json is not staged
    assert dev_builder.info.splits["validation"].num_examples == N_QUESTIONS
    assert len(dev_examples) == N_QUESTIONS
    assert len({ex["id"] for ex in dev_examples}) == N_QUESTIONS
    assert len({ex["title"] for ex in dev_examples}) == N_ARTICLES
    assert len({(ex["title"], ex["context"]) for ex in dev_examples}) == N_PARAGRAPHS
    # every dev question has several crowd answers, each a span of its paragraph
    for ex in dev_examples:
        answers = ex["answers"]
        assert len(answers["text"]) >= 1
        for text, start in zip(answers["text"], answers["answer_start"], strict=True):
            assert ex["context"][start : start + len(text)] == text, ex["id"]


def test_features_equal_catalog_offline(dev_builder: squad.BertMiniSquad, tmp_path: pathlib.Path):
    # The catalog's builder info needs no download; this machine has no network.
    catalog = tfds.builder(squad.CATALOG_NAME, data_dir=str(tmp_path))
    assert catalog.info.features.to_json() == dev_builder.info.features.to_json()
    assert repr(catalog.info.features) == repr(dev_builder.info.features)
    assert dev_builder.name == "bert_mini_squad"
    assert str(dev_builder.version) == "1.0.0"


def test_examples_equal_catalog_generator(dev_examples: list[dict], squad_dir: pathlib.Path):
    """Same records as the catalog's own SQuAD-like generator over the same file."""
    from tensorflow_datasets.question_answering import qa_utils

    reference = dict(qa_utils.generate_squadlike_examples(str(squad_dir / "dev-v1.1.json")))
    ours = {ex["id"]: ex for ex in dev_examples}
    assert ours.keys() == reference.keys()
    for qid, ref in reference.items():
        assert ours[qid] == ref, qid


def test_missing_train_split(squad_dir: pathlib.Path, tfds_dir: pathlib.Path):
    with pytest.raises(DataError, match=r"train-v1\.1\.json.*SQuAD-explorer"):
        squad.load_squad("train", source_dir=squad_dir, tfds_dir=tfds_dir)
    with pytest.raises(DataError, match=r"train-v1\.1\.json"):
        squad.load_squad("validation+train", source_dir=squad_dir, tfds_dir=tfds_dir)
    with pytest.raises(ValueError, match="unknown SQuAD split 'test'"):
        squad.load_squad("test", source_dir=squad_dir, tfds_dir=tfds_dir)


def test_split_slicing(squad_dir: pathlib.Path, tfds_dir: pathlib.Path, dev_examples: list[dict]):
    ds = squad.load_squad("validation[:5]", source_dir=squad_dir, tfds_dir=tfds_dir)
    assert [_decode(ex) for ex in tfds.as_numpy(ds)] == dev_examples[:5]


def _tiny_squad(question: dict | None = None) -> dict:
    qa = {"id": "q1", "question": "Who?", "answers": [{"text": "Ann", "answer_start": 0}]}
    if question is not None:
        qa = question
    return {
        "version": "1.1",
        "data": [{"title": "T", "paragraphs": [{"context": "Ann ran.", "qas": [qa]}]}],
    }


def test_malformed_json_is_a_data_error(tmp_path: pathlib.Path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "dev-v1.1.json").write_text('{"version": "1.1",\n "data": [', encoding="utf-8")
    with pytest.raises(DataError, match=r"dev-v1\.1\.json:2:\d+: malformed JSON"):
        squad.load_squad("validation", source_dir=src, tfds_dir=tmp_path / "tfds")


def test_missing_key_names_file_key_and_question(tmp_path: pathlib.Path):
    src = tmp_path / "src"
    src.mkdir()
    record = {"id": "q-no-question", "answers": [{"text": "Ann", "answer_start": 0}]}
    (src / "dev-v1.1.json").write_text(json.dumps(_tiny_squad(record)), encoding="utf-8")
    with pytest.raises(
        DataError, match=r"dev-v1\.1\.json.*'q-no-question'.*missing key 'question'"
    ):
        squad.load_squad("validation", source_dir=src, tfds_dir=tmp_path / "tfds")


@pytest.mark.parametrize(
    ("record", "pattern"),
    [
        ({"id": "q7", "question": "?"}, r"question id 'q7': missing key 'answers'"),
        (
            {"id": "q8", "question": "?", "answers": [{"answer_start": 0}]},
            r"question id 'q8' answers\[0\]: missing key 'text'",
        ),
        (
            {"id": "q9", "question": "?", "answers": [{"text": "A", "answer_start": "0"}]},
            r"question id 'q9' answers\[0\]: key 'answer_start' is str, expected int",
        ),
        ({"question": "?", "answers": []}, r"paragraphs\[0\].*qas\[0\]: missing key 'id'"),
    ],
)
def test_bad_records(tmp_path: pathlib.Path, record: dict, pattern: str):
    path = tmp_path / "dev-v1.1.json"
    path.write_text(json.dumps(_tiny_squad(record)), encoding="utf-8")
    with pytest.raises(DataError, match=pattern) as info:
        list(squad.read_squad_json(path))
    assert str(path) in str(info.value)


def test_stale_build_without_new_split(tmp_path: pathlib.Path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "dev-v1.1.json").write_text(json.dumps(_tiny_squad()), encoding="utf-8")
    ds = squad.load_squad("validation", source_dir=src, tfds_dir=tmp_path / "tfds")
    assert [_decode(ex)["id"] for ex in tfds.as_numpy(ds)] == ["q1"]
    shutil.copy(src / "dev-v1.1.json", src / "train-v1.1.json")
    with pytest.raises(DataError, match="no 'train' split; delete that folder"):
        squad.load_squad("train", source_dir=src, tfds_dir=tmp_path / "tfds")
    fresh = squad.load_squad("train", source_dir=src, tfds_dir=tmp_path / "tfds2")
    assert [_decode(ex)["id"] for ex in tfds.as_numpy(fresh)] == ["q1"]


def test_catalog_source_switch(monkeypatch: pytest.MonkeyPatch, tmp_path: pathlib.Path):
    calls = []
    monkeypatch.setattr(squad.tfds, "load", lambda name, **kw: calls.append((name, kw)) or "ds")
    assert squad.load_squad("train", source="tfds:squad/v1.1", tfds_dir=tmp_path) == "ds"
    assert calls == [
        ("squad/v1.1", {"split": "train", "data_dir": str(tmp_path), "shuffle_files": False})
    ]
    with pytest.raises(ValueError, match="unknown SQuAD source"):
        squad.load_squad("train", source="hub")


# ------------------------------------------------------------------------------------ windows


def _reference_is_max_context(spans: list[tuple[int, int]], span_index: int, position: int) -> bool:
    """Google run_squad.py's ``_check_is_max_context``, verbatim logic."""
    best_score, best_index = None, None
    for index, (start, length) in enumerate(spans):
        end = start + length - 1
        if position < start or position > end:
            continue
        score = min(position - start, end - position) + 0.01 * length
        if best_score is None or score > best_score:
            best_score, best_index = score, index
    return span_index == best_index


def _check_windows(
    feats: squad.SquadFeatures,
    examples: list[dict],
    tokenizer: BertTokenizer,
    seq: int,
    stride: int,
    max_query: int,
) -> None:
    """Layout, stride, coverage and max-context checks against independent tokenization."""
    assert feats.input_ids_NxS.shape == (len(feats), seq)
    for name in ("input_ids_NxS", "token_type_ids_NxS", "attention_mask_NxS", "example_index_N"):
        assert getattr(feats, name).dtype == np.int32, name
    assert feats.token_is_max_context_NxS.shape == (len(feats), seq)
    np.testing.assert_array_equal(feats.example_index_N, [w.example_index for w in feats.windows])
    # windows come grouped by example, in order, and every example has at least one
    assert np.all(np.diff(feats.example_index_N) >= 0)
    assert set(feats.example_index_N.tolist()) == set(range(len(examples)))

    by_example: dict[int, list[int]] = {}
    for i, w in enumerate(feats.windows):
        by_example.setdefault(w.example_index, []).append(i)
    cls_id, sep_id, pad_id = tokenizer.cls_id, tokenizer.sep_id, tokenizer.pad_id
    for ex_idx, rows in by_example.items():
        ex = examples[ex_idx]
        q_ids = tokenizer.convert_tokens_to_ids(tokenizer.tokenize(ex["question"]))[:max_query]
        c_ids = tokenizer.convert_tokens_to_ids(tokenizer.tokenize(ex["context"]))
        cpos = len(q_ids) + 2
        max_doc = seq - len(q_ids) - 3
        spans = [(feats.windows[i].doc_start, feats.windows[i].doc_length) for i in rows]
        owners = np.zeros(len(c_ids), dtype=np.int64)
        for k, i in enumerate(rows):
            w = feats.windows[i]
            start, length = spans[k]
            assert w.example_id == ex["id"] and w.context is not None
            assert w.context_position == cpos
            end = cpos + length
            expected = [cls_id, *q_ids, sep_id, *c_ids[start : start + length], sep_id]
            assert feats.input_ids_NxS[i, : end + 1].tolist() == expected
            assert np.all(feats.input_ids_NxS[i, end + 1 :] == pad_id)
            assert feats.attention_mask_NxS[i].tolist() == [1] * (end + 1) + [0] * (seq - end - 1)
            types = [0] * cpos + [1] * (length + 1) + [0] * (seq - end - 1)
            assert feats.token_type_ids_NxS[i].tolist() == types
            # offsets only on context tokens, increasing, inside the context
            ctx_offsets = w.offset_mapping[cpos:end]
            assert all(o is None for o in w.offset_mapping[:cpos] + w.offset_mapping[end:])
            assert all(0 <= a < b <= len(ex["context"]) for a, b in ctx_offsets)
            assert all(p[1] <= q[0] for p, q in zip(ctx_offsets, ctx_offsets[1:], strict=False))
            # run_squad.py windows: starts doc_stride apart, full length except the last
            if k + 1 < len(rows):
                assert length == max_doc
                assert spans[k + 1][0] == start + stride
                assert start + length > spans[k + 1][0]  # they overlap, by length - stride
            else:
                assert start + length == len(c_ids)
            flags = feats.token_is_max_context_NxS[i]
            assert not flags[:cpos].any() and not flags[end:].any()
            assert np.array_equal(w.token_is_max_context, flags)
            for j in range(length):
                assert flags[cpos + j] == _reference_is_max_context(spans, k, start + j)
                owners[start + j] += int(flags[cpos + j])
        assert spans[0][0] == 0
        covered = np.zeros(len(c_ids), dtype=bool)
        for start, length in spans:
            covered[start : start + length] = True
        assert covered.all(), f"{ex['id']}: context tokens in no window"
        assert np.all(owners == 1), f"{ex['id']}: token_is_max_context not unique per token"


def _label_checks(feats: squad.SquadFeatures, examples: list[dict]) -> dict[str, int]:
    """Map every labelled window back to text; count per question how the answer comes back."""
    counts = {"in_window": 0, "char_exact": 0, "normalized": 0, "mismatch": 0}
    status: dict[int, str] = {}
    for i, w in enumerate(feats.windows):
        start, end = int(feats.start_positions_N[i]), int(feats.end_positions_N[i])
        answer = examples[w.example_index]["answers"]["text"][0]
        a_start = examples[w.example_index]["answers"]["answer_start"][0]
        ctx = w.offset_mapping[w.context_position : w.context_position + w.doc_length]
        inside = ctx[0][0] <= a_start and a_start + len(answer) <= ctx[-1][1]
        if (start, end) == (0, 0):
            # (0, 0) only when the answer is not fully inside this window's characters
            assert not inside, w.example_id
            continue
        assert 0 < start <= end < w.context_position + w.doc_length
        assert inside, w.example_id
        text = squad.window_span_to_text(w, start, end)
        if text == answer:
            kind = "char_exact"
        elif squad.normalize_answer(text) == squad.normalize_answer(answer):
            kind = "normalized"
        else:
            kind = "mismatch"
            # the window's span covers the answer: it is cut inside a word piece
            assert answer in text, (w.example_id, answer, text)
        # all windows holding the answer agree
        assert status.setdefault(w.example_index, kind) == kind
    for kind in status.values():
        counts["in_window"] += 1
        counts[kind] += 1
    return counts


def test_dev_windows_recover_answers(
    dev_windows: squad.SquadFeatures, dev_examples: list[dict], record_property
):
    counts = _label_checks(dev_windows, dev_examples)
    recoverable = counts["char_exact"] + counts["normalized"]
    not_recoverable = N_QUESTIONS - recoverable
    print(
        f"SQuAD dev windows: {len(dev_windows)} windows, {counts}, not recoverable {not_recoverable}"
    )
    for key, value in counts.items():
        record_property(key, value)
    record_property("not_recoverable", not_recoverable)
    assert counts["in_window"] == N_QUESTIONS  # 384/128 windows always fit a dev answer
    assert recoverable >= 0.99 * N_QUESTIONS
    assert len(dev_windows) > N_QUESTIONS  # some paragraphs need more than one window


def test_dev_windows_layout(
    dev_windows: squad.SquadFeatures, dev_examples: list[dict], tokenizer: BertTokenizer
):
    # the full layout check on the multi-window examples and a spread of the rest
    multi = {w.example_index for w in dev_windows.windows if w.doc_start > 0}
    assert multi
    chosen = sorted(multi | set(range(0, N_QUESTIONS, 97)))
    rows = [i for i, w in enumerate(dev_windows.windows) if w.example_index in set(chosen)]
    sub = _subset(dev_windows, rows, chosen)
    _check_windows(sub, [dev_examples[i] for i in chosen], tokenizer, 384, 128, 64)


def _subset(feats: squad.SquadFeatures, rows: list[int], chosen: list[int]) -> squad.SquadFeatures:
    """Rows of ``feats`` with example indices renumbered into ``chosen``."""
    remap = {old: new for new, old in enumerate(chosen)}
    windows = [
        dataclasses.replace(feats.windows[i], example_index=remap[feats.windows[i].example_index])
        for i in rows
    ]
    return squad.SquadFeatures(
        input_ids_NxS=feats.input_ids_NxS[rows],
        token_type_ids_NxS=feats.token_type_ids_NxS[rows],
        attention_mask_NxS=feats.attention_mask_NxS[rows],
        example_index_N=np.array([w.example_index for w in windows], dtype=np.int32),
        token_is_max_context_NxS=feats.token_is_max_context_NxS[rows],
        windows=windows,
        start_positions_N=feats.start_positions_N[rows],
        end_positions_N=feats.end_positions_N[rows],
    )


def test_small_windows(dev_examples: list[dict], tokenizer: BertTokenizer):
    # long paragraphs (one question each) so every example needs several windows
    by_context = {ex["context"]: ex for ex in dev_examples if len(ex["context"]) > 700}
    examples = list(by_context.values())[:: len(by_context) // 12][:12]
    feats = squad.make_squad_windows(
        examples, tokenizer, max_seq_length=64, doc_stride=16, max_query_length=10, training=True
    )
    per_example = np.bincount(feats.example_index_N, minlength=len(examples))
    assert len(examples) == 12 and per_example.min() >= 5  # 130+ tokens, 51-token windows
    _check_windows(feats, examples, tokenizer, 64, 16, 10)
    counts = _label_checks(feats, examples)
    assert counts["in_window"] == counts["char_exact"] == len(examples)
    # every labelled window holds the answer; others point at [CLS]
    labelled = feats.start_positions_N > 0
    assert labelled.any() and (~labelled).any()
    assert np.all(feats.start_positions_N[~labelled] == 0)
    assert np.all(feats.end_positions_N[~labelled] == 0)
    # questions longer than max_query_length are cut to it
    assert max(w.context_position for w in feats.windows) == 10 + 2
    assert len(feats.example_ids) == len(feats.offset_mapping) == len(feats)

    # eval windows are the same minus the labels
    eval_feats = squad.make_squad_windows(
        examples, tokenizer, max_seq_length=64, doc_stride=16, max_query_length=10, training=False
    )
    assert eval_feats.start_positions_N is None and "start_positions" not in eval_feats.arrays()
    np.testing.assert_array_equal(eval_feats.input_ids_NxS, feats.input_ids_NxS)
    np.testing.assert_array_equal(
        eval_feats.token_is_max_context_NxS, feats.token_is_max_context_NxS
    )


def test_labels_at_window_edges(tokenizer: BertTokenizer):
    """An answer one token past a window's end, or starting inside it, points at [CLS] there."""
    context = " ".join(str(i) for i in range(100))  # token i is the number i
    assert len(tokenizer.tokenize(context)) == 100
    example = {
        "id": "edges",
        "question": "q?",  # 2 tokens: context starts at position 4, 32 - 5 = 27 per window
        "context": context,
        "answers": {"text": ["24 25 26 27"], "answer_start": [context.index(" 24 ") + 1]},
    }
    feats = squad.make_squad_windows(
        [example], tokenizer, max_seq_length=32, doc_stride=8, max_query_length=8, training=True
    )
    assert [w.doc_start for w in feats.windows] == list(range(0, 81, 8))
    labels = list(
        zip(feats.start_positions_N.tolist(), feats.end_positions_N.tolist(), strict=True)
    )
    # [0, 27) misses token 27; [8, 35), [16, 43), [24, 51) hold 24..27; later ones miss 24
    assert labels == [(0, 0), (20, 23), (12, 15), (4, 7)] + [(0, 0)] * 7
    for i in (1, 2, 3):
        text = squad.window_span_to_text(feats.windows[i], *labels[i])
        assert text == "24 25 26 27"


def test_window_errors(dev_examples: list[dict], tokenizer: BertTokenizer):
    with pytest.raises(ValueError, match="leaves no room for context"):
        squad.make_squad_windows(
            dev_examples[:1], tokenizer, max_seq_length=8, max_query_length=64, training=True
        )
    feats = squad.make_squad_windows(dev_examples[:1], tokenizer, training=False)
    w = feats.windows[0]
    with pytest.raises(ValueError, match="not a context token"):
        squad.window_span_to_text(w, 0, w.context_position)
    with pytest.raises(ValueError, match="is after"):
        squad.window_span_to_text(w, w.context_position + 1, w.context_position)
    first = squad.window_span_to_text(w, w.context_position, w.context_position)
    assert w.context.startswith(first)


def test_unicode_offsets_are_character_exact(tokenizer: BertTokenizer):
    # accents are stripped and case is folded for the ids, yet spans come from the raw text
    context = "Der Café in İstanbul kostet 500 € — naïve Straße."
    start = context.index("İstanbul kostet")
    example = {
        "id": "u1",
        "question": "Where is the café?",
        "context": context,
        "answers": {"text": ["İstanbul kostet"], "answer_start": [start]},
    }
    feats = squad.make_squad_windows([example], tokenizer, training=True)
    w = feats.windows[0]
    text = squad.window_span_to_text(w, feats.start_positions_N[0], feats.end_positions_N[0])
    assert text == "İstanbul kostet"


# -------------------------------------------------------------------------------- EM / F1


@pytest.mark.parametrize(
    ("text", "normalized"),
    [
        ("The Eiffel Tower", "eiffel tower"),
        ("  A  an the, Apple. ", "apple"),
        ("Denver Broncos!", "denver broncos"),
        ("the-end", "theend"),  # punctuation goes before articles are removed
        ("Theatre and a\tband", "theatre and band"),  # 'the' only as a whole word
        ("£1,000 (approx.)", "£1000 approx"),  # only ASCII punctuation is removed
    ],
)
def test_normalize_answer(text: str, normalized: str):
    assert squad.normalize_answer(text) == normalized


def test_exact_match_and_f1_official_cases():
    assert squad.exact_match("The Eiffel Tower", ["eiffel tower"]) == 1.0
    assert squad.exact_match("Eiffel Tower.", "the eiffel tower") == 1.0
    assert squad.exact_match("Eiffel", ["eiffel tower"]) == 0.0
    assert squad.exact_match("Denver", ["Broncos", "Denver Broncos", "denver"]) == 1.0
    # precision 3/4, recall 1 -> 2 * 0.75 / 1.75
    assert squad.f1_score("the cat sat on the mat", ["cat on mat"]) == pytest.approx(6 / 7)
    assert squad.f1_score("x b b", ["b b c"]) == pytest.approx(2 / 3)  # counts, not sets
    assert squad.f1_score("a b b", ["b b c"]) == pytest.approx(0.8)  # 'a' is an article: P 1
    assert squad.f1_score("Eiffel", ["the Eiffel Tower"]) == pytest.approx(2 / 3)
    assert squad.f1_score("Paris", ["London", "Paris, France"]) == pytest.approx(2 / 3)
    assert squad.f1_score("", ["Paris"]) == 0.0
    assert squad.f1_score("the", ["a"]) == 0.0  # both normalise to nothing: v1.1 gives 0
    assert squad.f1_score("The Eiffel Tower", ["eiffel tower"]) == 1.0
    with pytest.raises(ValueError, match="ground_truths is empty"):
        squad.exact_match("x", [])
