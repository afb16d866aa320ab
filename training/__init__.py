"""Training for FUSAR-GPT (DESIGN 4): triplet manifests, dataset builders, collator, two-stage SFT, eval.

Its own package: it imports :mod:`fusarbatch.model` (one model definition for training and inference), and
nothing in :mod:`fusarbatch` imports it except the ``train`` and ``eval`` commands, lazily. Submodules:

- :mod:`training.manifest` -- the triplet manifest (JSON Lines) reader and writer;
- :mod:`training.builders` -- labelled chips (Pascal VOC, class folders) -> triplets for every task;
- :mod:`training.synthetic` -- generated data whose answer depends only on the anchors (TLM checks);
- :mod:`training.data` -- dataset, seeded sampler, collator with answer-only labels;
- :mod:`training.train` -- stage 1 / stage 2 with the Hugging Face Trainer, checkpoints and resume;
- :mod:`training.metrics` -- the paper's metrics and VOC average precision;
- :mod:`training.answers` -- what a record asks and expects, predictions read from answers;
- :mod:`training.baselines` -- majority answers, median box, shuffled images, CFAR;
- :mod:`training.evaluate`, :mod:`training.eval_tables` -- ``fusarbatch eval`` and its tables;
- :mod:`training.plot` -- loss curves (PNG, Pillow);
- :mod:`training.staging` -- final model files written into a staging folder, moved in once complete;
- ``python -m training`` -- ``build`` (datasets), ``generated`` (anchor task), ``base`` (a tiny base model),
  ``export`` (a merged model folder).
"""

from __future__ import annotations

__all__: list[str] = []
