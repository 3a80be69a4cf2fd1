"""Pre-trained Distillation on any GLUE task (bert_mini.pipeline).

    python -m bert_mini.main --config=configs/pd_glue.py:task=mrpc,student=L-4_H-256,method=pd --workdir=/tmp/bert_mini/pd_mrpc_mini

Tasks: mrpc, rte, cola, stsb (regression: the student regresses onto the teacher's score with
MSE), qnli, mnli, qqp (the last three read the TFDS catalog when their TSVs are not staged).
D_T is the task's own train text without labels, deduplicated against its dev/test. Arguments as
in ``configs/pd_sst2.py``: ``task``, ``student``, ``student_init``, ``teacher``, ``teacher_init``,
``method`` (pd | pdf | pf | d | scratch), ``runlocal``.
"""

from bert_mini import config_lib


def get_config(arg: str | None = None):
    return config_lib.pd_config(arg, "configs/pd_glue.py", task="mrpc", transfer="task_train_text")
