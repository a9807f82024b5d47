"""A fake tokenizer for the data tests: every UTF-8 byte b is id b + 4 (so " " = 36, "a" = 101),
eos = bos = 2, pad = 1. Hand-checkable, and it never merges across the source/target boundary."""


class ByteTokenizer:
    eos_id, pad_id, bos_id = 2, 1, 2

    def encode(self, text, add_bos=True):
        return ([self.bos_id] if add_bos else []) + [b + 4 for b in text.encode("utf-8")]

    def encode_batch(self, texts, add_bos=True):
        return [self.encode(t, add_bos) for t in texts]
