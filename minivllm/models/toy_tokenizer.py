"""A small byte-level BPE tokenizer, trained in a fraction of a second on a built-in text.

Random-weight models (see `random_model.py`) still need a tokenizer so the engine can be run on
text end to end with no downloads. We train one with the `tokenizers` library:

- *byte-level*: text is first turned into its UTF-8 bytes, each byte one of 256 base symbols, so
  any string encodes (no unknown characters) and decoding gives the exact text back;
- *BPE*: training repeatedly merges the most frequent pair of adjacent symbols into a new symbol,
  until the vocabulary is full or no pair repeats. Frequent words end up as single tokens.

Four special tokens come first, so their ids are fixed: <pad>=0, <s>=1 (beginning of sequence,
prepended to every encoded text, as Llama tokenizers do), </s>=2 (end of sequence), <unk>=3.

It also carries a *chat template* (`CHAT_TEMPLATE`), as the tokenizers of chat models do: a Jinja
template that turns a list of messages into the one prompt text the model was trained on. A
server's chat endpoint renders it with `tokenizer.apply_chat_template(messages,
add_generation_prompt=True)`; saved as chat_template.jinja beside the tokenizer.
"""

from __future__ import annotations

from pathlib import Path

PAD, BOS, EOS, UNK = "<pad>", "<s>", "</s>", "<unk>"
SPECIAL_TOKENS = (PAD, BOS, EOS, UNK)  # ids 0, 1, 2, 3
PAD_ID, BOS_ID, EOS_ID, UNK_ID = range(4)

# Each message becomes "<|role|>\n" + its text + "</s>\n"; the generation prompt opens the
# assistant's turn, so the model's answer (ended by </s>, the eos token) is what comes next.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\\n' + message['content'] + eos_token + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)

# Enough distinct English for a few hundred merges. Written for this project.
TRAINING_TEXT = """\
The engine reads a prompt, breaks it into tokens and feeds them to the model one step at a time.
Each step, the scheduler picks which requests run, and the model computes one new token for every
running sequence. When a sequence writes its end token, or reaches its length limit, it finishes
and its memory goes back to the pool, so that a waiting request can start right away.

Keys and values of past tokens are kept in a cache, so that the model never computes them twice.
The cache is cut into small blocks of equal size, like the pages of virtual memory in an operating
system. A table for each sequence lists the blocks that hold its tokens, in order. Blocks do not
need to sit next to each other in memory, which means almost no space is wasted, and two requests
that begin with the same words can share the blocks of their common prefix.

Once upon a time, a small fox lived at the edge of a quiet forest. Every morning she walked down
to the river to drink, watched the light on the water, and listened to the birds in the tall
trees. One day she found a lost kitten under an old bridge. The kitten was cold and hungry, so the
fox brought it home, gave it something to eat and let it sleep by the warm stones. From that day
on, the two friends went everywhere together, through the green fields and over the hills.

What is the weather like today? It is sunny and warm in the morning, with a few clouds in the
afternoon and a light rain in the evening. Tomorrow will be colder, and there may be snow in the
mountains. Please remember to bring a coat, an umbrella and a good pair of shoes.

Numbers and symbols matter too: 0 1 2 3 4 5 6 7 8 9, 10, 16, 32, 64, 128, 256, 512, 1024.
Prices rose by 3.5% in 2023; the meeting starts at 9:30 am, room 42, on the 2nd floor.
Questions? Answers! Lists: apples, bread, cheese, dates, eggs, flour, grapes, honey.
def add(a, b): return a + b  # a tiny function, x = [1, 2, 3], y = {"key": "value"}

People learn best by doing. Read the code, change one line, run it again and see what happens.
Simple programs that work are better than clever programs that nobody understands. Write short
functions, give them clear names, and explain why, not only what. Test the parts you care about,
measure before you optimise, and keep the numbers you measured next to the command that made them.
"""


def _fill_vocabulary(tokenizer, vocab_size: int):
    """Give every id below `vocab_size` a token, so that every id a model can emit decodes to text.

    Training stops when the text runs out of pairs worth merging (a few hundred tokens), but a
    random-weight model samples ids from its whole embedding (151,936 rows for the Qwen3 shapes).
    Ids the tokenizer does not know decode to nothing, so a stream would carry text for only a
    few tokens in a hundred, and a serving benchmark, which sees tokens through their text,
    would measure the gaps between those few. The filler tokens ("w1234", after a space) sit in
    the BPE vocabulary without a merge that builds them: decoding knows them, encoding never
    produces them, so what a text encodes to does not change.
    """
    import json

    from tokenizers import Tokenizer

    spec = json.loads(tokenizer.to_str())
    vocab = spec["model"]["vocab"]
    for token_id in range(len(vocab), vocab_size):
        vocab[f"\u0120w{token_id}"] = token_id  # byte-level "\u0120" is a space
    return Tokenizer.from_str(json.dumps(spec))


def build_tokenizer(vocab_size: int, model_max_length: int):
    """Train the tokenizer; returns a `transformers` fast tokenizer (save it with save_pretrained).

    The trained vocabulary holds at most `vocab_size` tokens (the text runs out of pairs worth
    merging long before a large model's vocabulary is full); filler tokens complete it, so that
    every id decodes to some text (`_fill_vocabulary`).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    if vocab_size < 256 + len(SPECIAL_TOKENS):
        raise ValueError(
            f"a byte-level tokenizer needs vocab_size >= {256 + len(SPECIAL_TOKENS)} "
            f"(256 bytes + {len(SPECIAL_TOKENS)} special tokens), got {vocab_size}"
        )
    tokenizer = Tokenizer(models.BPE(unk_token=UNK))
    # add_prefix_space=False keeps decode(encode(text)) == text exactly.
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(TRAINING_TEXT.splitlines(), trainer)
    tokenizer = _fill_vocabulary(tokenizer, vocab_size)
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, BOS_ID)]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        unk_token=UNK,
        model_max_length=model_max_length,
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def save_tokenizer(out_dir, vocab_size: int, model_max_length: int) -> Path:
    """Train and save the tokenizer into `out_dir` (tokenizer.json + tokenizer_config.json, and
    the chat template)."""
    out_dir = Path(out_dir)
    build_tokenizer(vocab_size, model_max_length).save_pretrained(str(out_dir))
    return out_dir
