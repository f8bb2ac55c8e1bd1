"""GPT-1 task fine-tuning (Radford et al. 2018): input transformations with start/delimiter/extract tokens, a
linear head on the extract token's final state, and L2 + λ·L1 (task loss plus the language-modelling loss).
Not built yet. A fine-tuning stage will be a loss, a batch source and its metrics handed to
gptjax.train.loop, started from a pretrained run with init_from (gptjax.train.lineage)."""
