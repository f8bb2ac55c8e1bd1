"""InstructGPT (Ouyang et al. 2022): supervised fine-tuning, a reward model from K-way rankings, PPO with a KL
penalty and PPO-ptx. The losses are pure functions in losses.py (built and tested); the stages, apart from them
(sft, reward, ppo, rollout; not built yet), will hand them to gptjax.train.loop, each started from its parent stage's run
with init_from so config.json records the lineage pretrain -> sft -> reward -> ppo."""
