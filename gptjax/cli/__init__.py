"""The commands. Each module's `main(argv)` is a root script (python train.py ...) in a source checkout and a
console script (gptjax-train ...) after pip install; both run the same code:

  train     gptjax-train     pretrain (or continue from init_from=RUN_DIR)
  finetune  gptjax-finetune  GPT-1 task fine-tuning
  rlhf      gptjax-rlhf      InstructGPT stages (sft, rank, reward)
  eval      gptjax-eval      held-out loss, bits per byte, zero/few-shot tasks, samples
  sample    gptjax-sample    KV-cache sampling
  convert   gptjax-convert   Hugging Face GPT-2 import and export
  scaling   gptjax-scaling   scaling-law sweeps, fits, plots, predictions
  plot      gptjax-plot      training curves of one or several runs
"""
