"""Tiny random models and batches shared by the adapter tests (13-02, 13-03)."""
import torch
from transformers import BertConfig, BertForSequenceClassification

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
