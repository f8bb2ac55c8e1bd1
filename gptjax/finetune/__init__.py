"""GPT-1 task fine-tuning (Radford et al. 2018), a stage of the shared training loop started from a pretrained
run with init_from: task.py (what a task is), formats.py (users' JSONL files), builtin.py (the built-in code
tasks), transform.py (start / delimiter / extract input transformations), stage.py (L3 = L2 + λ·L1, the loop's
client), metrics.py, evaluate.py (eval.py on a fine-tuned run), zeroshot.py (the pretrained model by
likelihood), config.py (FinetuneConfig)."""
