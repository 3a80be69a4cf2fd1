"""Input pipeline: TFDS builders for GLUE, SQuAD, text corpora and transfer sets, and tf.data
pipelines for pre-training, fine-tuning and distillation (see each module's docstring)."""
