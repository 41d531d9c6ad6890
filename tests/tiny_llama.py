"""A tiny random-weight Llama with a word-level tokenizer, saved like a hub model (tests of the
command line use it instead of a real model: it builds in about a second)."""
import pytest
import torch


def save_tiny_llama(path) -> str:
    """Write config, weights and tokenizer of a 2-layer random Llama to ``path``; returns it as str."""
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("tokenizers")
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    from alphaquant.cli.evaluation import corpus_text

    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator([corpus_text()[:200_000]], trainers.WordLevelTrainer(vocab_size=500,
                                                                                 special_tokens=["[UNK]"]))
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[UNK]")
    fast.save_pretrained(path)
    cfg = transformers.LlamaConfig(vocab_size=fast.vocab_size, hidden_size=64, intermediate_size=128,
                                   num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                   architectures=["LlamaForCausalLM"])
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(cfg).save_pretrained(path)
    return str(path)
