"""Pre-trained Distillation on SST-2, every stage in one resumable command (bert_mini.pipeline).

    python -m bert_mini.main --config=configs/pd_sst2.py:student=L-4_H-256,method=pd --workdir=/tmp/bert_mini/pd_sst2_mini

The paper's setting: a compact student (default BERT-Mini) pre-trained with masked LM, a teacher
fine-tuned on SST-2 (default: BERT-Large, ``teacher_init=google:large``, downloaded once), and
the transfer set D_T = IMDB review sentences + SST-2 train text without labels, deduplicated
against SST-2 dev/test. Arguments (comma-separated): ``student`` (size name), ``student_init``
(a pre-trained student checkpoint instead of pre-training one), ``teacher`` (an already
fine-tuned SST-2 teacher), ``teacher_init`` (the checkpoint to fine-tune into the teacher),
``method`` (pd | pdf | pf | d | scratch), ``runlocal`` (BERT-Tiny, the staged MiniLM as teacher,
a few hundred examples and tens of steps per stage: the whole pipeline in minutes on a CPU).
"""

from bert_mini import config_lib


def get_config(arg: str | None = None):
    return config_lib.pd_config(arg, "configs/pd_sst2.py", task="sst2", transfer="movie_sst2")
