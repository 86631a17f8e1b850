"""The shipped demo model's world: synthetic scenes, their data sets, tokenizer, training recipe and evaluation.

``scenes`` (the seeded scene generator and its bilingual questions), ``data`` (fine-tuning data writers),
``tokenizer`` (the demo SentencePiece model), ``evaluate`` (accuracy per question type and language) and
``train`` (``python -m visualglm.demo.train``: the one command that rebuilds the demo model).
"""
