"""gptjax: GPT-style language models in JAX/Flax, sharded, resumable, launched by flag."""

__version__ = "0.1.0"

import os

# gs:// goes through gcsfs, never tf.io.gfile, whether or not TensorFlow is installed (etils
# reads this once, at its first gs:// path): gptjax/storage.py says why.
os.environ.setdefault("EPATH_USE_TF", "false")
