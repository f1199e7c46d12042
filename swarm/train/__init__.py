"""Training a shared model: the model, the data, the local loop, checkpoints, and the two ways peers
collaborate behind one interface (``collaboration``): ``sync`` (hivemind.Optimizer averages gradients
every swarm epoch) and ``diloco`` (local steps, then swarm's all-reduce of pseudo-gradients).

``rounds`` tracks the swarm's progress and state records; ``agreement`` is the one state-agreement
component (publish a digest, choose the donor, download, verify, adopt) that DiLoCo uses every step
and sync mode at the end of a run. ``factory`` picks sync or DiLoCo and sits above both.
``export`` (a checkpoint as a Hugging Face GPT-2, and back) and ``sampling`` (text from a model) use
the trained model outside the swarm; they import neither hivemind nor the collaboration modules.
May import: torch, hivemind, :mod:`swarm.averaging`, :mod:`swarm.compression`, :mod:`swarm.net`,
:mod:`swarm.config` and the modules of :mod:`swarm` below them; safetensors and transformers (the
optional ``export`` extra) only inside ``export``'s functions.
"""
