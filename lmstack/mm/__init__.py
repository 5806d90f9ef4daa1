"""Multimodal: a CLIP-style image--text model (:mod:`lmstack.mm.clip`) trained on a synthetic, CC0 set of rendered
shapes and digits with EN and ZH captions (:mod:`lmstack.mm.shapes`); training, recall@k, zero-shot and image
search in :mod:`lmstack.mm.train`. It sits on the train/eval floor: it uses ``model`` (the text encoder) and
``tokenizer``, and nothing above."""
