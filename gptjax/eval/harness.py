"""EleutherAI's lm-evaluation-harness driving a gptjax checkpoint (the optional `harness` extra).

  python -m gptjax.eval.harness --run runs/tiny --tasks lambada_openai,hellaswag --limit 500
  python -m gptjax.eval.harness --run runs/tiny --tasks my_task --include-path my_tasks/ --output results.json

From Python, importing this module registers the model name "gptjax" with lm-eval:

  import lm_eval, gptjax.eval.harness
  lm_eval.simple_evaluate(model="gptjax", model_args="run_dir=runs/tiny,batch_size=16", tasks=["hellaswag"])

The three request types map onto gptjax's own scorer and sampler:
  loglikelihood          -> scoring.Scorer.loglikelihood on (context, continuation) token ids, split the way
                            lm-eval's Hugging Face model splits them
  loglikelihood_rolling  -> lm-eval's disjoint rolling windows of the model's context, all documents scored
                            in one batched pass
  generate_until         -> generate.generate with a KV cache, stopped at end-of-text or a stop string
One process (any number of local devices); lm-eval's data-parallel ranks are not used.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections import defaultdict
from pathlib import Path
from typing import Sequence

from gptjax.errors import HarnessError

INSTALL_HINT = 'pip install -e ".[harness]"'

try:
    from lm_eval.api.model import LM as _LM
    from lm_eval.api.registry import register_model as _register_model
    _MISSING: ImportError | None = None
except ImportError as e:  # the extra is optional: importing gptjax.eval.harness must not fail without it
    _LM, _register_model, _MISSING = object, None, e

log = logging.getLogger(__name__)


def require_lm_eval() -> None:
    if _MISSING is not None:
        raise HarnessError(f"gptjax.eval.harness needs EleutherAI's lm-evaluation-harness ({_MISSING}); "
                           f"install it with {INSTALL_HINT}")


# Generation keywords we honour; anything else in a task's generation_kwargs is reported once and ignored.
_GEN_KEYS = {"until", "max_gen_toks", "max_new_tokens", "max_tokens", "do_sample", "temperature", "top_k", "top_p"}


class GptjaxLM(_LM):
    """A gptjax run directory as an lm-eval model ("gptjax").

    Args:
        run_dir: a run directory written by train.py (or convert.py).
        step: checkpoint step (default: the latest).
        batch_size: rows per scoring / generation batch; 0 or "auto" takes the training micro-batch.
        max_gen_toks: default generation budget when a task does not set one (lm-eval's default is 256).
        seed: sampling seed for tasks with do_sample=True.
        overrides: config overrides for the restore, e.g. "mesh.tensor=2" (a string is split on spaces).
        max_batch_size, device: passed by lm-eval's simple_evaluate; unused (the devices are JAX's).
    """

    def __init__(self, run_dir: str, step: int | None = None, batch_size: int | str | None = 0,
                 max_gen_toks: int = 256, seed: int = 0, overrides: str | Sequence[str] = (),
                 max_batch_size: int | None = None, device: str | None = None, progress: bool = True):
        require_lm_eval()
        super().__init__()
        # lm-eval bootstraps some standard errors (perplexity, ...) in a forked process pool; forking a process
        # whose JAX runtime has started threads can deadlock, so ask it for its one-process loop instead.
        os.environ.setdefault("DISABLE_MULTIPROC", "1")
        from gptjax.eval.scoring import Scorer, load_run

        if isinstance(overrides, str):
            overrides = overrides.split()
        self.run = load_run(run_dir, step=step, overrides=tuple(overrides))
        self.tok = self.run.tokenizer
        self.batch_size = _batch_size(batch_size)
        self.max_gen_toks = int(max_gen_toks)
        self.seed = int(seed)
        self.progress = progress
        self.scorer = Scorer(self.run, batch_size=self.batch_size, progress=progress)
        self._warned: set[str] = set()

    # -- what lm-eval and users read ------------------------------------------------------------

    @property
    def eot_token_id(self) -> int:
        return self.tok.eot_id

    @property
    def max_length(self) -> int:
        return self.run.cfg.model.block_size

    @property
    def tokenizer_name(self) -> str:
        return f"gptjax:{Path(self.run.run_dir).resolve()}"

    def get_model_info(self) -> dict:
        """Merged into the "config" of lm-eval's results."""
        m = self.run.cfg.model
        return {"model_run_dir": str(self.run.run_dir), "model_step": self.run.step, "model_preset": m.name,
                "model_context": m.block_size, "model_dtype": m.dtype}

    def tok_encode(self, text: str) -> list[int]:
        return list(self.tok.encode(text))

    def tok_decode(self, ids) -> str:
        return self.tok.decode(ids)

    # -- loglikelihood ----------------------------------------------------------------------------

    def encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """lm-eval's context/continuation split (tasks.encode_pair)."""
        from gptjax.eval.tasks import encode_pair

        return encode_pair(self.tok, context, continuation)

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        pairs = [self.encode_pair(*req.args) for req in requests]
        results = self._score(pairs, "loglikelihood")
        for req, r in zip(requests, results):
            self.cache_hook.add_partial("loglikelihood", req.args, r)
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        # lm-eval's disjoint rolling windows (every token predicted once, the first from end-of-text, the last
        # window with as much context as fits), all documents' windows scored together so they batch
        totals = self.scorer.rolling_loglikelihoods([self.tok_encode(req.args[0]) for req in requests],
                                                    desc="loglikelihood_rolling")
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    def _score(self, pairs: list[tuple[list[int], list[int]]], desc: str) -> list[tuple[float, bool]]:
        # An empty continuation has log-likelihood 0 and is trivially greedy (lm-eval's HF model agrees);
        # the scorer is given only the others.
        todo = [i for i, (_, cont) in enumerate(pairs) if cont]
        out: list[tuple[float, bool]] = [(0.0, True)] * len(pairs)
        if todo:
            before = self.scorer.truncated
            scored = self.scorer.loglikelihood([pairs[i] for i in todo], desc=desc)
            for i, (ll, greedy) in zip(todo, scored):
                out[i] = (float(ll), bool(greedy))
            if self.scorer.truncated > before:
                log.warning("%d of %d %s requests were longer than the model's context of %d tokens and lost "
                            "their oldest context tokens", self.scorer.truncated - before, len(todo), desc,
                            self.max_length)
        return out

    # -- generation -------------------------------------------------------------------------------

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        from tqdm.auto import tqdm

        from gptjax.generate import cut_at_stop, generate

        groups: dict[str, list[int]] = defaultdict(list)
        for i, req in enumerate(requests):
            groups[json.dumps(req.args[1], sort_keys=True, default=str)].append(i)
        out: list[str] = [""] * len(requests)
        bar = tqdm(total=len(requests), desc="generate_until", unit="request", leave=False,
                   disable=disable_tqdm or not self.progress)
        for idx in groups.values():
            opts = self._gen_options(requests[idx[0]].args[1])
            n_new = opts.pop("max_gen_toks")
            # Like lm-eval's HF model, keep the prompt's last tokens that leave room for the new ones; but at
            # least half a context, as generate() slides past the context where HF would refuse.
            keep = max(self.max_length - n_new, self.max_length // 2)
            prompts = [self.tok_encode(requests[i].args[0]) or [self.eot_token_id] for i in idx]
            if any(len(p) > keep for p in prompts):
                self._warn_once(f"prompts longer than {keep} tokens (the context of {self.max_length} less "
                                f"max_gen_toks={n_new}) lose their oldest tokens")
            prompts = [p[-keep:] for p in prompts]
            # longest first, so each batch pads to similar lengths
            order = sorted(range(len(idx)), key=lambda j: -len(prompts[j]))
            bs = self.scorer.batch_size
            for b0 in range(0, len(order), bs):
                rows = order[b0:b0 + bs]
                new = generate(self.run.cfg.model, self.run.params, [prompts[j] for j in rows], n_new,
                               eot_id=self.eot_token_id, decode=self.tok_decode, seed=self.seed + b0,
                               batch_size=bs, **opts)
                for j, ids in zip(rows, new):
                    out[idx[j]] = cut_at_stop(self.tok_decode(ids), opts["stop"])
                bar.update(len(rows))
        bar.close()
        for req, text in zip(requests, out):
            self.cache_hook.add_partial("generate_until", req.args, text)
        return out

    def _gen_options(self, kwargs: dict) -> dict:
        """A task's generation_kwargs as keywords of generate.generate (lm-eval's normalisation: aliases of
        max_gen_toks, until as a list, greedy unless do_sample, temperature 1 when sampling without one)."""
        kwargs = dict(kwargs or {})
        for key in sorted(set(kwargs) - _GEN_KEYS):
            self._warn_once(f"generation keyword {key}={kwargs[key]!r} is not supported by gptjax; ignored")
        until = kwargs.get("until") or []
        until = [until] if isinstance(until, str) else list(until)
        n_new = next((kwargs[k] for k in ("max_gen_toks", "max_new_tokens", "max_tokens") if kwargs.get(k)),
                     self.max_gen_toks)
        n_new = int(n_new)
        do_sample = kwargs.get("do_sample")
        temperature = float(kwargs.get("temperature", 1.0 if do_sample else 0.0) or 0.0)
        if do_sample is False:
            temperature = 0.0
        return {"max_gen_toks": n_new, "stop": tuple(s for s in until if s), "temperature": temperature,
                "top_k": int(kwargs.get("top_k") or 0) if temperature else 0,
                "top_p": float(kwargs.get("top_p") or 1.0) if temperature else 1.0}

    def _warn_once(self, msg: str) -> None:
        if msg not in self._warned:
            self._warned.add(msg)
            log.warning(msg)


if _register_model is not None:
    # lm-eval fills its model registry lazily, and only while the registry is empty: fill it first (cheap,
    # names only), or registering "gptjax" would hide "hf", "vllm", ... from get_model.
    import lm_eval.models  # noqa: F401

    _register_model("gptjax")(GptjaxLM)


def _batch_size(value) -> int:
    if value in (None, "", "auto") or (isinstance(value, str) and value.startswith("auto")):
        return 0
    try:
        bs = int(value)
    except (TypeError, ValueError):
        raise HarnessError(f"batch_size={value!r} is not a number (or 'auto')") from None
    if bs < 0:
        raise HarnessError(f"batch_size={bs} must be positive (0 or 'auto' takes the training micro-batch)")
    return bs


# ----------------------------------------------------------------------------------------------
# Command line


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m gptjax.eval.harness", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", required=True, help="a run directory written by train.py")
    p.add_argument("--tasks", required=True, help="comma-separated lm-eval task (or group) names")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: the latest)")
    p.add_argument("--include-path", action="append", default=[],
                   help="a directory of task YAML files (repeatable), searched beside lm-eval's own tasks")
    p.add_argument("--only-include-path", action="store_true",
                   help="index only --include-path, not lm-eval's ~14,000 built-in task configs (saves ~10 s)")
    p.add_argument("--num-fewshot", type=int, default=None)
    p.add_argument("--limit", type=float, default=None, help="documents per task (a fraction if < 1)")
    p.add_argument("--batch-size", type=int, default=0, help="default: the training micro-batch")
    p.add_argument("--max-gen-toks", type=int, default=256, help="for tasks that do not set their own")
    p.add_argument("--seed", type=int, default=0, help="seed of lm-eval's few-shot sampling and of generation")
    p.add_argument("--bootstrap-iters", type=int, default=1000,
                   help="resamples for the standard errors of perplexity-like metrics (one process: lm-eval's "
                        "100000 is slow here); 0 skips them")
    p.add_argument("--output", default=None, help="write lm-eval's results to this JSON file")
    p.add_argument("--log-samples", action="store_true", help="include every request and response in --output")
    p.add_argument("overrides", nargs="*", metavar="key.sub=value", help="config overrides, e.g. mesh.tensor=2")
    args = p.parse_args(argv)

    from gptjax.errors import run_command

    return run_command(_main, args)


def _main(args) -> int:
    try:
        results = run_harness(args)
    except ConnectionError as e:  # what `datasets` raises for a Hub dataset it cannot reach
        raise HarnessError(f"{e}. lm-eval fetches task data from the Hugging Face Hub and caches it: run once with "
                           f"a network connection, or point the task at a local copy (docs/harness.md, 'Offline')"
                           ) from None
    if results is None:  # lm-eval answers None on ranks other than 0
        return 0
    from lm_eval.utils import handle_non_serializable, make_table

    c = results["config"]
    print(f"gptjax ({args.run} @ step {c['model_step']}), limit: {args.limit}, num_fewshot: {args.num_fewshot}, "
          f"batch_size: {args.batch_size or 'training micro-batch'}")
    print(make_table(results))
    if results.get("groups"):
        print(make_table(results, "groups"))
    if args.output:
        Path(args.output).write_text(json.dumps(results, indent=2, default=handle_non_serializable) + "\n")
        print(f"wrote {args.output}")
    return 0


def run_harness(args) -> dict | None:
    require_lm_eval()
    import lm_eval
    from lm_eval.tasks import TaskManager

    tasks = [t for t in args.tasks.split(",") if t]
    for d in args.include_path:
        if not Path(d).is_dir():
            raise HarnessError(f"--include-path {d} is not a directory")
    tm = TaskManager(include_path=args.include_path or None, include_defaults=not args.only_include_path)
    unknown = [t for t in tasks if t not in tm.all_tasks and not Path(t).is_file()]
    if unknown:
        where = ", ".join(args.include_path) or "lm-eval's tasks"
        hint = "" if args.include_path else " (for a task of your own, add --include-path DIR)"
        raise HarnessError(f"unknown task(s) {', '.join(unknown)} in {where}{hint}; "
                           f"list them with: lm-eval ls tasks")
    lm = GptjaxLM(args.run, step=args.step, batch_size=args.batch_size, max_gen_toks=args.max_gen_toks,
                  seed=args.seed, overrides=args.overrides)
    results = lm_eval.simple_evaluate(
        model=lm, tasks=tasks, num_fewshot=args.num_fewshot, limit=args.limit, task_manager=tm,
        bootstrap_iters=args.bootstrap_iters, log_samples=args.log_samples, random_seed=args.seed,
        numpy_random_seed=args.seed, fewshot_random_seed=args.seed)
    if results is not None:
        results["config"]["model"] = "gptjax"
        results["config"]["model_args"] = {"run_dir": str(args.run), "step": lm.run.step}
    return results


if __name__ == "__main__":
    sys.exit(main())
