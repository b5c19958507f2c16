"""Tutorial 7: tensor parallelism: one model split over two processes, and why the sums add up.

    python tutorials/07_tensor_parallel.py [--out DIR] [--smoke]

When a model's weights, or the bandwidth to read them every step, outgrow one GPU, every layer is
split over N GPUs (Megatron-style tensor parallelism). Two kinds of split are enough:

    column-parallel  y = x W^T, W's *rows* (output features) split: each rank computes a slice
                     of y from all of x. QKV (by heads) and the MLP's gate|up are split so.
    row-parallel     y = x W^T, W's *columns* (input features) split: each rank multiplies its
                     slice of x by its columns, which gives a *partial sum* of all of y; an
                     all-reduce adds the N partials. o_proj and down_proj are split so.

Column then row is a whole sublayer with one all-reduce at the end. Here we split a tiny Llama
over two "ranks" by hand, check that the partial sums of its MLP add up to the unsplit result,
then run the real thing: `LLM(..., tensor_parallel_size=2)` starts a second process, the two
talk through `torch.distributed` (gloo on the CPU, NCCL on GPUs), and the greedy tokens equal
one process's. docs/tensor_parallel.md has the design.
"""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from common import heading, parse_args, tiny_model  # noqa: E402

from minivllm import LLM, SamplingParams  # noqa: E402
from minivllm.distributed import SINGLE, TensorParallel  # noqa: E402
from minivllm.models.loader import load_model  # noqa: E402

ENGINE = dict(device="cpu", dtype="float32", block_size=4, num_kv_blocks=64, max_num_seqs=4, max_model_len=128)
PROMPTS = [[11, 12, 13, 14, 15], [21, 22, 23], [31, 32, 33, 34, 35, 36, 37]]


def param_bytes(module: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


def show_the_split(model_dir: str) -> tuple[torch.nn.Module, list[torch.nn.Module]]:
    heading("1. Each rank loads only its shard of every weight")
    whole = load_model(model_dir, tp=SINGLE)
    # A TensorParallel says which rank this is, of how many. Loading needs no process group: each
    # rank reads its own slice of every tensor straight from the safetensors files.
    ranks = [load_model(model_dir, tp=TensorParallel(rank=r, size=2)) for r in range(2)]
    print(f"{'layer 0 weight':<28} {'one process':>14} {'rank 0':>14} {'rank 1':>14}  split")
    for name, kind in [("self_attn.qkv_proj", "column: by heads"), ("self_attn.o_proj", "row"),
                       ("mlp.gate_up_proj", "column: by channels"), ("mlp.down_proj", "row")]:
        shapes = [tuple(m.get_submodule(f"model.layers.0.{name}").weight.shape) for m in [whole, *ranks]]
        print(f"{name:<28} {str(shapes[0]):>14} {str(shapes[1]):>14} {str(shapes[2]):>14}  {kind}")
    attn = [m.model.layers[0].self_attn for m in [whole, *ranks]]
    print(f"KV heads in each rank's cache: {attn[0].num_kv_heads} in one process, "
          f"{attn[1].num_kv_heads} and {attn[2].num_kv_heads} on the two ranks (the block tables are the same)")
    total = [param_bytes(m) for m in [whole, *ranks]]
    print(f"parameter bytes: {total[0]:,} in one process; {total[1]:,} and {total[2]:,} per rank "
          f"({total[1] / total[0]:.2f} each: the norms are whole on every rank)")
    return whole, ranks


def check_the_sums(whole: torch.nn.Module, ranks: list[torch.nn.Module]) -> torch.Tensor:
    heading("2. Column then row: the partial sums add up to the unsplit MLP")
    torch.manual_seed(0)
    x = torch.randn(3, whole.config.hidden_size)
    unsplit = whole.model.layers[0].mlp
    full = unsplit.down_proj(unsplit.act(unsplit.gate_up_proj(x)))  # down(silu(gate) * up)
    partials = []
    for r, model in enumerate(ranks):
        mlp = model.model.layers[0].mlp
        h = mlp.act(mlp.gate_up_proj(x))  # column-parallel: this rank's channels, from all of x
        partial = torch.nn.functional.linear(h, mlp.down_proj.weight)  # row-parallel, no all-reduce yet
        partials.append(partial)
        print(f"rank {r}: {h.shape[-1]} of {whole.config.intermediate_size} channels -> a partial sum "
              f"{tuple(partial.shape)}, |partial| {partial.norm():.3f}")
    summed = partials[0] + partials[1]  # what the all-reduce computes, on every rank
    error = (summed - full).abs().max().item()
    print(f"rank 0 + rank 1 = the one-process output, to {error:.1e} (float32 rounding)")
    assert error < 1e-4, error
    return torch.stack([p[0] for p in partials] + [full[0]])


def run_two_processes(model: str, max_tokens: int) -> None:
    heading("3. The real thing: two processes, one all-reduce after each sublayer")
    greedy = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
    with LLM(model, **ENGINE) as one:
        expected = [o.outputs[0].token_ids for o in one.generate(PROMPTS, greedy, use_tqdm=False)]
    with LLM(model, tensor_parallel_size=2, **ENGINE) as two:
        # The driver (this process) schedules; each step it sends the SchedulerOutput to the
        # worker process, both run the same forward on their shard, and the all-reduces meet.
        got = [o.outputs[0].token_ids for o in two.generate(PROMPTS, greedy, use_tqdm=False)]
        layers = len(two.engine.executor.runner.model.model.layers)
    print(f"a decode step runs 2 x {layers} + 1 = {2 * layers + 1} all-reduces: after attention, after "
          "the MLP, and one for the vocabulary-split embedding")
    for prompt, a, b in zip(PROMPTS, expected, got):
        print(f"prompt {prompt}: one process {a[:6]}... two processes {b[:6]}... same: {a == b}")
    assert got == expected, "tensor_parallel_size=2 must give the same greedy tokens in float32"


def draw(sums: torch.Tensor, out) -> None:
    fig, ax = plt.subplots(figsize=(9, 3.6))
    dims = range(min(48, sums.shape[-1]))
    ax.plot(dims, sums[0, : len(dims)], label="rank 0's partial sum", alpha=0.8)
    ax.plot(dims, sums[1, : len(dims)], label="rank 1's partial sum", alpha=0.8)
    ax.plot(dims, (sums[0] + sums[1])[: len(dims)], "k--", label="their sum (the all-reduce)")
    ax.plot(dims, sums[2, : len(dims)], "o", ms=3, label="one process, unsplit", color="tab:red")
    ax.set_xlabel("output feature of the MLP (first 48)")
    ax.set_title("Row-parallel down_proj: two partial sums add up to the unsplit output")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "partial_sums.png", dpi=120)
    plt.close(fig)
    print(f"\nwrote {out / 'partial_sums.png'}")


def main() -> None:
    args = parse_args(__doc__.split("\n\n")[0], "07_tensor_parallel")
    model = tiny_model(args.model)
    whole, ranks = show_the_split(model)
    sums = check_the_sums(whole, ranks)
    run_two_processes(model, max_tokens=6 if args.smoke else 24)
    draw(sums, args.out)


if __name__ == "__main__":
    main()
