"""Dynamic masked-LM masking of whole batches inside tf.data (BERT's 15% / 80-10-10 recipe).

Examples are stored unmasked (``bert_mini.data.pretraining``) and masked here per batch, so every
epoch sees new masks (RoBERTa's dynamic masking) at no storage cost. All randomness comes from
stateless Philox draws keyed by ``(seed, epoch, batch index[, shard])``: the same epoch and batch
always get the same masks, on any machine, which is what makes a resumed run exact.

Per row: ``n = round(mask_prob * maskable tokens)``, clipped to ``[1, max_predictions]``, where
maskable means a real (attention) token that is not special. Selection is vectorised: every word
gets a random score, tokens are sorted by their word's score, and a word is taken while the running
token count stays within ``n``. Without whole-word masking each token is its own word; with it, a
``##`` piece belongs to the word before it (so all pieces are masked together). Each chosen token
then becomes ``[MASK]`` (80%), a random non-special token (10%) or stays itself (10%).
"""

import dataclasses
import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import tensorflow as tf

from bert_mini.data.pipeline import HostShard, epoch_batches, epoch_seed
from bert_mini.tokenization import BertTokenizer

_ALG = "philox"
_INT32_MAX = 2**31 - 1  # fixed so masks do not depend on the device TF runs the op on
_SPECIAL_TOKEN_RE = re.compile(r"^\[[^\]]+\]$")  # [PAD], [CLS], [unused7], ...


def default_max_predictions(max_seq_length: int, mask_prob: float = 0.15) -> int:
    """Prediction slots per row: ``mask_prob * S`` rounded up to a multiple of 4 (20 at 128,
    80 at 512, Google's values)."""
    return 4 * math.ceil(max_seq_length * mask_prob / 4)


def continuation_table(vocab: Mapping[str, int]) -> np.ndarray:
    """bool [V]: True for WordPiece continuations (``##ing``), for whole-word masking."""
    table = np.zeros(max(vocab.values()) + 1, bool)
    for token, index in vocab.items():
        table[index] = token.startswith("##")
    return table


@dataclasses.dataclass(frozen=True)
class MaskingConfig:
    """Everything ``mask_batch`` needs besides the batch and the randomness keys."""

    vocab_size: int
    mask_id: int
    special_ids: tuple[int, ...]
    max_predictions: int = 20
    mask_prob: float = 0.15
    whole_word: bool = False
    continuation_table: np.ndarray | None = dataclasses.field(default=None, compare=False)

    @classmethod
    def from_tokenizer(
        cls,
        tokenizer: BertTokenizer,
        *,
        max_predictions: int = 20,
        mask_prob: float = 0.15,
        whole_word: bool = False,
    ) -> "MaskingConfig":
        """Special = every bracketed token (``[PAD]``, ``[CLS]``, ``[SEP]``, ``[UNK]``,
        ``[MASK]``, ``[unused*]``): never masked, never drawn as a random replacement."""
        special = tuple(sorted(i for t, i in tokenizer.vocab.items() if _SPECIAL_TOKEN_RE.match(t)))
        return cls(
            vocab_size=tokenizer.vocab_size,
            mask_id=tokenizer.mask_id,
            special_ids=special,
            max_predictions=max_predictions,
            mask_prob=mask_prob,
            whole_word=whole_word,
            continuation_table=continuation_table(tokenizer.vocab) if whole_word else None,
        )

    def __call__(
        self,
        batch: dict[str, tf.Tensor],
        *,
        seed: int,
        epoch: int | tf.Tensor,
        batch_index: tf.Tensor,
        shard_index: int = 0,
    ) -> dict[str, tf.Tensor]:
        return mask_batch(
            batch,
            seed=seed,
            epoch=epoch,
            batch_index=batch_index,
            shard_index=shard_index,
            vocab_size=self.vocab_size,
            mask_id=self.mask_id,
            special_ids=self.special_ids,
            max_predictions=self.max_predictions,
            mask_prob=self.mask_prob,
            whole_word=self.whole_word,
            continuation_table=self.continuation_table,
        )


def batch_key(seed: int, epoch: Any, batch_index: Any, shard_index: int = 0) -> tf.Tensor:
    """The stateless RNG key [2] of one batch: ``seed`` folded with epoch, batch and shard."""
    key = tf.constant([seed & 0x7FFFFFFFFFFFFFFF, 0x5EED], tf.int64)
    for data in (epoch, batch_index, shard_index):
        key = tf.random.experimental.stateless_fold_in(key, tf.cast(data, tf.int64), alg=_ALG)
    return key


def mask_batch(
    batch: dict[str, tf.Tensor],
    *,
    seed: int,
    epoch: int | tf.Tensor,
    batch_index: int | tf.Tensor,
    vocab_size: int,
    mask_id: int,
    special_ids: Sequence[int],
    max_predictions: int,
    mask_prob: float = 0.15,
    whole_word: bool = False,
    continuation_table: np.ndarray | None = None,
    shard_index: int = 0,
) -> dict[str, tf.Tensor]:
    """Masks ``input_ids`` [B, S] and adds ``masked_positions`` / ``masked_ids`` [B, P] int32 and
    ``masked_weights`` [B, P] float32 (0 for unused slots; positions ascending, then 0s).

    ``attention_mask`` (if present) marks real tokens; ``special_ids`` are never masked.
    ``continuation_table`` (bool [V], see ``continuation_table()``) is required for
    ``whole_word``.
    """
    if whole_word and continuation_table is None:
        raise ValueError("whole_word masking needs continuation_table (bool per vocab id)")
    ids_BxS = tf.convert_to_tensor(batch["input_ids"])
    ids_BxS = tf.cast(ids_BxS, tf.int32)
    shape = tf.shape(ids_BxS)
    rows, seq_len = shape[0], shape[1]

    special_V = np.zeros(vocab_size, bool)
    special_V[np.asarray(special_ids, np.int64)] = True
    maskable_BxS = ~tf.gather(tf.constant(special_V), ids_BxS)
    if "attention_mask" in batch:
        maskable_BxS &= tf.cast(batch["attention_mask"], tf.int32) > 0

    key = batch_key(seed, epoch, batch_index, shard_index)
    select_key, action_key, replace_key = tf.unstack(
        tf.random.experimental.stateless_split(key, 3, alg=_ALG)
    )
    num_maskable_B = tf.reduce_sum(tf.cast(maskable_BxS, tf.int32), axis=1)
    wanted_B = tf.cast(tf.round(tf.cast(num_maskable_B, tf.float32) * mask_prob), tf.int32)
    num_to_predict_B = tf.minimum(tf.clip_by_value(wanted_B, 1, max_predictions), num_maskable_B)

    if whole_word:
        is_continuation_BxS = tf.gather(tf.constant(continuation_table, tf.bool), ids_BxS)
    else:
        is_continuation_BxS = tf.zeros_like(maskable_BxS)
    chosen_BxS = _choose_words(
        maskable_BxS, is_continuation_BxS, num_to_predict_B, max_predictions, select_key, whole_word
    )

    # 80% [MASK], 10% random non-special token, 10% unchanged.
    action_BxS = tf.random.stateless_uniform(shape, action_key, alg=_ALG)
    candidates = tf.constant(np.flatnonzero(~special_V).astype(np.int32))
    random_index_BxS = tf.random.stateless_uniform(
        shape, replace_key, minval=0, maxval=tf.size(candidates), dtype=tf.int32, alg=_ALG
    )
    random_ids_BxS = tf.gather(candidates, random_index_BxS)
    masked_input_BxS = tf.where(
        chosen_BxS & (action_BxS < 0.8),
        mask_id,
        tf.where(chosen_BxS & (action_BxS < 0.9), random_ids_BxS, ids_BxS),
    )

    # Chosen positions into slots 0.. in ascending order (at most n <= P per row).
    positions_BxS = tf.broadcast_to(tf.range(seq_len)[None, :], shape)
    slot_BxS = tf.cumsum(tf.cast(chosen_BxS, tf.int32), axis=1, exclusive=True)
    num_slots = rows * max_predictions
    flat_slot_BxS = tf.where(
        chosen_BxS, tf.range(rows)[:, None] * max_predictions + slot_BxS, num_slots
    )
    position_plus_one = tf.math.unsorted_segment_sum(
        positions_BxS + 1, flat_slot_BxS, num_slots + 1
    )[:num_slots]
    position_plus_one_BxP = tf.reshape(position_plus_one, [rows, max_predictions])
    valid_BxP = position_plus_one_BxP > 0
    masked_positions_BxP = tf.maximum(position_plus_one_BxP - 1, 0)
    masked_ids_BxP = tf.where(valid_BxP, tf.gather(ids_BxS, masked_positions_BxP, batch_dims=1), 0)
    out = dict(batch)
    out["input_ids"] = masked_input_BxS
    out["masked_positions"] = masked_positions_BxP
    out["masked_ids"] = masked_ids_BxP
    out["masked_weights"] = tf.cast(valid_BxP, tf.float32)
    return out


def _choose_words(
    maskable_BxS: tf.Tensor,
    is_continuation_BxS: tf.Tensor,
    num_to_predict_B: tf.Tensor,
    max_predictions: int,
    key: tf.Tensor,
    whole_word: bool,
) -> tf.Tensor:
    """Whole words in random order while the running token count stays within ``n`` per row.

    A word starts at a maskable token that is no ``##`` piece or follows a non-maskable token
    (without whole-word masking every maskable token starts its own word). Each word gets a
    unique random int key (random high bits, position low bits, so no ties); ``top_k`` finds the
    ``P`` lowest, a cumulative sum of their lengths says how many fit, and every token whose
    word key is at most the last fitting key is chosen. No full sort: ``top_k`` with small ``k``
    is several times cheaper than ``argsort`` on CPU.
    """
    shape = tf.shape(maskable_BxS)
    rows, seq_len = shape[0], shape[1]
    positions_BxS = tf.broadcast_to(tf.range(seq_len)[None, :], shape)
    previous_maskable_BxS = tf.pad(maskable_BxS[:, :-1], [[0, 0], [1, 0]])
    word_start_BxS = maskable_BxS & (~is_continuation_BxS | ~previous_maskable_BxS)

    high_bits = tf.random.stateless_uniform(
        shape, key, minval=0, maxval=_INT32_MAX // seq_len, dtype=tf.int32, alg=_ALG
    )
    start_key_BxS = tf.where(word_start_BxS, high_bits * seq_len + positions_BxS, _INT32_MAX)
    if whole_word:
        word_number_BxS = tf.cumsum(tf.cast(word_start_BxS, tf.int32), axis=1)
        num_segments = rows * (seq_len + 1) + 1  # the last one collects non-maskable tokens
        segment_BxS = tf.where(
            maskable_BxS,
            tf.range(rows)[:, None] * (seq_len + 1) + word_number_BxS,
            num_segments - 1,
        )
        word_key = tf.math.unsorted_segment_min(start_key_BxS, segment_BxS, num_segments)
        word_length = tf.math.unsorted_segment_sum(
            tf.cast(maskable_BxS, tf.int32), segment_BxS, num_segments
        )
        token_key_BxS = tf.gather(word_key, segment_BxS)
        length_at_start_BxS = tf.gather(word_length, segment_BxS)
    else:
        token_key_BxS = start_key_BxS
        length_at_start_BxS = tf.ones_like(start_key_BxS)

    k = tf.minimum(max_predictions, seq_len)
    negated_BxK, start_index_BxK = tf.math.top_k(-start_key_BxS, k=k)
    lowest_keys_BxK = -negated_BxK
    is_word_BxK = lowest_keys_BxK < _INT32_MAX
    lengths_BxK = tf.where(
        is_word_BxK, tf.gather(length_at_start_BxS, start_index_BxK, batch_dims=1), seq_len + 1
    )
    fits_BxK = tf.cumsum(lengths_BxK, axis=1) <= num_to_predict_B[:, None]
    threshold_B = tf.reduce_max(tf.where(fits_BxK, lowest_keys_BxK, -1), axis=1)
    return maskable_BxS & (token_key_BxS <= threshold_B[:, None])


def pretraining_dataset(
    examples: tf.data.Dataset | Mapping[str, np.ndarray | tf.Tensor],
    batch_size: int,
    seed: int,
    epoch: int,
    masking: MaskingConfig,
    *,
    skip_batches: int = 0,
    shuffle_buffer: int | None = None,
    shard: HostShard | None = None,
) -> tf.data.Dataset:
    """One epoch of masked pre-training batches: seeded shuffle, ``drop_remainder`` batches,
    masking keyed by the batch index, prefetch.

    ``examples`` is a dataset of single examples or, faster, the arrays themselves
    (``create_pretraining_examples`` output, or those arrays as tensors to avoid a copy per
    epoch): then a shuffled index range is batched and rows are gathered, instead of shuffling
    and batching example dicts one by one. ``skip_batches`` resumes mid-epoch exactly (skipped
    batches are not masked). Each host reads only every ``shard.count``-th example (its own
    slice), ``batch_size`` is the per-host batch, and masks are keyed by ``shard.index`` too.
    """

    shard = shard or HostShard()

    def transform(batch: dict[str, tf.Tensor], index: tf.Tensor) -> dict[str, tf.Tensor]:
        return masking(batch, seed=seed, epoch=epoch, batch_index=index, shard_index=shard.index)

    if isinstance(examples, tf.data.Dataset):
        return epoch_batches(
            examples.shard(shard.count, shard.index),
            batch_size,
            seed=seed,
            epoch=epoch,
            skip_batches=skip_batches,
            shuffle_buffer=shuffle_buffer,
            transform=transform,
        )
    tensors = {
        key: tf.convert_to_tensor(values)[shard.index :: shard.count]
        for key, values in examples.items()
    }
    num_examples = int(tensors["input_ids"].shape[0])
    order = tf.data.Dataset.range(num_examples).shuffle(
        shuffle_buffer or max(num_examples, 1),
        seed=epoch_seed(seed, epoch),
        reshuffle_each_iteration=False,
    )

    def gather_and_mask(index: tf.Tensor, rows: tf.Tensor) -> dict[str, tf.Tensor]:
        return transform({key: tf.gather(values, rows) for key, values in tensors.items()}, index)

    return (
        order.batch(batch_size, drop_remainder=True)
        .enumerate()
        .skip(skip_batches)
        .map(gather_and_mask, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
        .prefetch(tf.data.AUTOTUNE)
    )
