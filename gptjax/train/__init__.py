"""Training: the one loop every stage shares (loop.py), the language-modelling state and jitted steps
(steps.py), starting from another run's weights (lineage.py), and pretraining as the loop's first client
(pretrain.py). Fine-tuning (gptjax/finetune) and RLHF (gptjax/rlhf) stages hand the same loop their own step
function and batch source."""
