"""InstructGPT's post-training stages (Ouyang et al. 2022), each an ordinary run directory started from its parent
run with init_from, its config.json recording the lineage.

  python rlhf.py sft runs/tiny --data demos.jsonl                          # runs/sft; 5% held out by prompt hash
  python rlhf.py sft runs/tiny --data demos.jsonl --val held_out.jsonl --run-dir runs/sft-code epochs=4
  python rlhf.py sft runs/gpt2 --data demos.jsonl batch_size=8 max_len=512 optim.lr=1e-5 mesh.fsdp=-1
  python rlhf.py sft --list-keys
  python rlhf.py sft runs/tiny --data code                                 # the built-in code demonstrations
  python rlhf.py rank runs/sft --out rankings.jsonl --n 200 --k 4         # K samples per prompt, labelers rank them
  python rlhf.py rank runs/sft --out val_rankings.jsonl --split val --labelers all
  python rlhf.py reward runs/sft --data rankings.jsonl                     # runs/reward; bias on the SFT's demos
  python rlhf.py reward runs/sft --data rankings.jsonl --val held_out.jsonl eval_labelers=balanced,reviewer
  python rlhf.py reward runs/tiny --data rankings.jsonl --demos demos.jsonl --run-dir runs/rm batch_size=16
  python rlhf.py reward --list-keys
  python rlhf.py ppo runs/sft --reward runs/reward                          # runs/ppo; the policy in runs/ppo/policy
  python rlhf.py ppo runs/sft --reward runs/reward --run-dir runs/ppo-ptx ptx_coef=1.0 iterations=200 beta=0.05
  python rlhf.py ppo --list-keys
  python rlhf.py ppo --compile-only --topology v5p:8x8x8 --policy gpt3-xl --value gpt3-6.7b prompts=512 minibatch=64
  python rlhf.py bon runs/sft --reward runs/reward --n 64 --out bon.json     # best-of-n on held-out prompts
  python rlhf.py dpo runs/sft --data rankings.jsonl --val val_rankings.jsonl --reward runs/reward   # runs/dpo
  python rlhf.py report --out docs/instructgpt --reward runs/reward --ppo PPO=runs/ppo --bon bon.json

sft: next-token loss on the response tokens only, several demonstrations packed into a row where they fit (see
gptjax/rlhf/sft.py for the details and every deviation from the paper). --data is a JSONL file with one
{"prompt": "...", "response": "..."} object per line. Rerunning the same command resumes. The result is a
language model: python eval.py RUN_DIR and python sample.py RUN_DIR read it.

rank: K completions for each of --n prompts of the code task (gptjax/rlhf/code_task.py: function signatures
with docstrings from the corpus, --split train or val by held-out file) from the run's policy with the compiled
KV-cache sampler, ranked by the programmatic labelers (--labelers train, heldout, all, or names), written as the
JSONL the reward stage reads; a report beside it (OUT.report.json) has the labelers' agreement on those samples.

reward: a scalar head on the SFT model, read at each completion's end token, trained on K-way rankings (one JSON
object per line: {"prompt", "completions": [...], "ended": [...], "ranks": [...], "labeler"}, rank 0 the best,
equal ranks ties); held-out pairwise accuracy at step 0, each epoch and the end; then a bias so that the
demonstrations (--demos, or the parent SFT run's own) score 0 on average. gptjax/rlhf/reward.py has the details
and every deviation from the paper; reward.load_reward_model(RUN_DIR) loads the result for scoring.

ppo: the policy starts as the SFT run, the value model as the reward model; each iteration samples one completion
for each of `prompts` training prompts of the code task, scores it with the frozen reward model, and takes
ppo_epochs epochs of clipped PPO minibatch updates with the per-token KL penalty beta to the SFT policy (ptx_coef > 0:
PPO-ptx, with pretraining batches from the SFT run's corpus). Held-out prompts are evaluated at step 0, every
eval_every iterations and at the end (true labeler score, reward-model score, KL per sequence, the held-out
labelers' win rate against SFT). Rerunning the same command resumes. The final policy is RUN_DIR/policy, a
language-model run that eval.py, sample.py and rank read. gptjax/rlhf/ppo.py and ppo_stage.py have the details
and every deviation from the paper.

bon: best-of-n sampling, the no-RL baseline of reward over-optimisation: N samples of each held-out prompt from
the policy, scored by the reward model and by the labelers' true score; the expected scores of the reward model's
best of n = 1, 2, 4, ..., N against sqrt(KL) = sqrt(log n - (n-1)/n) (gptjax/rlhf/bon.py).

dpo: direct preference optimisation (Rafailov et al. 2023) on the same rankings, no reward model and no sampling:
the policy starts as the SFT run (also the frozen reference) and learns the ranking loss of its implicit reward
beta * (log pi - log pi_SFT). Held-out rankings are scored at step 0, each epoch and the end; with --reward the
policy is also sampled on the held-out prompts and judged as PPO's evaluations are, so `report --ppo DPO=RUN_DIR`
puts it on PPO's axes. The final policy is RUN_DIR/policy (gptjax/rlhf/dpo.py).
report: the demonstration's tables (OUT/tables.md, OUT/report.json) and plots (reward over-optimisation, PPO's
held-out curves) from the runs and files above (gptjax/rlhf/report.py).
"""

from __future__ import annotations

import argparse
import sys


def _parsers() -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    from gptjax import distributed

    top = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = top.add_subparsers(dest="stage", required=True, metavar="STAGE")
    sft = sub.add_parser("sft", help="supervised fine-tuning on demonstrations", description=__doc__,
                         formatter_class=argparse.RawDescriptionHelpFormatter)
    sft.add_argument("init_from", nargs="?", default=None,
                     help="the pretrained run directory (RUN_DIR or RUN_DIR@STEP)")
    sft.add_argument("--data", default=None, help="a JSONL file of {\"prompt\", \"response\"} demonstrations")
    sft.add_argument("--val", default=None, help="a held-out JSONL file (default: 5%% of --data, by prompt hash)")
    sft.add_argument("--run-dir", default=None, help="where the SFT run goes (default runs/sft)")
    sft.add_argument("--list-keys", action="store_true", help="print every overridable key with its default")
    sft.add_argument("overrides", nargs="*", metavar="key.sub=value", help="e.g. epochs=4 optim.lr=3e-5 pack=false")
    distributed.add_cli_flags(sft)
    rm = sub.add_parser("reward", help="a reward model from K-way rankings", description=__doc__,
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    rm.add_argument("init_from", nargs="?", default=None,
                    help="the SFT (or pretrained) run directory (RUN_DIR or RUN_DIR@STEP)")
    rm.add_argument("--data", default=None, help="a JSONL file of ranking records")
    rm.add_argument("--val", default=None, help="a held-out JSONL file of rankings (default: 5%% of --data's "
                                                "prompts, by hash)")
    rm.add_argument("--demos", default=None, help="the demonstrations that set the bias: a JSONL file of "
                                                  "{\"prompt\", \"response\"} (default: the parent SFT run's own)")
    rm.add_argument("--run-dir", default=None, help="where the reward-model run goes (default runs/reward)")
    rm.add_argument("--list-keys", action="store_true", help="print every overridable key with its default")
    rm.add_argument("overrides", nargs="*", metavar="key.sub=value", help="e.g. batch_size=16 optim.lr=1e-5")
    distributed.add_cli_flags(rm)
    rk = sub.add_parser("rank", help="K sampled completions per prompt, ranked by the programmatic labelers",
                        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    rk.add_argument("init_from", help="the policy's run directory (RUN_DIR or RUN_DIR@STEP), e.g. an SFT run")
    rk.add_argument("--out", required=True, help="the rankings JSONL to write")
    rk.add_argument("--split", default="train", choices=("train", "val"), help="prompts from training or held-out files")
    rk.add_argument("--n", type=int, default=200, help="prompts")
    rk.add_argument("--k", type=int, default=4, help="completions per prompt, 4..9 (0: drawn per prompt)")
    rk.add_argument("--labelers", default="train", help="train, heldout, all, or comma-separated names")
    rk.add_argument("--max-new-tokens", type=int, default=128)
    rk.add_argument("--temperature", type=float, default=1.0)
    rk.add_argument("--seed", type=int, default=0)
    po = sub.add_parser("ppo", help="PPO (or PPO-ptx) against a reward model", description=__doc__,
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    po.add_argument("init_from", nargs="?", default=None, help="the SFT run directory (RUN_DIR or RUN_DIR@STEP)")
    po.add_argument("--reward", default=None, help="the reward-model run directory (rlhf.py reward ...)")
    po.add_argument("--run-dir", default=None, help="where the PPO run goes (default runs/ppo)")
    po.add_argument("--list-keys", action="store_true", help="print every overridable key with its default")
    po.add_argument("overrides", nargs="*", metavar="key.sub=value", help="e.g. iterations=200 beta=0.05 ptx_coef=1")
    po.add_argument("--compile-only", action="store_true",
                    help="compile a PPO iteration (update and reward scoring) and report per-chip memory; no run is "
                         "read or written (gptjax/rlhf/ppo_aot.py)")
    po.add_argument("--topology", default=None, help="with --compile-only: a TPU topology, e.g. v5p:8x8x8 (libtpu)")
    po.add_argument("--policy", default=None, help="with --compile-only: the policy's preset (e.g. gpt3-xl)")
    po.add_argument("--value", default=None, help="with --compile-only: the reward and value models' preset "
                                                  "(e.g. gpt3-6.7b; default: the policy's)")
    po.add_argument("--model-override", action="append", default=[], metavar="model.KEY=VALUE",
                    help="with --compile-only: applied to every model (repeatable), e.g. model.dtype=bfloat16")
    po.add_argument("--json", default=None, help="with --compile-only: also write the report to this JSON file")
    distributed.add_cli_flags(po)
    bn = sub.add_parser("bon", help="best-of-n sampling against a reward model (the no-RL baseline)",
                        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    bn.add_argument("init_from", help="the policy's run directory (RUN_DIR or RUN_DIR@STEP), e.g. an SFT run")
    bn.add_argument("--reward", required=True, help="the reward-model run directory")
    bn.add_argument("--out", required=True, help="the JSON file to write the curve to")
    bn.add_argument("--n", type=int, default=64, help="samples per prompt N (a power of two)")
    bn.add_argument("--split", default="val", choices=("train", "val"), help="prompts from training or held-out files")
    bn.add_argument("--prompts", type=int, default=0, help="a seeded subset of this many prompts (0: all that fit)")
    bn.add_argument("--max-new-tokens", type=int, default=128)
    bn.add_argument("--temperature", type=float, default=1.0)
    bn.add_argument("--seed", type=int, default=0)
    bn.add_argument("--batch-size", type=int, default=64, help="rows a sampler call (at least --n)")
    dp = sub.add_parser("dpo", help="direct preference optimisation on the rankings", description=__doc__,
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    dp.add_argument("init_from", nargs="?", default=None, help="the SFT run directory (RUN_DIR or RUN_DIR@STEP)")
    dp.add_argument("--data", default=None, help="a JSONL file of ranking records")
    dp.add_argument("--val", default=None, help="a held-out JSONL file of rankings (default: 5%% of --data's "
                                                "prompts, by hash)")
    dp.add_argument("--reward", default=None, help="a reward-model run, only to evaluate the policy on PPO's axes")
    dp.add_argument("--run-dir", default=None, help="where the DPO run goes (default runs/dpo)")
    dp.add_argument("--list-keys", action="store_true", help="print every overridable key with its default")
    dp.add_argument("overrides", nargs="*", metavar="key.sub=value", help="e.g. beta=0.1 optim.lr=1e-4")
    distributed.add_cli_flags(dp)
    rp = sub.add_parser("report", help="the demonstration's tables and plots", description=__doc__,
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    rp.add_argument("--out", required=True, help="the directory for report.json, tables.md and the plots")
    rp.add_argument("--reward", default=None, help="a reward-model run directory")
    rp.add_argument("--rank-report", default=None, help="the held-out rankings' report (OUT.report.json of rank)")
    rp.add_argument("--ppo", action="append", default=[], metavar="NAME=RUN_DIR", help="a PPO run (repeatable)")
    rp.add_argument("--bon", default=None, help="a best-of-n JSON file (rlhf.py bon)")
    rp.add_argument("--eval", action="append", default=[], metavar="NAME=FILE",
                    help="an eval.py --json file (repeatable): the alignment-tax table")
    return top, {"sft": sft, "reward": rm, "rank": rk, "ppo": po, "bon": bn, "dpo": dp, "report": rp}


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    top, stages = _parsers()
    if not argv or argv[0] not in stages:
        top.parse_args(argv)  # help, or the usage error naming the stages
        return 2
    # each stage parses on its own: argparse cannot intermix options and positionals under subcommands
    args = stages[argv[0]].parse_intermixed_args(argv[1:])
    args.stage = argv[0]
    from gptjax.errors import run_command

    return run_command(_STAGES[args.stage], args)


def _sft(args) -> int:
    from gptjax import config as config_lib
    from gptjax import distributed
    from gptjax.rlhf.config import SFTConfig, resolve_sft

    if args.list_keys:
        flat = config_lib.flatten(config_lib.to_dict(SFTConfig()))
        print("\n".join(f"{k} = {v!r}" for k, v in flat.items()))
        return 0
    named = {"init_from": args.init_from, "data": args.data, "val": args.val, "run_dir": args.run_dir}
    cfg = resolve_sft([f"{k}={v}" for k, v in named.items() if v] + list(args.overrides))
    distributed.initialize(args)
    from gptjax.rlhf.sft import sft

    sft(cfg)
    return 0


def _reward(args) -> int:
    from gptjax import config as config_lib
    from gptjax import distributed
    from gptjax.rlhf.config import RewardConfig, resolve_reward

    if args.list_keys:
        flat = config_lib.flatten(config_lib.to_dict(RewardConfig()))
        print("\n".join(f"{k} = {v!r}" for k, v in flat.items()))
        return 0
    named = {"init_from": args.init_from, "data": args.data, "val": args.val, "demos": args.demos,
             "run_dir": args.run_dir}
    cfg = resolve_reward([f"{k}={v}" for k, v in named.items() if v] + list(args.overrides))
    distributed.initialize(args)
    from gptjax.rlhf.reward import train_reward

    train_reward(cfg)
    return 0


def _rank(args) -> int:
    import json
    from pathlib import Path

    from gptjax.config import write_atomic
    from gptjax.rlhf.rank import rank_command

    report = rank_command(args.init_from, args.out, args.split, args.n, args.k, args.labelers, args.seed,
                          args.max_new_tokens, args.temperature)
    write_atomic(Path(str(args.out) + ".report.json"), json.dumps(report, indent=2, default=str) + "\n")
    return 0


def _ppo(args) -> int:
    from gptjax import config as config_lib
    from gptjax import distributed
    from gptjax.rlhf.config import PPOConfig, resolve_ppo

    if args.list_keys:
        flat = config_lib.flatten(config_lib.to_dict(PPOConfig()))
        print("\n".join(f"{k} = {v!r}" for k, v in flat.items()))
        return 0
    only = [f for f, v in (("--topology", args.topology), ("--policy", args.policy), ("--value", args.value),
                           ("--model-override", args.model_override), ("--json", args.json)) if v]
    if only and not args.compile_only:
        raise config_lib.ConfigError(f"{only[0]} only applies to --compile-only; add --compile-only")
    if args.compile_only:
        return _ppo_compile_only(args)
    named = {"init_from": args.init_from, "reward": args.reward, "run_dir": args.run_dir}
    cfg = resolve_ppo([f"{k}={v}" for k, v in named.items() if v] + list(args.overrides))
    distributed.initialize(args)
    from gptjax.rlhf.ppo_stage import train_ppo

    train_ppo(cfg)
    return 0


def _dpo(args) -> int:
    from gptjax import config as config_lib
    from gptjax import distributed
    from gptjax.rlhf.config import DPOConfig, resolve_dpo

    if args.list_keys:
        flat = config_lib.flatten(config_lib.to_dict(DPOConfig()))
        print("\n".join(f"{k} = {v!r}" for k, v in flat.items()))
        return 0
    named = {"init_from": args.init_from, "data": args.data, "val": args.val, "reward": args.reward,
             "run_dir": args.run_dir}
    cfg = resolve_dpo([f"{k}={v}" for k, v in named.items() if v] + list(args.overrides))
    distributed.initialize(args)
    from gptjax.rlhf.dpo import train_dpo

    train_dpo(cfg)
    return 0


def _ppo_compile_only(args) -> int:
    import json

    from gptjax import aot
    from gptjax import config as config_lib
    from gptjax.rlhf import ppo_aot
    from gptjax.rlhf.config import resolve_ppo

    if not args.policy:
        raise config_lib.ConfigError("--compile-only needs the policy's preset: --policy gpt3-xl (and --value "
                                     "gpt3-6.7b for the reward and value models)")
    overrides = list(args.overrides)
    if args.init_from and "=" in args.init_from:  # no SFT_RUN: the first key=value landed in its place
        args.init_from, overrides = None, [args.init_from] + overrides
    if args.init_from or args.reward:
        raise config_lib.ConfigError("--compile-only reads no run: give the models as presets (--policy, --value), "
                                     "not SFT_RUN or --reward")
    # no run is read: placeholders satisfy the settings' validation, the models come from the presets
    cfg = resolve_ppo(["init_from=<compile-only>", "reward=<compile-only>"] + overrides)
    policy = ppo_aot.model_from_preset(args.policy, args.model_override)
    value = ppo_aot.model_from_preset(args.value or args.policy, args.model_override)
    devices = aot.topology_devices(args.topology) if args.topology else None
    report = ppo_aot.compile_ppo(cfg, policy, value, devices, topology=args.topology, policy_name=args.policy,
                                 value_name=args.value or args.policy)
    print(ppo_aot.describe(report))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
    return 0 if report["fits"] is not False else 3


def _bon(args) -> int:
    import json
    from pathlib import Path

    from gptjax.config import write_atomic
    from gptjax.rlhf.bon import best_of_n

    out = best_of_n(args.init_from, args.reward, n=args.n, split=args.split, prompts=args.prompts,
                    max_new_tokens=args.max_new_tokens, temperature=args.temperature, seed=args.seed,
                    batch_size=args.batch_size)
    write_atomic(Path(args.out), json.dumps(out, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


def _report(args) -> int:
    from gptjax.rlhf.report import make_report

    make_report(args.out, reward=args.reward, rank_report=args.rank_report, ppo=args.ppo, bon=args.bon,
                evals=args.eval)
    return 0


_STAGES = {"sft": _sft, "reward": _reward, "rank": _rank, "ppo": _ppo, "bon": _bon, "dpo": _dpo, "report": _report}

if __name__ == "__main__":
    sys.exit(main())
