"""A tiny causal LM and tokenizer built offline (no hub download) for the real-TRL tests:
a 2-layer GPT-2 and a byte-level BPE tokenizer trained on a few hundred made-up sentences.
Imports torch/transformers/tokenizers: only the `trl`-marked tests use it."""

from __future__ import annotations

import random
from pathlib import Path

WORDS = [
    *("the", "a", "cat", "dog", "bird", "sees", "runs", "jumps", "sleeps", "over", "under"),
    *("near", "big", "small", "red", "blue", "green", "happy", "sad", "quiet", "loud"),
    *("house", "tree", "river", "hill", "garden"),
]


def sentences(n: int = 300, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 9))) for _ in range(n)]


def build(directory: Path) -> Path:
    """Save a tiny model and its tokenizer in ``directory`` (TRL loads the reference model
    from the same path) and return it."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(
        sentences(),
        trainers.BpeTrainer(
            vocab_size=300,
            special_tokens=["<pad>", "<eos>", "<unk>"],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        ),
    )
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<eos>", pad_token="<pad>", unk_token="<unk>"
    )
    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=len(hf),
        n_positions=64,
        n_embd=32,
        n_layer=2,
        n_head=2,
        bos_token_id=hf.eos_token_id,
        eos_token_id=hf.eos_token_id,
        pad_token_id=hf.pad_token_id,
    )
    GPT2LMHeadModel(config).save_pretrained(directory)
    hf.save_pretrained(directory)
    return directory
