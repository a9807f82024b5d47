"""The tiny OPT shapes every test model is made from: the common values live here once, and each test
names only what it changes (another vocabulary, more layers or positions, dropout)."""


def tiny_model_settings(**changes) -> dict:
    """OPTConfig keyword arguments of a tiny OPT: the demo tokenizer's 2048-token vocabulary, 2 layers of
    4 heads over 32 features, 64 positions, no dropout; `changes` replace any of them."""
    shape = dict(vocab_size=2048, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, ffn_dim=64)
    model = {**shape, "max_position_embeddings": 64, "dropout": 0.0, "attention_dropout": 0.0}
    unknown = set(changes) - set(model)
    assert not unknown, f"tiny_model_settings: no such setting {sorted(unknown)}"
    return model | changes
