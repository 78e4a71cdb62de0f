"""Test set-up: CPU only, 8 fake devices so sharding runs as on a (2, 4) TPU slice."""

import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# The bundled teachers (pinned, read-only weights) are fetched once per machine into the usual
# place and shared by every test session and xdist worker; each session's own cache (below)
# holds everything else. tests/test_teacher_assets.py fetches into its own folders.
os.environ.setdefault(
    "JASPER_JAX_TEACHERS",
    os.path.join(os.path.expanduser("~"), ".cache", "jasper_jax", "teachers"),
)


import pytest  # noqa: E402


@pytest.fixture(autouse=True, scope="session")
def _private_teacher_cache(tmp_path_factory):
    """Tests never read or fill the user's teacher-encoding cache (~/.cache/jasper-jax)."""
    previous = os.environ.get("JASPER_JAX_CACHE")
    os.environ["JASPER_JAX_CACHE"] = str(tmp_path_factory.mktemp("jasper-jax-cache"))
    yield
    if previous is None:
        os.environ.pop("JASPER_JAX_CACHE", None)
    else:
        os.environ["JASPER_JAX_CACHE"] = previous
