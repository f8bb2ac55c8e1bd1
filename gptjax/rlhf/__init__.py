"""InstructGPT (Ouyang et al. 2022): supervised fine-tuning, a reward model from K-way rankings, PPO with a KL
penalty and PPO-ptx. Not built yet. The losses will be pure functions in losses.py, apart from the stages
(sft, reward, ppo, rollout) that hand them to gptjax.train.loop, each started from its parent stage's run
with init_from so config.json records the lineage pretrain -> sft -> reward -> ppo."""
