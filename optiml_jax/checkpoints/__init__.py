"""Every checkpoint layout in and out: readers of Hugging Face weight files (hf.py), metaseq checkpoints
(metaseq.py) and torch pickles without unpickling code (torch_pickle.py); the one HF <-> params key and
shape mapping (mapping.py); our Orbax model format (model_format.py); conversion in bounded memory
(convert.py), export back to Hugging Face (export.py), and `load_pretrained` (pretrained.py)."""
