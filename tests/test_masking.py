"""Dynamic MLM masking: statistics on real Gutenberg text, invariants, seeding, whole words."""

import pathlib

import numpy as np
import pytest
import tensorflow as tf

from bert_mini.data.corpus import read_documents
from bert_mini.data.masking import (
    MaskingConfig,
    continuation_table,
    default_max_predictions,
    mask_batch,
    pretraining_dataset,
)
from bert_mini.data.pipeline import HostShard
from bert_mini.data.pretraining import (
    SpecialIds,
    create_examples,
    examples_dataset,
    tokenize_documents,
)
from bert_mini.tokenization import BertTokenizer

SEQ = 128
BATCH = 256


@pytest.fixture(scope="module")
def tokenizer(vocab_path: pathlib.Path) -> BertTokenizer:
    return BertTokenizer(vocab_path)


@pytest.fixture(scope="module")
def corpus(data_dir: pathlib.Path, tokenizer):
    """The first 3 Gutenberg valid books (about 500k tokens): plenty, and quick to tokenise."""
    documents = list(read_documents([data_dir / "pretrain" / "gutenberg" / "valid.txt.gz"]))
    return tokenize_documents(documents[:3], tokenizer)


@pytest.fixture(scope="module")
def packed(corpus, tokenizer):
    """Full rows (126 maskable tokens -> 19 predictions, below the cap of 20)."""
    examples = create_examples(corpus, SpecialIds.of(tokenizer), max_seq_length=SEQ, seed=0)
    return {key: values[: 4 * BATCH] for key, values in examples.items()}


@pytest.fixture(scope="module")
def pairs(corpus, tokenizer):
    """Pairs with padding and three special tokens per row."""
    examples = create_examples(
        corpus, SpecialIds.of(tokenizer), max_seq_length=SEQ, next_sentence=True, seed=0
    )
    return {key: values[: 2 * BATCH] for key, values in examples.items()}


@pytest.fixture(scope="module")
def masking(tokenizer) -> MaskingConfig:
    return MaskingConfig.from_tokenizer(tokenizer, max_predictions=default_max_predictions(SEQ))


def _masked(examples, masking, *, seed=0, epoch=0, **kwargs):
    """All batches of one epoch (as numpy), concatenated, with the unmasked originals."""
    batches = list(
        pretraining_dataset(examples, BATCH, seed, epoch, masking, **kwargs).as_numpy_iterator()
    )
    return {key: np.concatenate([b[key] for b in batches]) for key in batches[0]}


def _originals(examples, masked):
    """The unmasked rows of ``masked`` (rows are shuffled; token types + mask give no key, so
    match each masked row to its source by the tokens it kept)."""
    ids = examples["input_ids"]
    index = {row.tobytes(): i for i, row in enumerate(ids)}
    restored = masked["input_ids"].copy()
    rows = np.arange(len(restored))[:, None]
    weights = masked["masked_weights"] > 0
    restored[rows, masked["masked_positions"]] = np.where(
        weights, masked["masked_ids"], restored[rows, masked["masked_positions"]]
    )
    return ids[[index[row.tobytes()] for row in restored]]


def _special_table(masking) -> np.ndarray:
    table = np.zeros(masking.vocab_size, bool)
    table[list(masking.special_ids)] = True
    return table


def test_default_max_predictions():
    assert default_max_predictions(128) == 20
    assert default_max_predictions(512) == 80
    assert default_max_predictions(64) == 12


def test_masking_statistics_on_real_text(packed, masking, tokenizer):
    out = _masked(packed, masking)
    original = _originals(packed, out)
    special = _special_table(masking)
    maskable = ~special[original] & (out["attention_mask"] == 1)
    weights = out["masked_weights"]
    assert out["masked_positions"].shape == (len(original), 20)
    assert out["masked_positions"].dtype == np.int32 and out["masked_ids"].dtype == np.int32
    assert weights.dtype == np.float32 and set(np.unique(weights)) <= {0.0, 1.0}

    # How many: round(15%) of the maskable tokens per row (the cap of 20 is not binding here).
    num_maskable = maskable.sum(axis=1)
    assert maskable.sum() >= 100_000
    expected = np.clip(np.round(0.15 * num_maskable), 1, 20)
    assert np.array_equal(weights.sum(axis=1), expected)
    assert abs(weights.sum() / maskable.sum() - 0.15) <= 0.005

    # Where: real, non-special positions, ascending, distinct; unused slots are 0 / 0 / 0.0.
    rows = np.arange(len(original))[:, None]
    positions, ids = out["masked_positions"], out["masked_ids"]
    used = weights > 0
    assert np.all(maskable[rows, positions][used])
    assert np.all(np.diff(np.where(used, positions, 10_000), axis=1) > 0)
    assert np.all(positions[~used] == 0) and np.all(ids[~used] == 0)
    assert np.array_equal(ids[used], original[rows, positions][used])

    # What: 80% [MASK], 10% random, 10% kept; nothing else changes.
    chosen = np.zeros_like(maskable)
    chosen[rows.repeat(20, axis=1)[used], positions[used]] = True
    masked_ids = out["input_ids"]
    assert np.array_equal(masked_ids[~chosen], original[~chosen])
    new, old = masked_ids[chosen], original[chosen]
    as_mask = np.mean(new == tokenizer.mask_id)
    kept = np.mean(new == old)
    replaced = new[(new != tokenizer.mask_id) & (new != old)]
    assert abs(as_mask - 0.8) <= 0.01
    assert abs(kept - 0.1) <= 0.01
    assert abs(len(replaced) / len(new) - 0.1) <= 0.01
    assert not special[replaced].any()
    assert len(np.unique(replaced)) > 0.8 * len(replaced)  # spread over the vocabulary


def test_special_tokens_and_padding_are_never_masked(pairs, masking):
    out = _masked(pairs, masking, epoch=3)
    original = _originals(pairs, out)
    special = _special_table(masking)
    rows = np.arange(len(original))[:, None]
    used = out["masked_weights"] > 0
    at = original[rows, out["masked_positions"]]
    assert not special[at[used]].any()
    assert np.all(out["attention_mask"][rows, out["masked_positions"]][used] == 1)
    # [CLS], [SEP] and [PAD] stay exactly where they were.
    kept = special[original]
    assert np.array_equal(out["input_ids"][kept], original[kept])
    maskable = (~special[original] & (out["attention_mask"] == 1)).sum(axis=1)
    expected = np.minimum(np.clip(np.round(0.15 * maskable), 1, 20), maskable)
    assert np.array_equal(used.sum(axis=1), expected)


def test_rows_without_maskable_tokens_and_more_slots_than_tokens(masking, tokenizer):
    ids = np.array([[101, 102, 0, 0, 0, 0], [101, 2023, 2003, 1037, 3231, 102]], np.int32)
    batch = {"input_ids": ids, "attention_mask": (ids != 0).astype(np.int32)}
    out = mask_batch(
        batch,
        seed=1,
        epoch=0,
        batch_index=0,
        vocab_size=masking.vocab_size,
        mask_id=masking.mask_id,
        special_ids=masking.special_ids,
        max_predictions=20,
    )
    assert out["masked_positions"].shape == (2, 20)
    assert np.array_equal(out["masked_weights"].numpy().sum(axis=1), [0, 1])  # at least 1
    assert np.array_equal(out["input_ids"][0].numpy(), ids[0])


def test_masks_are_seeded_per_epoch_and_resumable(packed, masking):
    dataset = examples_dataset(packed)
    first = _masked(dataset, masking, seed=5, epoch=2)
    again = _masked(dataset, masking, seed=5, epoch=2)
    for key in first:
        assert np.array_equal(first[key], again[key]), key
    next_epoch = _masked(dataset, masking, seed=5, epoch=3)
    other_seed = _masked(dataset, masking, seed=6, epoch=2)
    assert not np.array_equal(first["input_ids"], next_epoch["input_ids"])
    assert not np.array_equal(first["input_ids"], other_seed["input_ids"])

    # Same rows, new masks: mask the same batch under two epochs directly.
    batch = {k: v[:BATCH] for k, v in packed.items()}
    kwargs = dict(
        batch_index=tf.constant(0, tf.int64),
        vocab_size=masking.vocab_size,
        mask_id=masking.mask_id,
        special_ids=masking.special_ids,
        max_predictions=20,
    )
    epoch0 = mask_batch(batch, seed=5, epoch=0, **kwargs)["masked_positions"].numpy()
    epoch1 = mask_batch(batch, seed=5, epoch=1, **kwargs)["masked_positions"].numpy()
    assert np.mean(np.all(epoch0 == epoch1, axis=1)) < 0.01

    # A resumed epoch (skip 2 batches) yields exactly the uninterrupted run's batches 2 and 3.
    resumed = _masked(dataset, masking, seed=5, epoch=2, skip_batches=2)
    for key in first:
        assert np.array_equal(resumed[key], first[key][2 * BATCH :]), key


def test_dataset_and_array_inputs_agree(packed, masking):
    from_arrays = _masked(packed, masking, seed=1, epoch=0)
    from_dataset = _masked(examples_dataset(packed), masking, seed=1, epoch=0)
    for out in (from_arrays, from_dataset):
        assert out["input_ids"].shape == (4 * BATCH, SEQ)
        assert out["masked_positions"].shape == (4 * BATCH, 20)
    # Every row is used once either way, so the number of predictions agrees.
    assert from_arrays["masked_weights"].sum() == from_dataset["masked_weights"].sum()


def _words(ids_row, is_continuation, maskable_row):
    """Word spans (start, end) of maskable tokens: a ## piece continues the previous token."""
    spans, start = [], None
    for pos, token in enumerate(ids_row):
        if not maskable_row[pos]:
            if start is not None:
                spans.append((start, pos))
            start = None
        elif start is None or not is_continuation[token]:
            if start is not None:
                spans.append((start, pos))
            start = pos
    if start is not None:
        spans.append((start, len(ids_row)))
    return spans


def _split_word_counts(out, original, table, special):
    """(words masked in part, words masked in whole, multi-piece words seen) over all rows."""
    partial = whole = multi = 0
    for row in range(len(original)):
        chosen = np.zeros(SEQ, bool)
        used = out["masked_weights"][row] > 0
        chosen[out["masked_positions"][row][used]] = True
        maskable = ~special[original[row]] & (out["attention_mask"][row] == 1)
        for start, end in _words(original[row], table, maskable):
            multi += end - start > 1
            hits = chosen[start:end].sum()
            if 0 < hits < end - start:
                partial += 1
            elif hits and end - start > 1:
                whole += 1
    return partial, whole, multi


def test_whole_word_masking_masks_all_pieces_together(packed, tokenizer):
    table = continuation_table(tokenizer.vocab)
    assert table[tokenizer.vocab["##ing"]] and not table[tokenizer.vocab["sing"]]
    subset = {k: v[:BATCH] for k, v in packed.items()}
    whole_word = MaskingConfig.from_tokenizer(tokenizer, whole_word=True)
    per_token = MaskingConfig.from_tokenizer(tokenizer)
    special = _special_table(whole_word)

    out = _masked(subset, whole_word, seed=2)
    original = _originals(subset, out)
    partial, whole, multi = _split_word_counts(out, original, table, special)
    assert multi > 1000 and whole > 50
    assert partial == 0
    counts = out["masked_weights"].sum(axis=1)
    assert np.all(counts <= 19) and counts.mean() > 17  # words rarely overshoot the budget

    # The per-token recipe does split words, so the check above can fail.
    out = _masked(subset, per_token, seed=2)
    partial, _, _ = _split_word_counts(out, _originals(subset, out), table, special)
    assert partial > 50

    with pytest.raises(ValueError, match="continuation_table"):
        mask_batch(
            subset,
            seed=0,
            epoch=0,
            batch_index=0,
            vocab_size=whole_word.vocab_size,
            mask_id=whole_word.mask_id,
            special_ids=whole_word.special_ids,
            max_predictions=20,
            whole_word=True,
        )


@pytest.mark.parametrize("as_dataset", [False, True])
def test_each_host_masks_only_its_own_slice(packed, masking, as_dataset):
    rows = {**packed, "row": np.arange(len(packed["input_ids"]), dtype=np.int32)}
    seen = []
    for index in range(2):
        source = examples_dataset(rows) if as_dataset else rows
        out = _masked(source, masking, seed=4, shard=HostShard(index, 2))
        assert len(out["row"]) == 2 * BATCH  # half the rows per host, per-host batch BATCH
        seen.append(set(out["row"].tolist()))
    assert not seen[0] & seen[1]
    assert seen[0] | seen[1] == set(range(4 * BATCH))
