"""The tiny random-weight models the model tests run on (see conftest.py for the fixtures).

Besides the five architectures' defaults, two variants reach code paths the defaults do not:
post-LN OPT with a narrower embedding (OPT-350m's layout), and Llama with attention/MLP biases,
tied embeddings and llama3 RoPE scaling whose original context (64) is short enough that all
three of its frequency regimes occur in a 512-position model.
"""

LLAMA3_ROPE = dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                   original_max_position_embeddings=64)

VARIANTS = {
    "llama": dict(arch="llama"),
    "mistral": dict(arch="mistral"),
    "qwen2": dict(arch="qwen2"),
    "qwen3": dict(arch="qwen3"),
    "opt": dict(arch="opt"),
    "opt-post-ln-projected": dict(
        arch="opt", overrides=dict(do_layer_norm_before=False, word_embed_proj_dim=32)),
    "llama-biases-tied-llama3-rope": dict(
        arch="llama",
        overrides=dict(attention_bias=True, mlp_bias=True, tie_word_embeddings=True,
                       rope_scaling=LLAMA3_ROPE)),
}
