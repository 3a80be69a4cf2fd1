"""The BERT family in Flax NNX: embeddings, post-LN encoder, pooler and task heads.

One ``BertModel`` class covers all 24 compact BERTs of Turc et al. (2019), Base and Large, and any
odd shape a checkpoint brings. Design choices, and why:

- **Parameters only in the state.** Dropout modules hold no RNG; the caller passes ``rngs`` with a
  ``dropout`` stream when training, so ``nnx.split(model)`` yields a pure parameter tree that jitted
  step functions can take, shard and donate.
- **Logical axis names on every parameter** (``vocab``, ``embed``, ``heads``, ``mlp``; ``None`` for
  small or square matrices), stored as ``out_sharding`` metadata. Mesh rules that map them to
  ``data`` / ``fsdp`` / ``tensor`` live in the training config, not here. Attention kernels keep
  the checkpoint layout ``[hidden, heads * head_dim]`` (axis ``heads``) so import needs no reshape.
- **Separate compute and parameter dtypes.** Matmuls run in ``config.dtype`` (bf16 on
  accelerators); parameters, LayerNorm statistics, the attention softmax and every head's
  logits stay in float32.
- **Masked-LM logits only where asked.** Given ``masked_positions`` [B, P] the MLM head gathers
  those positions first (Google's ``gather_indexes``), so the vocabulary projection costs P rather
  than S rows: for BERT-Tiny at S=128, P=20 this is most of the training FLOPs.
- **The last layer only where the heads read** (``heads_only=True``, what the train steps use). The
  pooler and NSP read [CLS], the MLM head the masked positions; every other row of the last
  layer's queries, attention output and feed-forward block is computed and thrown away by the
  usual implementations (HF, Google). Keys and values still come from every row, so the rows that
  are computed hold the full pass's values (up to float rounding); for BERT-Mini fine-tuning at
  128 tokens, 21% of the step's FLOPs go away.
- **Cheap dropout masks.** ``Dropout`` draws four 16-bit uniforms from each Threefry block
  (``nnx.Dropout`` spends a whole block per element), with the hash unrolled (JAX's primitive
  is a loop on CPU), and packs the keep bits 32 to a word in one pass. Every op that reads the
  mask, forward and backward, unpacks its bit instead of re-hashing: 6% of a BERT-Mini
  fine-tuning step on a 2-core CPU.
- **Gradients in the cheaper order.** Every dense layer (and the tied decoder) computes its
  kernel gradient ``x^T @ dy`` as ``(dy^T @ x)^T`` when ``x`` is the wider operand, with the
  narrower one copied transposed and both transposes fenced off from the matmul on a CPU, so
  YNNPACK rather than Eigen runs it (``summed_outer_products``); attention's key
  and value gradients are computed transposed (``attention_scores``, ``attention_context``);
  sums over the batch (position-embedding and MLM-bias gradients) are ones-vector matmuls
  (``sum_over_examples``).
"""

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
from flax import nnx

from bert_mini import config_lib


def gelu_erf(x: jax.Array) -> jax.Array:
    """The exact GELU ``x/2 (1 + erf(x/sqrt 2))``, written as HF writes it.

    ``jax.nn.gelu(approximate=False)`` goes through ``erfc``, whose exponential costs a fused
    pass of its own on a CPU; ``erf`` is one rational polynomial.
    """
    return 0.5 * x * (1.0 + jax.lax.erf(x * jnp.asarray(1.0 / math.sqrt(2.0), x.dtype)))


ACTIVATIONS = {
    "gelu": gelu_erf,  # exact erf form (HF "gelu")
    "gelu_tanh": lambda x: jax.nn.gelu(x, approximate=True),  # Google's BERT code, HF "gelu_new"
    "relu": jax.nn.relu,
}

# What each public ``head`` choice builds. Classification and regression share one dense layer;
# they differ only in ``num_labels`` (1 for regression) and in the loss.
HEAD_CHOICES: dict[str | None, tuple[str, ...]] = {
    None: (),
    "mlm": ("mlm",),
    "pretraining": ("mlm", "nsp"),
    "classification": ("classifier",),
    "regression": ("classifier",),
    "span": ("span",),
}

_MASK_VALUE = -1e9  # large negative added to attention scores of padding keys (fp32)
_DROPOUT_LEVELS = 2**16  # dropout compares 16-bit uniforms with round(rate * 2**16)
_KEEP_BITS_PER_WORD = 32  # keep bits packed per uint32 word: 8 Threefry blocks of 4 uniforms


@dataclasses.dataclass(frozen=True)
class BertConfig:
    """Every field of Google's ``bert_config.json`` and HF's ``config.json``, plus dtypes.

    ``hidden_act`` names the exact function: ``gelu`` is the erf form, ``gelu_tanh`` the tanh
    approximation that Google's TF code computes (even though its configs say ``gelu``).
    ``dtype`` is the compute dtype; ``param_dtype`` the storage dtype of parameters.
    """

    vocab_size: int = 30522
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    initializer_range: float = 0.02
    dtype: str = "float32"
    param_dtype: str = "float32"

    def __post_init__(self) -> None:
        if self.hidden_act not in ACTIVATIONS:
            raise ValueError(
                f"unknown hidden_act {self.hidden_act!r}; choose one of {sorted(ACTIVATIONS)}"
            )
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size {self.hidden_size} is not divisible by "
                f"num_attention_heads {self.num_attention_heads}"
            )
        for field in ("dtype", "param_dtype"):
            name = getattr(self, field)
            if name not in ("float32", "bfloat16", "float16"):
                raise ValueError(f"{field} must be float32, bfloat16 or float16, not {name!r}")

    @classmethod
    def from_variant(cls, variant: str, **overrides: Any) -> "BertConfig":
        """A config for a size-table entry (``mini``, ``L-4_H-256``, ``uncased_L-4_H-256_A-4``)."""
        return cls(**{**config_lib.variant_dims(variant), **overrides})

    @classmethod
    def from_dict(cls, values: Mapping[str, Any], source: str = "config") -> "BertConfig":
        """Builds a config from known keys; an unknown key is an error naming it and ``source``."""
        names = {field.name for field in dataclasses.fields(cls)}
        unknown = sorted(set(values) - names)
        if unknown:
            raise ValueError(f"{source}: unknown BertConfig key(s) {unknown}")
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


@flax.struct.dataclass
class BertOutput:
    """What a forward pass returns; head fields are ``None`` when the model lacks that head.

    ``mlm_logits`` is [B, P, V] at the given masked positions, or [B, S, V] when none are given.
    ``logits`` is [B, num_labels] (classification; [B, 1] for regression).
    """

    sequence_output: jax.Array
    pooled_output: jax.Array
    mlm_logits: jax.Array | None = None
    nsp_logits: jax.Array | None = None
    logits: jax.Array | None = None
    start_logits: jax.Array | None = None
    end_logits: jax.Array | None = None


def _init(config: BertConfig) -> nnx.Initializer:
    """BERT's initializer: a normal truncated at two standard deviations."""
    return nnx.initializers.truncated_normal(stddev=config.initializer_range)


def _axes(*names: str | None) -> dict[str, Any]:
    """Logical axis metadata; eager sharding off so a model can be built without a mesh."""
    return {"out_sharding": names, "eager_sharding": False}


def _dense(
    config: BertConfig,
    in_features: int,
    out_features: int,
    axes: tuple[str | None, str | None],
    rngs: nnx.Rngs,
) -> nnx.Linear:
    return nnx.Linear(
        in_features,
        out_features,
        dtype=jnp.dtype(config.dtype),
        param_dtype=jnp.dtype(config.param_dtype),
        kernel_init=_init(config),
        kernel_metadata=_axes(*axes),
        bias_metadata=_axes(axes[1]),
        dot_general=dense_dot_general,
        rngs=rngs,
    )


def _layer_norm(config: BertConfig, rngs: nnx.Rngs) -> nnx.LayerNorm:
    return nnx.LayerNorm(
        config.hidden_size,
        epsilon=config.layer_norm_eps,
        dtype=jnp.dtype(config.dtype),
        param_dtype=jnp.dtype(config.param_dtype),
        use_fast_variance=False,  # two-pass variance, as the reference implementations
        scale_metadata=_axes("embed"),
        bias_metadata=_axes("embed"),
        rngs=rngs,
    )


def _embed(config: BertConfig, rows: int, axis: str | None, rngs: nnx.Rngs) -> nnx.Embed:
    return nnx.Embed(
        rows,
        config.hidden_size,
        dtype=jnp.dtype(config.dtype),
        param_dtype=jnp.dtype(config.param_dtype),
        embedding_init=_init(config),
        embedding_metadata=_axes(axis, "embed"),
        rngs=rngs,
    )


def _flat_index(shape: tuple[int, ...]) -> jax.Array:
    """uint32 row-major position of every element: an iota the SPMD partitioner can split."""
    index = jnp.zeros(shape, jnp.uint32)
    stride = 1
    for axis in reversed(range(len(shape))):
        index = index + jax.lax.broadcasted_iota(jnp.uint32, shape, axis) * jnp.uint32(stride)
        stride *= shape[axis]
    return index


_THREEFRY_ROTATIONS = ((13, 15, 26, 6), (17, 29, 16, 24))


def threefry2x32(
    key_0: jax.Array, key_1: jax.Array, count_0: jax.Array, count_1: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """Threefry-2x32 (20 rounds), unrolled, elementwise: the bits of ``threefry2x32_p``.

    JAX lowers its primitive on CPU as a 5-trip while loop, which XLA cannot fuse and which
    copies its state every trip; unrolled, the hash fuses into the ops that read the bits.
    """
    keys = (key_0, key_1, key_0 ^ key_1 ^ jnp.uint32(0x1BD11BDA))
    x = [count_0 + keys[0], count_1 + keys[1]]
    for block in range(5):
        for rotation in _THREEFRY_ROTATIONS[block % 2]:
            x[0] = x[0] + x[1]
            x[1] = (x[1] << rotation) | (x[1] >> (32 - rotation))
            x[1] = x[0] ^ x[1]
        x[0] = x[0] + keys[(block + 1) % 3]
        x[1] = x[1] + keys[(block + 2) % 3] + jnp.uint32(block + 1)
    return x[0], x[1]


def dropout_keep_probability(rate: float) -> float:
    """The exact keep probability of ``dropout_keep_mask``'s 16-bit threshold."""
    return 1.0 - round(rate * _DROPOUT_LEVELS) / _DROPOUT_LEVELS


def _threefry_keep_bits(key: jax.Array, blocks_shape: tuple[int, ...], threshold: int) -> jax.Array:
    """uint32 [*blocks_shape]: bit q (0-3) is 1 when 16-bit uniform q of the block is kept.

    Block ``i`` (row-major position in ``blocks_shape``) hashes counter ``(0, i)`` under ``key``;
    its 64 bits are four 16-bit uniforms, low half of the high word first.
    """
    key_words = jax.random.key_data(key)
    high_bits, low_bits = threefry2x32(
        key_words[0], key_words[1], jnp.zeros(blocks_shape, jnp.uint32), _flat_index(blocks_shape)
    )
    uniforms = (high_bits & 0xFFFF, high_bits >> 16, low_bits & 0xFFFF, low_bits >> 16)
    bits = [(uniform >= threshold).astype(jnp.uint32) << q for q, uniform in enumerate(uniforms)]
    return bits[0] | bits[1] | bits[2] | bits[3]


def packed_dropout_keep_mask(key: jax.Array, shape: tuple[int, ...], rate: float) -> jax.Array:
    """uint32 [*shape[:-1], ceil(n / 32)]: bit ``b`` of word ``w`` keeps element ``32 w + b``.

    Word ``w`` of a row packs the 4 keep bits of each of its 8 Threefry blocks, block ``8 w + i``
    giving elements ``32 w + 4 i`` to ``32 w + 4 i + 3``. The packing is a sum over an axis of 8,
    a reduction, which XLA materialises once rather than fusing (and re-hashing) into every op
    that reads the mask: forward, backward and the transposed copies of both.
    """
    threshold = round(rate * _DROPOUT_LEVELS)
    words_per_row = -(-shape[-1] // _KEEP_BITS_PER_WORD)
    blocks_shape = (*shape[:-1], words_per_row, _KEEP_BITS_PER_WORD // 4)
    nibbles = _threefry_keep_bits(key, blocks_shape, threshold)
    block_in_word = jax.lax.broadcasted_iota(jnp.uint32, blocks_shape, len(blocks_shape) - 1)
    return jnp.sum(nibbles << (4 * block_in_word), axis=-1, dtype=jnp.uint32)


def unpack_keep_mask(packed: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """The boolean mask [*shape] of ``packed_dropout_keep_mask``: a broadcast, a shift, a mask.

    Every element reads its own word and bit, so XLA fuses this into the ops that read the mask
    (measured on a 2-core CPU, a [32, 4, 128, 128] masked scaling: 0.5 ms unpacking, 3.2 ms
    hashing in place).
    """
    bits_shape = (*packed.shape, _KEEP_BITS_PER_WORD)
    bit = jax.lax.broadcasted_iota(jnp.uint32, bits_shape, len(bits_shape) - 1)
    keep = ((packed[..., None] >> bit) & 1) != 0
    return keep.reshape(*shape[:-1], -1)[..., : shape[-1]]


def dropout_keep_mask(key: jax.Array, shape: tuple[int, ...], rate: float) -> jax.Array:
    """A boolean keep mask with P(keep) = 1 - round(rate * 2**16) / 2**16.

    Each Threefry-2x32 block gives 64 random bits, cut into four 16-bit uniforms for four
    neighbouring elements of a row; an element is dropped when its uniform is below the
    threshold. The keep probability is within 2**-17 of ``1 - rate``; ``Dropout`` rescales by
    the exact one, so the layer stays unbiased. The bits are hashed once into a packed mask
    (``packed_dropout_keep_mask``) and unpacked where they are read. Keys of other PRNG
    implementations fall back to ``bernoulli``.
    """
    words_per_row = -(-shape[-1] // _KEEP_BITS_PER_WORD) if shape else 0
    blocks = math.prod(shape[:-1]) * words_per_row * (_KEEP_BITS_PER_WORD // 4)
    if not shape or str(jax.random.key_impl(key)) != "threefry2x32" or blocks >= 2**32:
        return jax.random.bernoulli(key, dropout_keep_probability(rate), shape)
    return unpack_keep_mask(packed_dropout_keep_mask(key, shape, rate), shape)


class Dropout(nnx.Module):
    """Inverted dropout with ``nnx.Dropout``'s call API and ``dropout_keep_mask``'s cheaper mask.

    Kept values are scaled by the exact keep probability of the 16-bit threshold, so the output
    is unbiased; the ``dropout`` stream of ``rngs`` gives one key per call, as in NNX.
    """

    def __init__(self, rate: float):
        if not 0.0 <= rate <= 1.0:
            raise ValueError(f"dropout rate must be in [0, 1], got {rate}")
        self.rate = rate

    def __call__(
        self, inputs: jax.Array, *, deterministic: bool, rngs: nnx.Rngs | None = None
    ) -> jax.Array:
        if deterministic or self.rate == 0.0:
            return inputs
        if rngs is None:
            raise ValueError("dropout needs rngs=nnx.Rngs(dropout=key) when deterministic=False")
        keep_prob = dropout_keep_probability(self.rate)
        if keep_prob == 0.0:
            return jnp.zeros_like(inputs)
        keep = dropout_keep_mask(rngs.dropout(), inputs.shape, self.rate)
        scale = jnp.asarray(1.0 / keep_prob, inputs.dtype)  # a multiply, as PyTorch's dropout
        return jnp.where(keep, inputs * scale, 0).astype(inputs.dtype)


def sum_over_examples(values_Bx___: jax.Array) -> jax.Array:
    """``values.sum(0)`` as a ones-vector matmul.

    XLA's CPU backend hands a reduction over the leading axis to YNNPACK, which runs it up to
    30x slower than this matmul on two threads (measured: [32, 128, 256] -> [128, 256] in
    5.9 ms as a reduce, 0.2-0.3 ms as a matmul; likewise the [N, V] logit gradient's column
    sums). The sum is the same up to float rounding.
    """
    ones_B = jnp.ones(values_Bx___.shape[:1], values_Bx___.dtype)
    return jnp.einsum("b,b...->...", ones_B, values_Bx___)


@jax.custom_vjp
def add_to_every_example(batch_BxSxH: jax.Array, shared_SxH: jax.Array) -> jax.Array:
    """``batch + shared[None]``, as for position embeddings; gradient via ``sum_over_examples``."""
    return batch_BxSxH + shared_SxH[None]


def _add_to_every_example_forward(
    batch_BxSxH: jax.Array, shared_SxH: jax.Array
) -> tuple[jax.Array, jax.Array]:
    # The residual is a zero-size array that only carries the dtype of ``shared``.
    return add_to_every_example(batch_BxSxH, shared_SxH), jnp.zeros((0,), shared_SxH.dtype)


def _add_to_every_example_backward(
    shared_dtype_0: jax.Array, doutputs_BxSxH: jax.Array
) -> tuple[jax.Array, jax.Array]:
    return doutputs_BxSxH, sum_over_examples(doutputs_BxSxH).astype(shared_dtype_0.dtype)


add_to_every_example.defvjp(_add_to_every_example_forward, _add_to_every_example_backward)


class Embeddings(nnx.Module):
    """Word + position + token-type embeddings, then LayerNorm and dropout."""

    def __init__(self, config: BertConfig, rngs: nnx.Rngs):
        self.max_positions = config.max_position_embeddings
        self.word_embeddings = _embed(config, config.vocab_size, "vocab", rngs)
        self.position_embeddings = _embed(config, config.max_position_embeddings, None, rngs)
        self.token_type_embeddings = _embed(config, config.type_vocab_size, None, rngs)
        self.layer_norm = _layer_norm(config, rngs)
        self.dropout = Dropout(config.hidden_dropout_prob)

    def __call__(
        self,
        input_ids_BxS: jax.Array,
        token_type_ids_BxS: jax.Array,
        deterministic: bool,
        rngs: nnx.Rngs | None,
    ) -> jax.Array:
        seq_len = input_ids_BxS.shape[1]
        if seq_len > self.max_positions:
            raise ValueError(
                f"input length {seq_len} exceeds max_position_embeddings {self.max_positions}"
            )
        # Positions 0..S-1 are a slice of the table: its gradient is a pad, not a scatter.
        positions = self.position_embeddings
        (table_PxH,) = positions.promote_dtype(
            (positions.embedding[...],), dtype=positions.dtype, inexact=False
        )
        positions_SxH = table_PxH[:seq_len]
        embedded_BxSxH = add_to_every_example(
            self.word_embeddings(input_ids_BxS), positions_SxH
        ) + self.token_type_embeddings(token_type_ids_BxS)
        embedded_BxSxH = self.layer_norm(embedded_BxSxH)
        return self.dropout(embedded_BxSxH, deterministic=deterministic, rngs=rngs)


class SelfAttention(nnx.Module):
    """Multi-head self-attention with a padding mask, output projection, residual and LayerNorm."""

    def __init__(self, config: BertConfig, rngs: nnx.Rngs):
        hidden = config.hidden_size
        self.num_heads = config.num_attention_heads
        self.head_dim = config.head_dim
        self.query = _dense(config, hidden, hidden, ("embed", "heads"), rngs)
        self.key = _dense(config, hidden, hidden, ("embed", "heads"), rngs)
        self.value = _dense(config, hidden, hidden, ("embed", "heads"), rngs)
        self.output = _dense(config, hidden, hidden, ("heads", "embed"), rngs)
        self.layer_norm = _layer_norm(config, rngs)
        self.attention_dropout = Dropout(config.attention_probs_dropout_prob)
        self.output_dropout = Dropout(config.hidden_dropout_prob)

    def __call__(
        self,
        hidden_BxSxH: jax.Array,
        key_mask_Bx1x1xS: jax.Array,
        deterministic: bool,
        rngs: nnx.Rngs | None,
        query_positions_BxR: jax.Array | None = None,
    ) -> jax.Array:
        """[B, S, H] -> [B, S, H]; or [B, R, H] at ``query_positions`` (keys: every row)."""
        batch, seq_len, hidden = hidden_BxSxH.shape
        queried_BxRxH = (
            hidden_BxSxH
            if query_positions_BxR is None
            else gather_positions(hidden_BxSxH, query_positions_BxR)
        )
        rows = queried_BxRxH.shape[1]

        def heads_first(projected_BxTxH: jax.Array) -> jax.Array:
            """[B, T, H] -> [B, N, T, D]: each head's rows contiguous for the batched matmuls."""
            split = projected_BxTxH.reshape(batch, -1, self.num_heads, self.head_dim)
            return split.transpose(0, 2, 1, 3)

        # Scale the queries rather than the R x S scores: same result, fewer multiplies.
        query_BxNxRxD = heads_first(self.query(queried_BxRxH)) / math.sqrt(self.head_dim)
        key_BxNxSxD = heads_first(self.key(hidden_BxSxH))
        value_BxNxSxD = heads_first(self.value(hidden_BxSxH))
        scores_BxNxRxS = attention_scores(query_BxNxRxD, key_BxNxSxD)
        scores_BxNxRxS = jnp.where(
            key_mask_Bx1x1xS, scores_BxNxRxS.astype(jnp.float32), _MASK_VALUE
        )
        probs_BxNxRxS = jax.nn.softmax(scores_BxNxRxS, axis=-1).astype(value_BxNxSxD.dtype)
        probs_BxNxRxS = self.attention_dropout(
            probs_BxNxRxS, deterministic=deterministic, rngs=rngs
        )
        context_BxNxRxD = attention_context(probs_BxNxRxS, value_BxNxSxD)
        context_BxRxH = context_BxNxRxD.transpose(0, 2, 1, 3).reshape(batch, rows, hidden)
        attended_BxRxH = self.output(context_BxRxH)
        attended_BxRxH = self.output_dropout(attended_BxRxH, deterministic=deterministic, rngs=rngs)
        return self.layer_norm(queried_BxRxH + attended_BxRxH)


def _residuals_are_the_inputs(function: Any) -> Any:
    """The forward rule of a ``custom_vjp`` whose backward needs exactly its inputs."""

    def forward(*inputs: jax.Array) -> tuple[jax.Array, tuple[jax.Array, ...]]:
        return function(*inputs), inputs

    return forward


# The two batched matmuls of attention, with hand-written backward passes. Autodiff's gradient
# of the keys (values) contracts the query (row) axis of both operands; XLA's CPU backend runs
# that as [.., S, D] outputs at about 30 GFLOP/s on BERT-Mini's 128 x 128 x 64 blocks. Written as
# ``query^T @ dscores`` = [.., D, S] and then transposed, the same products run about 1.6x
# faster in isolation (9.2 -> 5.8 ms for batch 32, 4 heads on a 2-core CPU), 2-3% of a step.


def _per_key_gradient(rows_BxNxRxD: jax.Array, per_row_and_key_BxNxRxS: jax.Array) -> jax.Array:
    """``per_row_and_key^T @ rows`` [B, N, S, D], computed as [.., D, S] and transposed."""
    transposed_BxNxDxS = jnp.einsum("bnqd,bnqk->bndk", rows_BxNxRxD, per_row_and_key_BxNxRxS)
    return jnp.swapaxes(transposed_BxNxDxS, 2, 3)


@jax.custom_vjp
def attention_scores(query_BxNxRxD: jax.Array, key_BxNxSxD: jax.Array) -> jax.Array:
    """Per-head ``query @ key^T`` [B, N, R, S]; the key gradient via ``_per_key_gradient``."""
    return jnp.einsum("bnqd,bnkd->bnqk", query_BxNxRxD, key_BxNxSxD)


def _attention_scores_backward(
    residuals: tuple[jax.Array, jax.Array], dscores_BxNxRxS: jax.Array
) -> tuple[jax.Array, jax.Array]:
    query_BxNxRxD, key_BxNxSxD = residuals
    dquery_BxNxRxD = jnp.einsum("bnqk,bnkd->bnqd", dscores_BxNxRxS, key_BxNxSxD)
    return dquery_BxNxRxD, _per_key_gradient(query_BxNxRxD, dscores_BxNxRxS)


attention_scores.defvjp(_residuals_are_the_inputs(attention_scores), _attention_scores_backward)


@jax.custom_vjp
def attention_context(probs_BxNxRxS: jax.Array, value_BxNxSxD: jax.Array) -> jax.Array:
    """Per-head ``probs @ value`` [B, N, R, D]; the value gradient via ``_per_key_gradient``."""
    return jnp.einsum("bnqk,bnkd->bnqd", probs_BxNxRxS, value_BxNxSxD)


def _attention_context_backward(
    residuals: tuple[jax.Array, jax.Array], dcontext_BxNxRxD: jax.Array
) -> tuple[jax.Array, jax.Array]:
    probs_BxNxRxS, value_BxNxSxD = residuals
    dprobs_BxNxRxS = jnp.einsum("bnqd,bnkd->bnqk", dcontext_BxNxRxD, value_BxNxSxD)
    return dprobs_BxNxRxS, _per_key_gradient(dcontext_BxNxRxD, probs_BxNxRxS)


attention_context.defvjp(_residuals_are_the_inputs(attention_context), _attention_context_backward)


class TransformerLayer(nnx.Module):
    """One post-LN encoder layer: attention block, then feed-forward block."""

    def __init__(self, config: BertConfig, rngs: nnx.Rngs):
        hidden, ffn = config.hidden_size, config.intermediate_size
        self.activation = ACTIVATIONS[config.hidden_act]
        self.attention = SelfAttention(config, rngs)
        self.intermediate = _dense(config, hidden, ffn, ("embed", "mlp"), rngs)
        self.output = _dense(config, ffn, hidden, ("mlp", "embed"), rngs)
        self.output_layer_norm = _layer_norm(config, rngs)
        self.output_dropout = Dropout(config.hidden_dropout_prob)

    def __call__(
        self,
        hidden_BxSxH: jax.Array,
        key_mask_Bx1x1xS: jax.Array,
        deterministic: bool,
        rngs: nnx.Rngs | None,
        query_positions_BxR: jax.Array | None = None,
    ) -> jax.Array:
        """[B, S, H] -> [B, S, H]; or [B, R, H] at ``query_positions`` (see ``SelfAttention``)."""
        attended_BxRxH = self.attention(
            hidden_BxSxH, key_mask_Bx1x1xS, deterministic, rngs, query_positions_BxR
        )
        ffn_BxRxF = self.activation(self.intermediate(attended_BxRxH))
        ffn_BxRxH = self.output_dropout(
            self.output(ffn_BxRxF), deterministic=deterministic, rngs=rngs
        )
        return self.output_layer_norm(attended_BxRxH + ffn_BxRxH)


class MaskedLMHead(nnx.Module):
    """Transform (dense + activation + LayerNorm), then the tied word-embedding decoder + bias."""

    def __init__(self, config: BertConfig, rngs: nnx.Rngs):
        hidden = config.hidden_size
        self.activation = ACTIVATIONS[config.hidden_act]
        self.transform = _dense(config, hidden, hidden, ("embed", None), rngs)
        self.layer_norm = _layer_norm(config, rngs)
        self.bias = nnx.Param(
            jnp.zeros((config.vocab_size,), jnp.dtype(config.param_dtype)), **_axes("vocab")
        )

    def __call__(self, hidden_BxPxH: jax.Array, word_embeddings: nnx.Embed) -> jax.Array:
        transformed_BxPxH = self.layer_norm(self.activation(self.transform(hidden_BxPxH)))
        *leading, hidden = transformed_BxPxH.shape
        dtype = transformed_BxPxH.dtype
        logits_NxV = tied_decoder(
            transformed_BxPxH.reshape(-1, hidden),
            word_embeddings.embedding[...].astype(dtype),
            self.bias[...].astype(jnp.float32),
        )
        return logits_NxV.reshape(*leading, -1)


def summed_outer_products(left_NxA: jax.Array, right_NxB: jax.Array) -> jax.Array:
    """``left^T @ right`` [A, B], the weight gradient of a dense layer, in the cheaper order.

    A matmul that contracts its operands' leading axis is one YNNPACK will not take, so XLA's
    CPU backend runs it on Eigen, which packs the transposed operand slowly. When A > B (the
    wider operand on the left: a feed-forward output layer, the tied decoder) it is cheaper to
    copy the narrower ``right`` transposed and compute ``(right^T @ left)^T``. On a CPU the two
    ``optimization_barrier``s keep XLA from folding those transposes back into the matmul, so
    YNNPACK gets a plain [B, N] x [N, A] product and the [B, A] result is transposed after it
    (folded in, the transpose sends the matmul back to Eigen). Measured on one core for
    N=4096, A=1024, B=256: 32 ms for ``left^T @ right`` or a folded ``(right^T @ left)^T``,
    22 ms this way, 21 ms a forward matmul of the same size; the BERT-Mini fine-tuning step
    on two cores -3.5..-7% in interleaved A/B runs. Other backends get the same order without
    the barriers: their matmuls take transposed operands as they are.
    """
    if left_NxA.shape[1] <= right_NxB.shape[1]:
        return left_NxA.T @ right_NxB
    if jax.default_backend() != "cpu":
        return (right_NxB.T @ left_NxA).T
    barrier = jax.lax.optimization_barrier
    return barrier(barrier(right_NxB.T) @ left_NxA).T


@jax.custom_vjp
def dense_matmul(inputs_NxI: jax.Array, kernel_IxO: jax.Array) -> jax.Array:
    """``inputs @ kernel``, whose kernel gradient uses ``summed_outer_products``."""
    return inputs_NxI @ kernel_IxO


def _dense_matmul_backward(
    residuals: tuple[jax.Array, jax.Array], doutputs_NxO: jax.Array
) -> tuple[jax.Array, jax.Array]:
    inputs_NxI, kernel_IxO = residuals
    dinputs_NxI = doutputs_NxO @ kernel_IxO.T
    return dinputs_NxI, summed_outer_products(inputs_NxI, doutputs_NxO)


dense_matmul.defvjp(_residuals_are_the_inputs(dense_matmul), _dense_matmul_backward)


def dense_dot_general(
    inputs: jax.Array,
    kernel: jax.Array,
    dimension_numbers: Any,
    precision: Any = None,
    preferred_element_type: Any = None,
    out_sharding: Any = None,
) -> jax.Array:
    """``nnx.Linear``'s ``dot_general``: [..., I] x [I, O] through ``dense_matmul``.

    Any other contraction, precision, output type or sharding goes to ``lax.dot_general``
    unchanged, so the layer's behaviour never depends on this fast path.
    """
    (lhs_contract, rhs_contract), batch_dims = dimension_numbers
    standard = (
        tuple(lhs_contract) == (inputs.ndim - 1,)
        and tuple(rhs_contract) == (0,)
        and batch_dims == ((), ())
        and kernel.ndim == 2
        and inputs.dtype == kernel.dtype
    )
    if not standard or precision is not None or preferred_element_type is not None or out_sharding:
        return jax.lax.dot_general(
            inputs,
            kernel,
            dimension_numbers,
            precision=precision,
            preferred_element_type=preferred_element_type,
            out_sharding=out_sharding,
        )
    *leading, features = inputs.shape
    outputs = dense_matmul(inputs.reshape(-1, features), kernel)
    return outputs.reshape(*leading, kernel.shape[1])


@jax.custom_vjp
def tied_decoder(hidden_NxH: jax.Array, embedding_VxH: jax.Array, bias_V: jax.Array) -> jax.Array:
    """float32 vocabulary logits ``hidden @ embedding^T + bias``, with a CPU-friendly backward.

    The gradients are the usual ones, in another order of operations: the bias gradient (a
    sum over the N rows) is a ones-row matmul, and the embedding gradient is computed as
    ``(hidden^T @ dlogits)^T`` (``summed_outer_products``). XLA's CPU backend otherwise sums
    the [N, V] logit gradient down its major axis (30x slower than the matmul) and transposes
    all of it (N x V floats) for ``dlogits^T @ hidden``: together about 0.2 s of a 1.7 s
    BERT-Mini MLM step (batch 32, 20 predictions) on a 2-core CPU.
    """
    return (hidden_NxH @ embedding_VxH.T).astype(jnp.float32) + bias_V


def _tied_decoder_forward(
    hidden_NxH: jax.Array, embedding_VxH: jax.Array, bias_V: jax.Array
) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
    return tied_decoder(hidden_NxH, embedding_VxH, bias_V), (hidden_NxH, embedding_VxH)


def _tied_decoder_backward(
    residuals: tuple[jax.Array, jax.Array], dlogits_NxV: jax.Array
) -> tuple[jax.Array, jax.Array, jax.Array]:
    hidden_NxH, embedding_VxH = residuals
    dlogits_in_dtype = dlogits_NxV.astype(hidden_NxH.dtype)
    dhidden_NxH = dlogits_in_dtype @ embedding_VxH
    dembedding_VxH = summed_outer_products(dlogits_in_dtype, hidden_NxH)
    return dhidden_NxH, dembedding_VxH.astype(embedding_VxH.dtype), sum_over_examples(dlogits_NxV)


tied_decoder.defvjp(_tied_decoder_forward, _tied_decoder_backward)


def gather_positions(sequence_BxSxH: jax.Array, positions_BxP: jax.Array) -> jax.Array:
    """The hidden states at ``positions`` of each row (Google's ``gather_indexes``)."""
    return jnp.take_along_axis(sequence_BxSxH, positions_BxP[..., None].astype(jnp.int32), axis=1)


class BertModel(nnx.Module):
    """BERT encoder + tanh pooler + the heads chosen by ``head`` (see ``HEAD_CHOICES``).

    Call with ``input_ids`` [B, S] (and optionally ``token_type_ids``, ``attention_mask`` with 1
    for real tokens, ``masked_positions`` [B, P] for the MLM head). Pass ``deterministic=False``
    and ``rngs=nnx.Rngs(dropout=key)`` to train with dropout.

    ``heads_only=True`` computes the last layer only at the rows the heads read: [CLS], then the
    masked positions when the MLM head has them. The head outputs are those of the full pass;
    ``sequence_output`` is then [B, R, H] at those rows. A span head, or an MLM head without
    ``masked_positions``, reads every row, and the flag changes nothing.
    """

    def __init__(
        self,
        config: BertConfig,
        *,
        head: str | None = None,
        num_labels: int = 2,
        rngs: nnx.Rngs,
    ):
        if head not in HEAD_CHOICES:
            raise ValueError(f"unknown head {head!r}; choose one of {list(HEAD_CHOICES)}")
        if head == "regression":
            num_labels = 1
        self.config = config
        self.head = head
        self.heads = HEAD_CHOICES[head]
        # Only a classifier has labels; None elsewhere so a round trip compares equal.
        self.num_labels = num_labels if "classifier" in self.heads else None
        hidden = config.hidden_size
        self.embeddings = Embeddings(config, rngs)
        self.layers = nnx.List(
            TransformerLayer(config, rngs) for _ in range(config.num_hidden_layers)
        )
        self.pooler = _dense(config, hidden, hidden, ("embed", None), rngs)
        self.mlm_head = MaskedLMHead(config, rngs) if "mlm" in self.heads else None
        self.nsp_head = (
            _dense(config, hidden, 2, ("embed", None), rngs) if "nsp" in self.heads else None
        )
        self.classifier = (
            _dense(config, hidden, num_labels, ("embed", None), rngs)
            if "classifier" in self.heads
            else None
        )
        self.span_head = (
            _dense(config, hidden, 2, ("embed", None), rngs) if "span" in self.heads else None
        )
        self.classifier_dropout = Dropout(config.hidden_dropout_prob)

    def __call__(
        self,
        input_ids: jax.Array,
        token_type_ids: jax.Array | None = None,
        attention_mask: jax.Array | None = None,
        masked_positions: jax.Array | None = None,
        *,
        deterministic: bool = True,
        rngs: nnx.Rngs | None = None,
        heads_only: bool = False,
    ) -> BertOutput:
        input_ids_BxS = jnp.asarray(input_ids)
        if input_ids_BxS.ndim != 2:
            raise ValueError(f"input_ids must be [batch, seq_len], got shape {input_ids_BxS.shape}")
        token_type_ids_BxS = (
            jnp.zeros_like(input_ids_BxS) if token_type_ids is None else jnp.asarray(token_type_ids)
        )
        mask_BxS = (
            jnp.ones_like(input_ids_BxS) if attention_mask is None else jnp.asarray(attention_mask)
        )
        for name, array in (("token_type_ids", token_type_ids_BxS), ("attention_mask", mask_BxS)):
            if array.shape != input_ids_BxS.shape:
                raise ValueError(
                    f"{name} has shape {array.shape}, input_ids has {input_ids_BxS.shape}"
                )
        key_mask_Bx1x1xS = (mask_BxS > 0)[:, None, None, :]

        head_rows_BxR = (
            self._head_rows(input_ids_BxS.shape[0], masked_positions) if heads_only else None
        )

        hidden_BxSxH = self.embeddings(input_ids_BxS, token_type_ids_BxS, deterministic, rngs)
        if head_rows_BxR is not None and not self.layers:
            hidden_BxSxH = gather_positions(hidden_BxSxH, head_rows_BxR)
        for index, layer in enumerate(self.layers):
            last = index == len(self.layers) - 1
            rows_BxR = head_rows_BxR if last else None
            hidden_BxSxH = layer(hidden_BxSxH, key_mask_Bx1x1xS, deterministic, rngs, rows_BxR)
        pooled_BxH = jnp.tanh(self.pooler(hidden_BxSxH[:, 0]))

        outputs: dict[str, jax.Array] = {}
        if self.mlm_head is not None:
            if head_rows_BxR is not None:  # rows 1.. are the masked positions, in order
                at_masks = hidden_BxSxH[:, 1:]
            elif masked_positions is None:
                at_masks = hidden_BxSxH
            else:
                at_masks = gather_positions(hidden_BxSxH, jnp.asarray(masked_positions))
            outputs["mlm_logits"] = self.mlm_head(at_masks, self.embeddings.word_embeddings)
        if self.nsp_head is not None:
            outputs["nsp_logits"] = self.nsp_head(pooled_BxH).astype(jnp.float32)
        if self.classifier is not None:
            dropped_BxH = self.classifier_dropout(
                pooled_BxH, deterministic=deterministic, rngs=rngs
            )
            outputs["logits"] = self.classifier(dropped_BxH).astype(jnp.float32)
        if self.span_head is not None:
            span_BxSx2 = self.span_head(hidden_BxSxH).astype(jnp.float32)
            outputs["start_logits"] = span_BxSx2[..., 0]
            outputs["end_logits"] = span_BxSx2[..., 1]
        return BertOutput(sequence_output=hidden_BxSxH, pooled_output=pooled_BxH, **outputs)

    def _head_rows(self, batch: int, masked_positions: jax.Array | None) -> jax.Array | None:
        """[B, R] rows the heads read ([CLS] first), or None when they read every row."""
        if self.span_head is not None or (self.mlm_head is not None and masked_positions is None):
            return None
        cls_Bx1 = jnp.zeros((batch, 1), jnp.int32)
        if self.mlm_head is None:
            return cls_Bx1
        return jnp.concatenate([cls_Bx1, jnp.asarray(masked_positions, jnp.int32)], axis=1)


def create_model(
    config: BertConfig, head: str | None = None, num_labels: int = 2, seed: int = 0
) -> BertModel:
    """A randomly initialised model (BERT's truncated-normal init)."""
    return BertModel(config, head=head, num_labels=num_labels, rngs=nnx.Rngs(params=seed))


def count_params(model: BertModel) -> int:
    """The number of parameter scalars (works on ``nnx.eval_shape`` models too)."""
    return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(nnx.state(model, nnx.Param)))
