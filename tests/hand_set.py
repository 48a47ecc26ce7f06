"""Hand-set tiny Qwen2 models for the cookbook recipe tests: the next token depends only on the current
one, as a table says, so a recipe's rollouts follow a known distribution (and earn mixed rewards)."""

from __future__ import annotations

import math
from pathlib import Path

import torch
from support import TINY_BPE_TOKENS
from transformers import AutoModelForCausalLM, AutoTokenizer

from eztinker.tiny import make_tiny_model

Successors = dict[str, float]

# The tiny Qwen2's first 16k tokens (eztinker.tiny.trim_vocabulary): the cookbook's renderers
# deep-copy the tokenizer per example or environment (0.33 s with Qwen2's 151k tokens), and at hidden
# size 64 the output layer is most of a recipe's compute. A table token past them joins as an added token.
VOCAB = TINY_BPE_TOKENS

# The hand-set model's next-token distributions, by the token before ("default": any other).
# role_colon's prompt ends in ":", after which it writes " \\boxed{3}" or " \\boxed{7}" and stops at
# "\n\nUser:"; elsewhere it answers with digits, "}\n\n" and <|im_end|>.
BOXED_DEFAULT = {"<|im_end|>": 0.2, "}\n\n": 0.2, **{str(d): 0.06 for d in range(10)}}
BOXED_CHAIN = {
    ":": {" \\": 1.0},
    " \\": {"box": 1.0},  # "boxed" is two tokens of the trimmed vocabulary
    "box": {"ed": 1.0},
    "ed": {"{": 1.0},
    "{": {"3": 0.5, "7": 0.5},
    "3": {"}\n\n": 0.5, "<|im_end|>": 0.5},
    "7": {"}\n\n": 0.5, "<|im_end|>": 0.5},
    "}\n\n": {"User": 1.0},
    "User": {":": 1.0},
}


def hand_set_model(
    out: Path, default: Successors, chain: dict[str, Successors], added_tokens: tuple[str, ...] = ()
) -> Path:
    """A tiny Qwen2 whose next token depends on the current token only: after a token of `chain`,
    its successors' probabilities; after any other token, `default`'s (everything else ~1e-3
    together). Its attention and MLP outputs are zeroed, so the residual stream is the token's
    embedding: every chain token has its own orthogonal embedding, every other token one shared
    embedding; the (untied) output rows map each to its successors. `added_tokens` join the
    tokenizer (within the embedding's spare rows), e.g. Qwen3's single-token `<think>`/`</think>`."""
    make_tiny_model(out, vocab_size=VOCAB)
    tokenizer = AutoTokenizer.from_pretrained(out)
    if added_tokens:
        tokenizer.add_tokens(list(added_tokens))
        tokenizer.save_pretrained(out)
    texts = {*default, *chain, *(t for n in chain.values() for t in n)}
    ids = {text: tokenizer.encode(text) for text in texts}
    assert all(len(v) == 1 for v in ids.values()), ids  # each is one token of this tokenizer
    ids = {text: v[0] for text, v in ids.items()}
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    hidden = model.config.hidden_size
    assert len(chain) < hidden, "one orthogonal direction per chain token"
    basis = torch.linalg.qr(torch.randn(hidden, hidden, generator=torch.Generator().manual_seed(0)))[0].T
    direction = {"default": basis[0], **{text: basis[1 + i] for i, text in enumerate(chain)}}
    scale = math.log(1.5e8)  # the partition function the chosen logits aim at (the other ~49k logits are 0)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        embed = model.model.embed_tokens.weight
        embed.copy_(direction["default"].expand_as(embed))
        for text in chain:
            embed[ids[text]] = direction[text]
        head = torch.zeros_like(embed)
        norm = math.sqrt(hidden)  # RMSNorm maps a unit vector to length sqrt(hidden)
        for source, successors in [("default", default), *chain.items()]:
            for text, p in successors.items():
                head[ids[text]] += direction[source] / norm * (scale + math.log(p))
        model.config.tie_word_embeddings = False
        model.lm_head.weight = torch.nn.Parameter(head)
        # Check every row of the table: a sequence of all chain tokens, then one that is not in it.
        sources = [*chain, "default"]
        other = next(i for i in range(1000, 2000) if i not in ids.values())
        probs = model(torch.tensor([[*(ids[s] for s in chain), other]])).logits[0].softmax(-1)
        for row, source in zip(probs, sources, strict=True):
            for text, p in (chain.get(source) or default).items():
                assert abs(float(row[ids[text]]) - p) < 0.01, (source, text, float(row[ids[text]]), p)
    model.save_pretrained(out)
    return out
