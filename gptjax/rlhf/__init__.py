"""InstructGPT (Ouyang et al. 2022): supervised fine-tuning, a reward model from K-way rankings, PPO with a KL
penalty and PPO-ptx.

  losses.py     the pure losses (masked LM, ranking loss, KL rewards, GAE, whitening, clipped PPO objectives)
  code_task.py  the offline demonstration: prompts and demonstrations from the corpus, programmatic labelers
  config.py     the stages' root configs
  sft.py        supervised fine-tuning on demonstrations (python rlhf.py sft)
  rank.py       K completions per prompt from a policy, ranked by the labelers (python rlhf.py rank)
  reward.py     the reward model from K-way rankings (python rlhf.py reward)

Each stage hands its loss to gptjax.train.loop and is started from its parent stage's run with init_from, so
config.json records the lineage pretrain -> sft -> reward -> ppo. PPO (and PPO-ptx) is not built yet."""
