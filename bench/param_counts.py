"""Print every preset's parameter counts beside the papers' figures, as a Markdown table.

  python bench/param_counts.py

Builds each model abstractly (jax.eval_shape): no parameter memory, the 175B included.
"""

from gptjax import config, flops

PAPER = {"gpt1": 117e6, "gpt2-small": 124e6, "gpt2-medium": 355e6, "gpt2-large": 774e6, "gpt2-xl": 1558e6,
         "gpt3-small": 125e6, "gpt3-medium": 350e6, "gpt3-large": 760e6, "gpt3-xl": 1.3e9, "gpt3-2.7b": 2.7e9,
         "gpt3-6.7b": 6.7e9, "gpt3-13b": 13e9, "gpt3-175b": 175e9}


def fmt(x: float) -> str:
    return f"{x / 1e9:.3f}B" if x >= 1e9 else f"{x / 1e6:.1f}M"


def main():
    print("| preset | layers | d_model | heads | context | total | paper | diff | non-embedding | 12·L·d² | train FLOPs/token |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for name, paper in PAPER.items():
        m = config.resolve(name).model
        c = flops.param_counts(m)
        print(f"| {name} | {m.n_layer} | {m.d_model} | {m.n_head} | {m.block_size} | {fmt(c['total'])} | {fmt(paper)} "
              f"| {100 * (c['total'] - paper) / paper:+.1f}% | {fmt(c['non_embedding'])} | {fmt(12 * m.n_layer * m.d_model ** 2)} "
              f"| {flops.flops_per_token(m):.3g} |")


if __name__ == "__main__":
    main()
