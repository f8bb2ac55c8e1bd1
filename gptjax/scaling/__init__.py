"""Scaling laws: sweep a ladder of model sizes and token budgets, fit L(N), L(C) and L(N, D), predict.

sweep.py plans and trains the points; fit.py fits the laws; predict.py predicts a bigger run; plot.py draws.

A sweep is a JSON file in `configs/sweeps/` (not `configs/`, whose files are training presets). It names a
base preset and overrides shared by every point (data, vocabulary, context, batch: the token cache is keyed
on data and vocabulary, so it is built once), a table of model sizes, and which points to train:

- `ladder`: every listed size at a fixed token count, or a fixed number of tokens per parameter;
- `isoflop`: for each compute budget C (C = 6 N D, or exact training FLOPs with `measure: "flops"`), every
  listed size (or the budget's own window, `sizes_by_budget`) at the tokens that spend it;
- `lr_sweep`: rates tried on a few sizes at one budget, trained first; the power law through their best rates
  sets every other size's rate (SWEEP_DIR/lr.json);
- `extra_seeds`: named points trained again with more seeds (the noise floor);
- `capability`: -E[log p(correct)] on a built-in task, scored on every finished point;
- `predict`: one larger configuration, trained only by `predict`, after its loss and capability have been
  predicted from the points with at most a tenth of its compute (GPT-4 report, section 3).

Conventions. N is the non-embedding parameter count unless `n_count` says "total"; D counts training tokens;
C = 6 N D (Kaplan et al. 2020). The exact training FLOPs (attention and the output layer included,
`flops.flops_per_token`) are recorded beside C: they are what a run costs, and what the 10x rule of
`predict` is measured in. Losses are held-out nats per token (the vocabulary is the same for every point).

Every point is an ordinary run directory `SWEEP_DIR/<point>`; a point with a summary.json is finished and
skipped, so rerunning a sweep resumes it. `SWEEP_DIR/results.jsonl` holds one record per finished point.
"""

from gptjax.errors import SweepError
from gptjax.scaling.fit import (HUBER_DELTA, approach2_n_opt, backtest, chinchilla_loss, compute_optimal, fit_all,
                                fit_approach2, fit_capability, fit_chinchilla, fit_lse, fit_minima_law, fit_power_law,
                                frontier, isoflop_minima, minima_frontier, power_law, seed_noise, summarize_fits)
from gptjax.scaling.plot import plot
from gptjax.scaling.predict import predict
from gptjax.scaling.sweep import (MEASURES, N_COUNTS, CapabilitySpec, ExtraSeedsSpec, IsoflopSpec, LadderSpec,
                                  LrSweepSpec, Point, PredictSpec, SizeSpec, SweepConfig, describe, is_finished,
                                  list_sweeps, load_results, load_sweep, measure_capability, plan_points, record,
                                  size_name, sweep, sweeps_dir, train_point, tune_lrs, validate_sweep, write_results)

__all__ = ["SweepError", "HUBER_DELTA", "approach2_n_opt", "backtest", "chinchilla_loss", "compute_optimal", "fit_all",
           "fit_approach2", "fit_capability", "fit_chinchilla", "fit_lse", "fit_minima_law", "fit_power_law", "frontier",
           "isoflop_minima", "minima_frontier",
           "power_law", "seed_noise", "summarize_fits", "plot", "predict", "MEASURES", "N_COUNTS", "CapabilitySpec", "ExtraSeedsSpec",
           "IsoflopSpec", "LadderSpec", "LrSweepSpec", "Point", "PredictSpec", "SizeSpec", "SweepConfig", "describe",
           "is_finished", "list_sweeps", "load_results", "load_sweep", "measure_capability", "plan_points", "record",
           "size_name", "sweep", "sweeps_dir", "train_point", "tune_lrs", "validate_sweep", "write_results"]
