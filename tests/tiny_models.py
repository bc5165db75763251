"""Tiny random models and batches shared by the tests: a BERT classifier (13-02, 13-03) and a
Llama causal LM (every chapter with a generative model)."""
import torch
from transformers import BertConfig, BertForSequenceClassification, LlamaConfig, LlamaForCausalLM

L, D, FFN = 2, 32, 64  # layers, hidden size, FFN size of the tiny BERT


def tiny_bert(seed: int = 0) -> BertForSequenceClassification:
    """A random 2-layer BERT classifier without dropout (train mode is then deterministic)."""
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=100, hidden_size=D, num_hidden_layers=L, num_attention_heads=2,
                        intermediate_size=FFN, max_position_embeddings=64, num_labels=2,
                        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return BertForSequenceClassification(config).eval()


def bert_batch(seed: int = 1) -> dict[str, torch.Tensor]:
    """Four token sequences of length 9 for `tiny_bert`, the second one padded."""
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(1, 100, (4, 9), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, 6:] = 0  # one padded row
    return {"input_ids": input_ids, "attention_mask": attention_mask}


def tiny_llama_config(vocab_size: int = 64, pad_token_id: int | None = 0,
                      **overrides) -> LlamaConfig:
    """The tiny Llama: 2 layers of width 32, MLP width 64, 4 query heads sharing 2 key/value
    heads, 128 positions, eager attention. Any config field can be overridden;
    `attn_implementation=None` is transformers' default (SDPA), `pad_token_id=None` no padding
    row in the embedding."""
    fields = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
              "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 128,
              "attn_implementation": "eager"}
    return LlamaConfig(vocab_size=vocab_size, pad_token_id=pad_token_id, **(fields | overrides))


def tiny_llama(vocab_size: int = 64, pad_token_id: int | None = 0, seed: int | None = 0,
               **overrides) -> LlamaForCausalLM:
    """A random causal LM of `tiny_llama_config(vocab_size, pad_token_id, **overrides)` in eval
    mode, initialised right after `torch.manual_seed(seed)` (`seed=None`: from the global
    generator as it stands)."""
    if seed is not None:
        torch.manual_seed(seed)
    return LlamaForCausalLM(tiny_llama_config(vocab_size, pad_token_id, **overrides)).eval()
